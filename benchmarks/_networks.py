"""Input networks for the benchmarks."""

import jax
import numpy as np


def random_variables(arch, seed=0):
  """Standard-normal ``{'params', 'batch_stats'}`` of ``arch``, placed on the default device.

  No flax ``init``: run eagerly it compiles one small program per operation, and those stay in
  the process (~120 MB of resident memory for ResNet-56, measured), which a benchmark of graph
  conversion or of the metanetwork would then count as its own. Speed does not depend on the
  values.
  """
  rng = np.random.default_rng(seed)
  out = {"params": {}, "batch_stats": {}}
  for coll, shapes in (("params", arch.param_shapes()), ("batch_stats", arch.stat_shapes())):
    for layer, leaves in shapes.items():
      out[coll][layer] = {leaf: rng.standard_normal(shape, np.float32)
                          for leaf, shape in leaves.items()}
  return jax.device_put(out)
