"""Timing helpers shared by the benchmarks (interleaved medians: this machine's speed drifts)."""

import time

import jax
import numpy as np


def interleaved(fns: dict, runs: int) -> dict:
  """Median seconds of each ``fns[name]()``, the calls interleaved round-robin (after a warm-up).

  Odd rounds run the functions in reverse order, so that no variant always runs in the same
  place of a round (the previous call leaves other data in the caches): the pruned/full pair of
  ``pruning.py`` read 1.72x in one fixed order and 1.84x in the other, minutes apart. Use an
  even ``runs``.
  """
  for f in fns.values():
    jax.block_until_ready(f())
  ts = {k: [] for k in fns}
  order = list(fns.items())
  for r in range(runs):
    for k, f in (order if r % 2 == 0 else order[::-1]):
      t = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in ts.items()}
