r"""The paper's claim at small scale: metanetwork pruning vs plain group-L2 pruning on digits.

  python benchmarks/claim_digits.py --out=/tmp/claim_digits --seeds=0,1,2 --target=3.0

Per seed (configs/digits.py with `config.seed` = seed; one pretrain/generate/meta_train per seed,
reused on re-runs): the `prune` mode with the metanetwork (its last epoch), and the same `prune`
with `method=group_l2` from the same base network, where plain pruning gets the
after-metanetwork finetune's epochs added to its after-pruning finetune (the same total
finetuning budget; the milestone moves by the same amount). Both share the initial pruning and
its finetune. Besides the accuracy at the target, the no-finetune accuracy-vs-speed-up curves of
the network right before the final pruning: the metanetwork's output after its finetune vs the
same initial network finetuned with the same schedule without the metanetwork (as `visualize`'s
baseline).

Prints one JSON object (per-seed numbers, mean and standard deviation over seeds, the curves on
a common speed-up grid) and saves `<out>/claim_digits.png` and `<out>/claim_digits.json`.

Measured (2-core CPU shared with other jobs, 14 min 22 s; jax 0.10.2; configs/digits.py defaults:
5 data models at 1.5x, metanetwork 3 layers / hidden 16 / ratios 0.01, 6 meta-training epochs,
finetunes 4 (after metanetwork) + 6 (after pruning) epochs vs 0 + 10 for group L2; seeds 0,1,2;
target 3.0x, reached 3.03 / 3.30 / 3.13x, identical for both methods; numbers in
benchmarks/results/claim_digits.json):

  accuracy at the target after finetuning:  metanetwork 0.9647 +- 0.0237 (std over seeds),
                                            group L2    0.9805 +- 0.0100,
                                            difference  -0.0158 +- 0.0140 (group L2 better in
                                            all 3 seeds)
  accuracy at the target, no finetuning:    metanetwork 0.328 +- 0.107, group L2 0.289 +- 0.149
  no-finetune curves (1.5x..5x):            within ~0.02 of each other everywhere (plain pruning
                                            falls from 0.99 at 1.5x to ~0.3 at 2.7x).

So at this scale the claim is *not* reproduced: the small metanetwork barely changes the networks
(its residual ratio 0.01 after 6 epochs), and spending those 4 finetune epochs after pruning
instead is worth more.
"""

import json
import os
import sys

import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metaprune_jax import data as data_lib  # noqa: E402
from metaprune_jax import masks as masks_lib  # noqa: E402
from metaprune_jax import modes  # noqa: E402
from metaprune_jax import pipeline  # noqa: E402
from metaprune_jax import train as train_lib  # noqa: E402
from metaprune_jax import visualize  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/claim_digits", "Output folder (one workdir per seed).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_TARGET = flags.DEFINE_float("target", 3.0, "Overall target speed-up.")
_MAX_SPEED = flags.DEFINE_float("max_speed_up", 5.0, "Curves stop at this speed-up.")
_STEPS = flags.DEFINE_integer("steps", 200, "Pruning steps per pruning.")


def _digits_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("_digits_cfg",
                                                os.path.join(root, "configs", "digits.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _configs(seed: int, target: float):
  c = _digits_config()
  c.seed = seed
  c.mode = "all"
  c.visualize.enabled = False
  c.prune.target_speed_up = target
  c.prune.steps = _STEPS.value
  g = c.copy_and_resolve_references()
  g.mode = "prune"
  g.prune.method = "group_l2"
  extra = int(c.finetune_after_metanet.epochs)
  g.finetune_after_pruning.epochs = int(c.finetune_after_pruning.epochs) + extra
  g.finetune_after_pruning.milestones = tuple(m + extra
                                              for m in c.finetune_after_pruning.milestones)
  return c, g


def _curves(config, workdir, dataset, shape):
  """No-finetune pruning curves before the final pruning: metanetwork vs baseline."""
  state = pipeline.read_json(os.path.join(workdir, "prune", "state.json"))["stages"]
  s1 = state["initial"]["speed_up"]
  _, arch, v, _ = train_lib.load_run(workdir, "prune/initial_finetune")
  masks1 = masks_lib.masks_from_keep(arch, state["initial"]["keep"])
  small, v1 = masks_lib.materialize(arch, v, masks1)
  evaluator = pipeline.MaskedEvaluator(small, dataset, 360)
  schedule = pipeline.with_keep(config.finetune_after_metanet, "best")
  base = train_lib.fit(schedule, small, v1, None, dataset,
                       os.path.join(workdir, "claim_baseline_finetune"), seed=int(config.seed),
                       desc="baseline finetune")
  _, _, vm, _ = train_lib.load_run(workdir, "prune/after_metanet")
  out = {}
  for name, vv in (("metanet", vm), ("group_l2", base.variables)):
    out[name] = visualize.accuracy_curve(small, vv, evaluator, shape, s1, _MAX_SPEED.value,
                                         _STEPS.value, desc=f"{name} curve")
  return out


def _stats(xs):
  xs = np.asarray(xs, np.float64)
  return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
          "min": float(xs.min()), "max": float(xs.max()), "values": xs.tolist()}


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  dataset = data_lib.get_dataset("digits")
  shape = pipeline.input_shape(dataset)
  per_seed, curves = [], []
  for s in _SEEDS.value:
    seed = int(s)
    c, g = _configs(seed, _TARGET.value)
    w = os.path.join(_OUT.value, f"seed_{seed}")
    rep_m = modes.run(c, w)
    rep_g = modes.run(_with_base(g, w),
                      os.path.join(_OUT.value, f"seed_{seed}_group_l2"))
    cur = _curves(c, w, dataset, shape)
    curves.append(cur)
    per_seed.append({"seed": seed,
                     "metanet": {k: rep_m[k] for k in ("accuracy_after", "speed_up",
                                                       "accuracy_before")},
                     "group_l2": {k: rep_g[k] for k in ("accuracy_after", "speed_up")},
                     "no_finetune_at_target": {
                         "metanet": rep_m["stages"]["prune"]["accuracy_no_finetune"],
                         "group_l2": rep_g["stages"]["prune"]["accuracy_no_finetune"]}})
  grid = np.round(np.arange(1.5, _MAX_SPEED.value + 1e-9, 0.1), 3)

  def on_grid(cur):
    x, y = np.asarray(cur["speed_ups"]), np.asarray(cur["accuracies"])
    return np.interp(grid, x, y, right=np.nan)
  curve_summary = {}
  for name in ("metanet", "group_l2"):
    ys = np.stack([on_grid(cu[name]) for cu in curves])
    curve_summary[name] = {"mean": np.nanmean(ys, 0).tolist(), "std": np.nanstd(ys, 0).tolist()}
  res = {
      "settings": {"config": "configs/digits.py defaults", "seeds": [int(s) for s in _SEEDS.value],
                   "target_speed_up": _TARGET.value, "steps": _STEPS.value,
                   "group_l2_extra_finetune_epochs": int(_configs(0, 1.0)[0]
                                                         .finetune_after_metanet.epochs)},
      "accuracy_at_target": {
          "metanet": _stats([p["metanet"]["accuracy_after"] for p in per_seed]),
          "group_l2": _stats([p["group_l2"]["accuracy_after"] for p in per_seed]),
          "difference": _stats([p["metanet"]["accuracy_after"] - p["group_l2"]["accuracy_after"]
                                for p in per_seed])},
      "no_finetune_accuracy_at_target": {
          "metanet": _stats([p["no_finetune_at_target"]["metanet"] for p in per_seed]),
          "group_l2": _stats([p["no_finetune_at_target"]["group_l2"] for p in per_seed])},
      "per_seed": per_seed,
      "curves": {"speed_up_grid": grid.tolist(), **curve_summary},
  }
  pipeline.write_json(os.path.join(_OUT.value, "claim_digits.json"), res)
  _plot(res, curves, os.path.join(_OUT.value, "claim_digits.png"))
  print(json.dumps({k: v for k, v in res.items() if k != "curves"}, indent=1))


def _with_base(g, w):
  g = g.copy_and_resolve_references()
  g.base_workdir = w
  return g


def _plot(res, curves, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {"metanet": "tab:blue", "group_l2": "tab:gray"}
  labels = {"metanet": "metanetwork + finetune", "group_l2": "finetune only (group L2)"}
  for cu in curves:
    for name, c in cu.items():
      ax.plot(c["speed_ups"], c["accuracies"], color=colors[name], alpha=0.25, lw=0.8)
  grid = np.asarray(res["curves"]["speed_up_grid"])
  for name in ("metanet", "group_l2"):
    ax.plot(grid, res["curves"][name]["mean"], color=colors[name], lw=2, label=labels[name])
  ax.axvline(res["settings"]["target_speed_up"], color="k", ls=":", lw=1)
  ax.set_xlabel("speed-up (MACs)")
  ax.set_ylabel("test accuracy, no finetuning after pruning")
  acc = res["accuracy_at_target"]
  ax.set_title(f"digits, {len(curves)} seeds; at {res['settings']['target_speed_up']}x after "
               f"finetune: metanet {acc['metanet']['mean']:.4f}, group L2 "
               f"{acc['group_l2']['mean']:.4f}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
