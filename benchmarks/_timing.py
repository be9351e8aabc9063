"""Timing helpers shared by the benchmarks (interleaved medians: this machine's speed drifts)."""

import time

import jax
import numpy as np


def interleaved(fns: dict, runs: int) -> dict:
  """Median seconds of each ``fns[name]()``, the calls interleaved round-robin (after a warm-up)."""
  for f in fns.values():
    jax.block_until_ready(f())
  ts = {k: [] for k in fns}
  for _ in range(runs):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in ts.items()}
