"""Where the reference fixtures are, and the skip for tests that need them.

The reference fixtures are the outputs of the reference implementation of the paper (PyTorch,
github.com/Yewei-Liu/MetaPruning, with torch, Torch-Pruning and PyTorch Geometric) on fixed,
seeded weights: its own scripts were run on three small cases (a pruned ResNet-56, a pruned
VGG-19, a pruned ResNet-50) and their results saved as plain ``.npz`` and JSON files (the state
dict, logits, the graph, MAC counts, pruning groups and importance, a pruning step, a fresh
metanetwork and its outputs, the regulariser's gradients, one meta-training step). They are not
part of the repository (docs/design.md, "Reference fixtures").

The folder is read from the environment variable ``METAPRUNE_REFERENCE_FIXTURES``; without it,
from ``shared/fixtures/reference`` next to the repository's checkout (the layout CI uses). Every
test that reads a fixture calls :func:`require` (pytest tests) or :func:`missing` (unittest
classes), so without the fixtures those tests skip with a message saying what they need.
"""

import os
import pathlib

import pytest

ENV_VAR = "METAPRUNE_REFERENCE_FIXTURES"

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT = _REPO_ROOT.parent / "shared" / "fixtures" / "reference"


def path() -> pathlib.Path:
  """The fixture folder: ``$METAPRUNE_REFERENCE_FIXTURES``, else the sibling default."""
  value = os.environ.get(ENV_VAR, "")
  return pathlib.Path(value).expanduser() if value else _DEFAULT


def missing(case: str | None = None) -> str | None:
  """``None`` when the fixtures (of ``case``, if given) are there, else the skip message."""
  folder = path() if case is None else path() / case
  if folder.is_dir():
    return None
  return (f"needs the reference fixtures{f' of case {case!r}' if case else ''}: {folder} is "
          f"not a folder. They are the reference implementation's outputs on fixed weights "
          f"(its own scripts run on seeded weights; docs/design.md, 'Reference fixtures') and "
          f"are not part of the repository; set {ENV_VAR} to the folder that holds them.")


def require(case: str | None = None) -> pathlib.Path:
  """The fixture folder (of ``case``, if given); skips the calling test when it is missing."""
  message = missing(case)
  if message is not None:
    pytest.skip(message)
  return path() if case is None else path() / case
