"""The data-model set: storage, loading, and the ``generate`` mode (docs/design.md section 2).

A data model is a network trained from scratch, pruned to the initial speed-up with the
group-L2 criterion and finetuned. Each is stored as one folder
``<workdir>/data_models/model_XXXXX/`` holding ``variables.npz`` (the *materialised* network:
``params/<layer>/<leaf>`` and ``batch_stats/<layer>/<leaf>`` arrays), ``keep.npz`` (the kept
channel indices of every space inside the full-width network, so meta-training can embed it at
full width) and ``info.json`` (architecture JSON at its real widths, train/test accuracy and
loss, speed-up, seed). The folder is written under a temporary name and renamed when complete,
so a killed run never leaves a half-written data model: a re-run skips finished models and
resumes the interrupted one from its training checkpoints (``<workdir>/generate/model_XXXXX``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from metaprune_jax.nets.arch import Arch

DIRNAME = "data_models"


@dataclasses.dataclass
class DataModel:
  """A stored data model.

  Attributes:
    index: its generation index.
    arch: the architecture at its real (pruned) widths.
    variables: ``{'params', 'batch_stats'}`` numpy arrays at those widths.
    keep: ``{space: kept channel indices}`` inside the full-width architecture.
    info: metrics and provenance (``train_accuracy``, ``train_loss``, ``test_accuracy``,
      ``test_loss``, ``speed_up``, ``seed``, ``full_arch`` JSON, ...).
  """

  index: int
  arch: Arch
  variables: dict
  keep: dict
  info: dict

  @property
  def full_arch(self) -> Arch:
    return Arch.from_json(self.info["full_arch"])


def model_dir(root: str, index: int) -> str:
  return os.path.join(os.path.abspath(root), DIRNAME, f"model_{index:05d}")


def save_data_model(root: str, index: int, arch: Arch, variables: Mapping, keep: Mapping,
                    info: Mapping, full_arch: Arch) -> str:
  """Writes a data model atomically (temporary folder, then rename). Returns its folder."""
  final = model_dir(root, index)
  tmp = final + ".tmp"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  arrays = {}
  for coll in ("params", "batch_stats"):
    for layer, leaves in variables[coll].items():
      for leaf, a in leaves.items():
        arrays[f"{coll}/{layer}/{leaf}"] = np.asarray(a)
  np.savez(os.path.join(tmp, "variables.npz"), **arrays)
  np.savez(os.path.join(tmp, "keep.npz"), **{s: np.asarray(k, np.int32) for s, k in keep.items()})
  meta = dict(info)
  meta.update(index=index, arch=arch.to_json(), full_arch=full_arch.to_json())
  with open(os.path.join(tmp, "info.json"), "w") as f:
    json.dump(meta, f, indent=1, default=float)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(tmp, final)
  return final


def load_data_model(root: str, index: int) -> DataModel:
  """Reads data model ``index``. Raises ValueError naming what is missing or broken."""
  d = model_dir(root, index)
  try:
    with open(os.path.join(d, "info.json")) as f:
      info = json.load(f)
    with np.load(os.path.join(d, "variables.npz")) as z:
      flat = {k: z[k] for k in z.files}
    with np.load(os.path.join(d, "keep.npz")) as z:
      keep = {k: z[k] for k in z.files}
  except (OSError, ValueError, json.JSONDecodeError) as e:
    raise ValueError(f"data model {d} is missing or unreadable ({type(e).__name__}: {e}); "
                     "re-run `generate` to redo it") from e
  variables = {"params": {}, "batch_stats": {}}
  for k, a in flat.items():
    coll, layer, leaf = k.split("/")
    variables[coll].setdefault(layer, {})[leaf] = a
  arch = Arch.from_json(info["arch"])
  return DataModel(index, arch, variables, keep, info)


def list_data_models(root: str) -> list[int]:
  """Indices of the complete data models under ``root`` (temporary folders ignored)."""
  d = os.path.join(os.path.abspath(root), DIRNAME)
  if not os.path.isdir(d):
    return []
  out = []
  for name in os.listdir(d):
    if name.startswith("model_") and not name.endswith(".tmp") and \
       os.path.exists(os.path.join(d, name, "info.json")):
      out.append(int(name[len("model_"):]))
  return sorted(out)


def load_data_model_set(root: str, expected: int | None = None) -> list[DataModel]:
  """All data models, checked to share one full-width architecture.

  Raises:
    ValueError: an empty or partly written set (fewer than ``expected``), or mixed
      architectures.
  """
  idx = list_data_models(root)
  if not idx:
    raise ValueError(f"no data models in {os.path.join(os.path.abspath(root), DIRNAME)}; run "
                     "the `generate` mode first (config.data_models_dir points at its workdir)")
  if expected is not None and len(idx) < expected:
    raise ValueError(f"{os.path.join(os.path.abspath(root), DIRNAME)} holds {len(idx)} complete "
                     f"data models, {expected} expected; finish `generate` first")
  models = [load_data_model(root, i) for i in idx]
  full = {m.info["full_arch"] for m in models}
  if len(full) != 1:
    names = sorted({Arch.from_json(f).name for f in full})
    raise ValueError(f"data models in {root} mix architectures {names}; one set per "
                     "architecture")
  return models


del jax, logging, Any
