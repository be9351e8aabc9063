"""Input networks for the benchmarks, and where the reference fixtures are."""

import os

import jax
import numpy as np

FIXTURES_ENV_VAR = "METAPRUNE_REFERENCE_FIXTURES"


def reference_fixtures() -> str:
  """The reference-fixture folder, as the tests find it (tests/_fixtures.py).

  ``$METAPRUNE_REFERENCE_FIXTURES``, else ``shared/fixtures/reference`` next to the repository's
  checkout. The fixtures are the reference implementation's outputs on fixed weights
  (docs/design.md, "Reference fixtures"); the benchmarks that read them stop with this message
  when they are missing.
  """
  path = os.environ.get(FIXTURES_ENV_VAR, "") or os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures",
      "reference")
  if not os.path.isdir(path):
    raise SystemExit(f"the reference fixtures are not at {path}; set {FIXTURES_ENV_VAR} to the "
                     "folder that holds them (docs/design.md, 'Reference fixtures')")
  return path


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
