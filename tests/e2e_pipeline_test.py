"""The README's main job end to end (mode `all` on digits at its smallest settings) and bad inputs.

One tiny pipeline (pretrain -> generate 2 data models -> meta_train 1 epoch -> visualize -> prune)
runs once per class in a temp workdir through the library entry (`modes.run`); the tests then
check the report, the saved materialised network, resuming, and the bad-input errors (each of
which must leave every existing file as it was).
"""

import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import pytest
from absl.testing import absltest

from metaprune_jax import modes
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.modes import common as pipeline
from metaprune_jax.modes import prune as prune_mode
from metaprune_jax.nets import reference
from metaprune_jax.nets import zoo
from metaprune_jax.runtime import checkpoint as ckpt_lib
from metaprune_jax.runtime import datamodels

from _files import snapshot as _snapshot

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_digits_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_digits_cfg",
                                                os.path.join(_ROOT, "configs", "digits.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_config() -> ml_collections.ConfigDict:
  """configs/digits.py at its smallest: every schedule one epoch, 2 data models, short curves."""
  d = _load_digits_config()
  c = d.get_config()
  one = dict(epochs=1, milestones=(), batch_size=32, eval_batch_size=144)
  c.pretrain = d.schedule(**one)
  c.generate.num_models = 2
  c.generate.train = d.schedule(**one)
  c.generate.finetune = d.schedule(lr=0.01, **one)
  c.meta_train.epochs = 1
  c.meta_train.lr_milestones = ()
  c.meta_train.batch_size = 32
  c.meta_train.batches_per_model = 1
  c.meta_train.models_per_step = 1
  c.meta_train.val_fraction = 0.5
  c.finetune_after_metanet = d.schedule(lr=0.01, **one)
  c.finetune_after_pruning = d.schedule(lr=0.01, keep="best", **one)
  c.visualize.steps = 40
  c.visualize.max_speed_up = 2.0
  c.prune.steps = 40
  c.prune.target_speed_up = 2.0
  c.prune.metanet_epoch = -1  # the last (epoch 0 = chosen on the curves: its own test)
  c.prune.latency_batch = 16
  c.prune.latency_runs = 2
  c.lock()
  return c


@pytest.mark.xdist_group("PipelineTest")
class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.workdir = os.path.join(cls.tmp, "run")
    cls.config = tiny_config()
    cls.report = modes.run(cls.config, cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _override(self, **kw):
    c = self.config.copy_and_resolve_references()
    with c.unlocked():
      for k, v in kw.items():
        node = c
        *path, last = k.split(".")
        for p in path:
          node = node[p]
        node[last] = v
    return c

  def test_report_and_saved_network(self):
    w = self.workdir
    for f in ("report.json", "report.txt", "prune/report.json", "prune/report.txt",
              "prune/final_state_dict.npz", "prune/state.json", "visualize/curves.png",
              "visualize/curves.json", "pretrain.json"):
      self.assertTrue(os.path.exists(os.path.join(w, f)), f)
    rep = pipeline.read_json(os.path.join(w, "report.json"))
    self.assertEqual(rep, pipeline.read_json(os.path.join(w, "prune", "report.json")))
    self.assertGreaterEqual(rep["speed_up"], rep["target_speed_up"])
    self.assertEqual(rep["target_speed_up"], 2.0)
    for k in ("accuracy_before", "accuracy_after"):
      self.assertIsInstance(rep[k], float)
      self.assertTrue(0.0 <= rep[k] <= 1.0, rep[k])
    self.assertAlmostEqual(rep["speed_up"], rep["base_macs"] / rep["macs"], places=9)
    self.assertLess(rep["params"], rep["base_params"])
    self.assertGreater(rep["inference_speed_up"], 0.0)
    self.assertEqual(rep["method"], "metanet")
    self.assertEqual(rep["metanet_epoch"], 1)

    # The saved materialised network loads and gives the reported accuracy.
    arch, variables = prune_mode.load_pruned(w)
    self.assertEqual(dict(arch.widths), rep["widths"])
    from metaprune_jax.nets import macs as macs_lib  # pylint: disable=g-import-not-at-top
    self.assertEqual(macs_lib.count_macs(arch, tuple(rep["mac_input_shape"]))[0], rep["macs"])
    ds = __import__("metaprune_jax.runtime.data", fromlist=["x"]).get_dataset("digits")
    acc = pipeline.MaskedEvaluator(arch, ds, 360)(variables)["accuracy"]
    self.assertAlmostEqual(acc, rep["accuracy_after"], places=6)

    # The reference state dict round-trips to the same network.
    with np.load(os.path.join(w, "prune", "final_state_dict.npz")) as z:
      sd = {k: z[k] for k in z.files}
    arch2, v2 = reference.import_reference_model(sd, "resnet8", 10, width_mult=0.5)
    self.assertEqual(dict(arch2.widths), dict(arch.widths))
    for layer, leaves in variables["params"].items():
      for leaf, a in leaves.items():
        np.testing.assert_array_equal(v2["params"][layer][leaf], a)

  def test_curves(self):
    c = pipeline.read_json(os.path.join(self.workdir, "visualize", "curves.json"))["curves"]
    self.assertEqual(sorted(c), ["baseline", "epoch_001"])
    for curve in c.values():
      self.assertEqual(len(curve["speed_ups"]), len(curve["accuracies"]))
      self.assertGreaterEqual(curve["speed_ups"][-1], 2.0)
      self.assertTrue(np.all(np.diff(curve["speed_ups"]) >= 0))
      self.assertTrue(all(0 <= a <= 1 for a in curve["accuracies"]))

  def test_rerun_resumes_without_recomputing(self):
    before = _snapshot(os.path.join(self.workdir, "visualize"))
    rep = modes.run(self._override(mode="prune"), self.workdir)
    self.assertEqual(rep, pipeline.read_json(os.path.join(self.workdir, "report.json")))
    modes.run(self._override(mode="visualize"), self.workdir)
    after = _snapshot(os.path.join(self.workdir, "visualize"))
    self.assertEqual({k: v for k, v in before.items() if not k.endswith(".png")},
                     {k: v for k, v in after.items() if not k.endswith(".png")})

  def test_killed_prune_resumes_at_its_stage(self):
    # A copy of prune/ as a run killed during its last finetune (before its first checkpoint).
    work = os.path.join(self.tmp, "resumed")
    shutil.copytree(os.path.join(self.workdir, "prune"), os.path.join(work, "prune"))
    state_path = os.path.join(work, "prune", "state.json")
    state = pipeline.read_json(state_path)
    for stage in ("prune", "after_pruning", "report"):
      del state["stages"][stage]
    pipeline.write_json(state_path, state)
    stages = os.path.join(work, "prune", "stages")
    final = os.path.basename(os.path.dirname(self.report["stage_dirs"]["final"]))
    self.assertTrue(final.startswith("final-"), final)
    shutil.rmtree(os.path.join(stages, final))
    shutil.rmtree(os.path.join(work, "prune", "final"))
    for f in ("report.json", "report.txt", "final_state_dict.npz"):
      os.remove(os.path.join(work, "prune", f))
    earlier = {d: _snapshot(os.path.join(stages, d)) for d in os.listdir(stages)}
    rep = modes.run(self._override(mode="prune", base_workdir=self.workdir,
                                   metanet_dir=self.workdir,
                                   **{"prune.stage_dir": stages}), work)
    for d, snap in earlier.items():  # the finished stages were reused, not recomputed
      self.assertEqual(snap, _snapshot(os.path.join(stages, d)), d)
    self.assertEqual(rep["speed_up"], self.report["speed_up"])
    self.assertEqual(rep["widths"], self.report["widths"])
    self.assertAlmostEqual(rep["accuracy_after"], self.report["accuracy_after"], places=6)
    self.assertTrue(os.path.exists(os.path.join(work, "report.json")))

  def _method_run(self, method, **kw):
    work = os.path.join(self.tmp, f"method_{method}")
    return work, modes.run(self._override(
        mode="prune", base_workdir=self.workdir,
        **{"prune.method": method, "prune.stage_dir": os.path.join(self.workdir, "prune",
                                                                    "stages"), **kw}), work)

  def test_every_method_gets_the_budget_its_report_states(self):
    reports = {"metanet": self.report}
    for m in ("group_l2", "sl", "random"):
      reports[m] = self._method_run(m)[1]
    reports["metanet_sl"] = self._method_run("metanet_sl", metanet_dir=self.workdir)[1]
    budgets = {m: r["budget"] for m, r in reports.items()}
    for m, b in budgets.items():
      self.assertEqual(reports[m]["method"], m)
      # the stated budget is the epochs each stage's training run actually trained
      for stage, key in (("initial", "initial_finetune"), ("transform", "transform"),
                         ("final", "after_pruning")):
        with open(os.path.join(reports[m]["stage_dirs"][stage], "metrics.jsonl")) as f:
          epochs = [json.loads(line)["epoch"] for line in f if line.strip()]
        self.assertEqual(epochs, list(range(1, b[key] + 1)), (m, stage))
      self.assertEqual(b["total"], b["initial_finetune"] + b["transform"] + b["after_pruning"])
      self.assertEqual({k: v for k, v in b.items() if k != "transform_kind"},
                       {k: v for k, v in budgets["metanet"].items() if k != "transform_kind"})
      self.assertGreaterEqual(reports[m]["speed_up"], 2.0)
    # one initial stage for every method; group_l2 and random share their plain finetune
    self.assertLen({r["stage_dirs"]["initial"] for r in reports.values()}, 1)
    self.assertEqual(reports["group_l2"]["stage_dirs"]["transform"],
                     reports["random"]["stage_dirs"]["transform"])
    self.assertLen({r["stage_dirs"]["transform"] for r in reports.values()}, 4)
    self.assertEqual(budgets["sl"]["transform_kind"], "sparse_learning")
    self.assertEqual(budgets["metanet_sl"]["transform_kind"], "metanet+sparse_learning")
    for m in ("sl", "metanet_sl"):
      self.assertEqual(reports[m]["sl"]["reg"], self.config.prune.sl.reg)
      # the sparse-learning runs trained with the regulariser, the plain finetunes without it
      with open(os.path.join(reports[m]["stage_dirs"]["transform"], "metrics.jsonl")) as f:
        self.assertGreater(json.loads(f.readline())["train_reg"], 0.0, m)
    with open(os.path.join(reports["metanet"]["stage_dirs"]["transform"], "metrics.jsonl")) as f:
      self.assertEqual(json.loads(f.readline()).get("train_reg", 0.0), 0.0)
    # metanet_sl starts from the same metanetwork output as metanet
    self.assertEqual(reports["metanet_sl"]["metanet_epoch"], reports["metanet"]["metanet_epoch"])
    self.assertEqual(reports["metanet_sl"]["stages"]["transform"]["accuracy_metanet_output"],
                     reports["metanet"]["stages"]["transform"]["accuracy_metanet_output"])
    # every "best" epoch was chosen on validation: the kept epoch has the best val accuracy
    for r in reports.values():
      with open(os.path.join(r["stage_dirs"]["final"], "metrics.jsonl")) as f:
        hist = [json.loads(line) for line in f if line.strip()]
      best = max(range(len(hist)), key=lambda i: (hist[i]["val_accuracy"], -i))
      self.assertEqual(r["stages"]["after_pruning"]["best_epoch"], best)

  def test_metanet_epoch_chosen_on_validation_curves(self):
    from metaprune_jax.modes import visualize  # pylint: disable=g-import-not-at-top
    epoch, sel = visualize.select_epoch(self.workdir)
    self.assertEqual(epoch, 1)  # the only epoch of the tiny run
    self.assertEqual(sorted(sel["scores"]), ["baseline", "epoch_001"])
    curves = pipeline.read_json(os.path.join(self.workdir, "visualize", "curves.json"))["curves"]
    lo, hi = sel["range"]
    for k, c in curves.items():  # the score is the curve's mean validation accuracy on [lo, hi]
      grid = np.linspace(lo, hi, 50)
      idx = [max(i for i, x in enumerate(c["speed_ups"]) if x <= g) for g in grid]
      self.assertAlmostEqual(sel["scores"][k], float(np.mean([c["accuracies"][i] for i in idx])))
    work, rep = self._method_run("metanet", **{"prune.metanet_epoch": 0,
                                               "metanet_dir": self.workdir})
    self.assertEqual(rep["metanet_epoch"], 1)
    self.assertEqual(rep["metanet_epoch_selection"]["scores"], sel["scores"])
    with self.assertRaisesRegex(FileNotFoundError, "run the `visualize` mode first"):
      visualize.select_epoch(work)

  def test_bad_method_settings_write_nothing(self):
    before = _snapshot(self.workdir)
    cases = [({"prune.method": "magnitude"}, "unknown; choose from"),
             ({"prune.method": "sl", "prune.sl.reg": 0.0}, "strength must be > 0"),
             ({"prune.method": "sl", "prune.sl.reg": -1.0}, "strength must be > 0"),
             ({"prune.method": "sl", "prune.sl.epochs": 0}, "zero epochs"),
             ({"prune.method": "sl", "prune.sl.epochs": 3}, "cannot be matched"),
             ({"finetune_after_pruning.eval_batch_size": 576}, "fewer than one eval batch")]
    for i, (kw, msg) in enumerate(cases):
      work = os.path.join(self.tmp, f"bad_{i}")
      with self.assertRaisesRegex(ValueError, msg):
        modes.run(self._override(mode="prune", base_workdir=self.workdir,
                                 metanet_dir=self.workdir, **kw), work)
      self.assertFalse(os.path.exists(work), kw)
    self.assertEqual(before, _snapshot(self.workdir))

  def test_visualize_writes_importance_histograms(self):
    out = os.path.join(self.workdir, "visualize")
    self.assertTrue(os.path.exists(os.path.join(out, "importance.png")))
    imp = pipeline.read_json(os.path.join(out, "importance.json"))
    self.assertEqual(sorted(imp["histograms"]), ["baseline", "epoch_001"])
    from metaprune_jax.prune import groups as groups_lib  # pylint: disable=g-import-not-at-top
    dm = datamodels.load_data_model(self.workdir, 1)
    channels = sum(g.width for g in groups_lib.pruning_groups(dm.arch))
    for h in imp["histograms"].values():
      self.assertEqual(sum(h["counts"]), h["channels"])
      self.assertEqual(h["channels"], channels)
      self.assertLessEqual(h["under_0.1"], h["under_0.2"])
      self.assertLen(h["bins"], len(h["counts"]) + 1)

  def test_unreachable_target(self):
    before = _snapshot(self.workdir)
    with self.assertRaisesRegex(ValueError, "unreachable"):
      modes.run(self._override(mode="prune", **{"prune.target_speed_up": 1e4}), self.workdir)
    self.assertEqual(before, _snapshot(self.workdir))

  def test_changed_settings_do_not_overwrite(self):
    before = _snapshot(self.workdir)
    with self.assertRaisesRegex(ValueError, "other settings"):
      modes.run(self._override(mode="prune", **{"prune.target_speed_up": 2.5}), self.workdir)
    self.assertEqual(before, _snapshot(self.workdir))

  def test_metanet_for_another_architecture(self):
    other_dir = os.path.join(self.tmp, "other_metanet")
    other = zoo.get_arch("resnet20", 10)
    mc = metanet_lib.make_metanet_config(1, 8, 8, (9,), 0.01, 0.01)
    phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
    c = ckpt_lib.Checkpointer(os.path.join(other_dir, "meta_train"), max_to_keep=None,
                              async_save=False)
    c.save(1, {"params": phi}, {"metanet_config": mc.to_dict(),
                                                 "arch": other.to_json(), "epoch": 1})
    c.close()
    work = os.path.join(self.tmp, "wrong_metanet")
    with self.assertRaisesRegex(ValueError, "trained for resnet20"):
      modes.run(self._override(mode="prune", metanet_dir=other_dir, base_workdir=self.workdir),
                work)
    self.assertFalse(os.path.exists(os.path.join(work, "prune")))

  def test_missing_base_checkpoint(self):
    work = os.path.join(self.tmp, "no_base")
    os.makedirs(work)
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, "no finished base network"):
      modes.run(self._override(mode="prune", metanet_dir=self.workdir), work)
    self.assertEqual(os.listdir(work), [])

  def test_too_few_data_models_for_validation(self):
    one = os.path.join(self.tmp, "one_model")
    src = datamodels.model_dir(self.workdir, 0)
    shutil.copytree(src, os.path.join(one, datamodels.DIRNAME, os.path.basename(src)))
    work = os.path.join(self.tmp, "few_models")
    with self.assertRaisesRegex(ValueError, "validation"):
      modes.run(self._override(mode="visualize", data_models_dir=one, metanet_dir=self.workdir),
                work)
    self.assertFalse(os.path.exists(work))


if __name__ == "__main__":
  absltest.main()
