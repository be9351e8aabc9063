"""Shared pytest fixtures: the reference-fixture folder and fast CPU compilation."""

import os
import pathlib

import jax
import pytest

# Tests compile many small programs once each; XLA's optimisation passes cost far more than
# they save here. Numerics stay within the tolerances the tests compare at (<= 1e-4 relative).
jax.config.update("jax_disable_most_optimizations", True)
# The same for the CLI runs and workers the tests start as subprocesses (they inherit the
# environment): a tiny meta_train run compiles in 9 s instead of 20 s.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_FIXTURES = _REPO_ROOT.parent / "shared" / "fixtures" / "reference"


@pytest.fixture(scope="session", name="FIXTURES")
def fixtures_path() -> pathlib.Path:
  """``<repo root>/../shared/fixtures/reference``; skips the test when it is missing."""
  if not _FIXTURES.is_dir():
    pytest.skip(f"reference fixtures not found at {_FIXTURES} (they live next to the repository "
                "in ../shared/fixtures/reference and are not copied into it)")
  return _FIXTURES

