"""benchmarks/compare_methods.py at its smallest settings: the schema external checks read, and
its bad-input errors (nothing written)."""

import json
import os
import shutil
import sys
import tempfile

import pytest
from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))

import compare_methods  # noqa: E402  pylint: disable=g-import-not-at-top
from _files import snapshot as _snapshot  # noqa: E402


@pytest.mark.xdist_group("CompareMethodsTest")
class CompareMethodsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.out = os.path.join(cls.tmp, "cmp")
    cls.config = compare_methods.smoke(
        compare_methods.load_config(os.path.join(_ROOT, "configs", "digits.py")))
    cls.config.arch = "resnet_tiny"
    cls.summary = compare_methods.run(cls.config, [0], [2.0], ["group_l2", "random"], cls.out)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_schema(self):
    from metaprune_jax.modes import common as pipeline  # pylint: disable=g-import-not-at-top
    s = pipeline.read_json(os.path.join(self.out, "compare.json"))
    self.assertTrue(os.path.exists(os.path.join(self.out, "compare.png")))
    self.assertEqual(s["settings"]["methods"], ["group_l2", "random"])
    self.assertEqual(sorted(s["settings"]["budget"]), ["group_l2", "random"])
    self.assertEqual(list(s["targets"]), ["2.0"])
    for m in ("group_l2", "random"):
      r = s["targets"]["2.0"][m]
      self.assertLen(r["values"], 1)
      self.assertAlmostEqual(r["mean"], r["values"][0])
      self.assertEqual(r["std"], 0.0)
      self.assertTrue(0.0 <= r["mean"] <= 1.0)
      self.assertGreaterEqual(r["speed_up"][0], 2.0)
      c = s["curves"][m]
      self.assertLen(c["test_mean"], len(c["speed_ups"]))
      self.assertEqual(c["speed_ups"][0], 1.0)
    # the report of each run is the one the summary quotes
    rep = pipeline.read_json(os.path.join(self.out, "seed_0", "random_2", "report.json"))
    self.assertEqual(rep["accuracy_after"], s["targets"]["2.0"]["random"]["values"][0])
    self.assertEqual(rep["budget"], s["settings"]["budget"]["random"])

  def test_per_method_settings_and_best_from_start(self):
    # group_l2 alone gets keep='best_from_start' and a learning rate that wrecks its finetune:
    # its pruned network before the finetune must be kept; random, without settings of its own,
    # must give the class run's result to the bit (same seed, same stages).
    from metaprune_jax.modes import common as pipeline  # pylint: disable=g-import-not-at-top
    out = os.path.join(self.tmp, "per_method")
    settings = compare_methods.parse_settings(
        ["group_l2:finetune_after_pruning.keep=best_from_start",
         "group_l2:finetune_after_pruning.lr=3.0"])
    self.assertEqual(settings, {"group_l2": {"finetune_after_pruning.keep": "best_from_start",
                                             "finetune_after_pruning.lr": 3.0}})
    s = compare_methods.run(self.config, [0], [2.0], ["group_l2", "random"], out,
                            reuse=self.out, plot=False, settings_per_method=settings)
    self.assertEqual(s["settings"]["per_method"], settings)
    rep = pipeline.read_json(os.path.join(out, "seed_0", "group_l2_2", "report.json"))
    self.assertIn("the pruned network before it counting as a candidate",
                  rep["budget"]["selection"])
    self.assertNotIn("candidate", s["settings"]["budget"]["random"]["selection"])
    with open(os.path.join(rep["stage_dirs"]["final"], "metrics.jsonl")) as f:
      epochs = [r["val_accuracy"] for r in map(json.loads, f) if "val_accuracy" in r]
    self.assertLen(epochs, 1)
    self.assertLess(epochs[0], rep["stages"]["prune"]["val_accuracy_no_finetune"])
    self.assertEqual(rep["stages"]["after_pruning"]["best_epoch"], -1)
    self.assertEqual(rep["val_accuracy_after"], rep["stages"]["prune"]["val_accuracy_no_finetune"])
    self.assertEqual(rep["accuracy_after"], rep["stages"]["prune"]["accuracy_no_finetune"])
    self.assertEqual(s["targets"]["2.0"]["random"], self.summary["targets"]["2.0"]["random"])

  def test_bad_per_method_settings_write_nothing(self):
    bad = os.path.join(self.tmp, "bad_set")
    for items, message in (
        (["sl=prune.sl.reg:0.03"], "expected METHOD:FIELD=VALUE"),
        (["group_l2:finetune_after_pruning.epochs=2"], "every method gets the same budget"),
        (["group_l2:meta_train.lr=0.1"], "not a setting of the method's own stages"),
        (["group_l2:prune.method=sl"], "not a setting of the method's own stages"),
        (["group_l2:prune.no_such_field=1"], "the config has no field 'prune.no_such_field'"),
        (["group_l2:finetune_after_pruning.batch_size=0.5"], "batch_size=0.5"),
        (["sl:prune.sl.reg=0.03"], r"method\(s\) \['sl'\] that are not compared"),
        (["group_l2:finetune_after_pruning.keep=first"],
         "config.finetune_after_pruning.keep='first': unknown keep"),
        (["random:prune.round_to=0"], "config.prune.round_to=0: must be a positive integer"),
    ):
      with self.assertRaisesRegex(ValueError, message):
        compare_methods.run(self.config, [0], [2.0], ["group_l2", "random"], bad,
                            settings_per_method=compare_methods.parse_settings(items))
      self.assertFalse(os.path.exists(bad))
    with self.assertRaisesRegex(ValueError, "sparse-learning strength must be > 0"):
      compare_methods.run(self.config, [0], [2.0], ["sl"], bad,
                          settings_per_method={"sl": {"prune.sl.reg": -1.0}})
    self.assertFalse(os.path.exists(bad))

  def test_bad_input_writes_nothing(self):
    before = _snapshot(self.out)
    with self.assertRaisesRegex(ValueError, r"unknown method\(s\) \['magnitude'\]"):
      compare_methods.run(self.config, [0], [2.0], ["group_l2", "magnitude"],
                          os.path.join(self.tmp, "bad"))
    with self.assertRaisesRegex(ValueError, "target speed-up must be > 1"):
      compare_methods.run(self.config, [0], [0.5], ["group_l2"], os.path.join(self.tmp, "bad"))
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "bad")))
    with self.assertRaisesRegex(ValueError, "other settings"):
      compare_methods.run(self.config, [0], [3.0], ["group_l2", "random"], self.out)
    self.assertEqual(before, _snapshot(self.out))


if __name__ == "__main__":
  absltest.main()
