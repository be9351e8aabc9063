"""benchmarks/pool_compare.py: a comparison split by seeds and pooled back is the comparison."""

import copy
import json
import math
import os
import sys
import tempfile

import numpy as np
from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))

import pool_compare  # noqa: E402  pylint: disable=g-import-not-at-top

# a committed 5-seed comparison (5 methods, 3 targets, per-seed curves)
_RUN = os.path.join(_ROOT, "benchmarks", "results", "compare_methods", "two_epoch_run",
                    "compare.json")


def _load():
  with open(_RUN) as f:
    return json.load(f)


def _subset(summary: dict, keep: list[int]) -> dict:
  """The comparison restricted to some of its seeds (what a run on those seeds wrote)."""
  seeds = [int(s) for s in summary["settings"]["seeds"]]
  idx = [seeds.index(s) for s in keep]
  out = copy.deepcopy(summary)
  out["settings"]["seeds"] = keep
  for t in out["targets"].values():
    for r in t.values():
      for key in ("values", "val_values", "speed_up"):
        r[key] = [r[key][i] for i in idx]
      for key, vals in (("", r["values"]), ("val_", r["val_values"])):
        r[f"{key}mean"] = float(np.mean(vals))
        r[f"{key}std"] = float(np.std(vals))
  for c in out["curves"].values():
    c["per_seed"] = {str(s): c["per_seed"][str(s)] for s in keep}
  for imp in out["importance"].values():
    for key in imp:
      imp[key] = [imp[key][i] for i in idx]
  out["metanet_epochs"] = {str(s): out["metanet_epochs"][str(s)] for s in keep
                           if str(s) in out["metanet_epochs"]}
  return out


class PoolCompareTest(absltest.TestCase):

  def test_split_and_pooled_back_is_the_comparison(self):
    full = _load()
    a, b = _subset(full, [0, 1, 2]), _subset(full, [3, 4])
    pooled = pool_compare.pool([(a, "a", "", ""), (b, "b", "", "")])
    self.assertEqual(pooled["settings"]["seeds"], [0, 1, 2, 3, 4])
    self.assertEqual(pooled["settings"]["methods"], full["settings"]["methods"])
    for t, rows in full["targets"].items():
      for m, r in rows.items():
        p = pooled["targets"][t][m]
        for key in ("values", "val_values", "speed_up"):
          self.assertEqual(p[key], r[key], (t, m, key))
        for key in ("mean", "std", "val_mean", "val_std"):
          self.assertTrue(math.isclose(p[key], r[key], rel_tol=1e-12, abs_tol=1e-15),
                          (t, m, key, p[key], r[key]))
    for m, c in full["curves"].items():
      for key in ("speed_ups", "test_mean", "test_std", "val_mean", "val_std"):
        np.testing.assert_allclose(pooled["curves"][m][key], c[key], rtol=1e-12, atol=1e-15,
                                   err_msg=f"{m} {key}")
      self.assertEqual(pooled["importance"][m], full["importance"][m])
    self.assertEqual(pooled["metanet_epochs"], full["metanet_epochs"])
    self.assertEqual([p["seeds"] for p in pooled["settings"]["pooled_from"]], [[0, 1, 2], [3, 4]])
    self.assertEqual(pooled["settings"]["pooled_from"][1]["rows"],
                     {m: m for m in full["settings"]["methods"]})

  def test_a_method_as_its_own_row(self):
    full = _load()
    a, b = _subset(full, [0, 1]), _subset(full, [2, 3, 4])
    pooled = pool_compare.pool([(a, "a", "sl", "sl_other"), (b, "b", "sl", "sl_other"),
                                (a, "a", "metanet", "metanet"), (b, "b", "metanet", "metanet")])
    self.assertEqual(pooled["settings"]["methods"], ["sl_other", "metanet"])
    self.assertEqual(pooled["targets"]["6.0"]["sl_other"]["values"],
                     full["targets"]["6.0"]["sl"]["values"])

  def test_bad_pools_are_named(self):
    full = _load()
    a, b = _subset(full, [0, 1]), _subset(full, [1, 2])
    with self.assertRaisesRegex(ValueError, r"seed\(s\) \[1\] come from more than one input"):
      pool_compare.pool([(a, "a", "", ""), (b, "b", "", "")])
    with self.assertRaisesRegex(ValueError, "no method 'nope'"):
      pool_compare.pool([(a, "a", "nope", "nope")])
    c = _subset(full, [2, 3])
    with self.assertRaisesRegex(ValueError, "covers seeds"):
      pool_compare.pool([(a, "a", "", ""), (c, "c", "sl", "sl_more")])
    for bad in ("@sl", "x.json@", "x.json@sl="):
      with self.assertRaisesRegex(ValueError, "expected PATH"):
        pool_compare.parse_input(bad)

  def test_command_line_writes_nothing_on_bad_input(self):
    with tempfile.TemporaryDirectory() as d:
      half = os.path.join(d, "half.json")
      with open(half, "w") as f:
        json.dump(_subset(_load(), [0, 1]), f)
      out = os.path.join(d, "out")
      with self.assertRaises(SystemExit):
        pool_compare.main([f"--out={out}", _RUN, half])  # seeds 0 and 1 twice
      self.assertFalse(os.path.exists(out))
      pool_compare.main([f"--out={out}", "--no_plot", half])
      with open(os.path.join(out, "compare.json")) as f:
        self.assertEqual(json.load(f)["settings"]["seeds"], [0, 1])


if __name__ == "__main__":
  absltest.main()
