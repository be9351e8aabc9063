"""The XLA flags every process of a test run uses (this run's tests and the CLI runs and workers
they start), and how a test adds its own (``xla_flags``) without dropping them.

``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's legacy loop emitters instead of its MLIR fusion
emitters. The tests compile hundreds of programs and run each a few times on tiny shapes, so
compile time is most of the suite: measured on the 2-core VM (2026-12-03), the tiny meta-training
gradient program compiled in ~10 s instead of ~15-18 s, and
``meta_test.py::test_padded_slot_path_equals_materialised_and_compiles_once`` took 49 s instead
of 143 s. The library itself keeps XLA's defaults (its benchmarks measure those).
"""

import os

FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)

# ``jax.jit(..., compiler_options=LIBRARY_EMITTERS)``: one program compiled with XLA's default
# emitters, for a test of a property that holds bit for bit under them only (the legacy emitters
# may order a reduction differently for different shapes: 1 ulp).
LIBRARY_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


def xla_flags(*extra: str) -> str:
  """``XLA_FLAGS`` for a subprocess: ``extra`` (e.g. a fake device count) and the run's flags."""
  return " ".join(dict.fromkeys((*extra, *FAST_COMPILE_FLAGS)))


def set_for_this_run() -> None:
  """Adds the run's flags to this process's ``XLA_FLAGS`` (before jax starts its backend), so
  that the processes it starts inherit them."""
  os.environ["XLA_FLAGS"] = xla_flags(*os.environ.get("XLA_FLAGS", "").split())
