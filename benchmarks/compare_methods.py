r"""A fair comparison of pruning methods: metanetwork, sparse learning, group L2 and random.

  python benchmarks/compare_methods.py --seeds=0,1,2,3,4 --targets=3.0,6.0,10.0 \
      --methods=metanet,group_l2,sl,random --out=/tmp/compare

For every seed the whole pipeline runs with ``config.seed = seed`` (``--config``, default the
shipped ``configs/digits.py``): pretrain the base network, generate the data models and
meta-train the metanetwork (only when ``metanet`` is compared), then the ``prune`` mode once per
(method, target), each in ``<out>/seed_<s>/<method>_<target>``. All runs of a seed share one
stage cache, so the initial pruning and its finetune are computed once per seed, and the
transform stage (metanetwork + finetune, sparse learning, or plain finetune) once per method.

The protocol (``metaprune_jax.modes.prune``): every method gets the same stages and epochs (the
budget is written in ``settings.budget``), every finetune after pruning keeps its best
*validation* epoch, and the test split is only reported. Besides the test accuracy after the
final finetune, each method's no-finetune accuracy-vs-speed-up curve is measured on the network
right before the final pruning (the transform's output), on the validation and the test split.

Writes ``<out>/compare.json``::

  {"settings": {...}, "targets": {"10.0": {"metanet": {"mean": .., "std": .., "values": [..],
   "val_mean": .., "val_values": [..], "speed_up": [..]}, "group_l2": {..}, ...}},
   "curves": {"metanet": {"speed_ups": [grid], "test_mean": [..], "test_std": [..],
              "val_mean": [..], "per_seed": {...}}, ...},
   "importance": {"metanet": {"under_0.1": [per seed], ...}, ...}}

and ``<out>/compare.png`` (accuracy after finetuning per target; the no-finetune curves).
Progress goes to stdout. A re-run with the same settings resumes (every stage is resumable);
an ``--out`` holding a comparison of other settings is an error and nothing is overwritten.
``--smoke`` shrinks every schedule to one epoch (the test of this script).

``--set=METHOD:FIELD=VALUE`` (repeatable) gives one method settings of its own, for a comparison
with each method at its validation-best settings, e.g. ``--set=sl:prune.sl.reg=0.03
--set=group_l2:finetune_after_pruning.lr=0.01``: only the method's own stages (``prune.*``,
the two finetune schedules) and never their epochs (the budget stays the same for every method).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (each a whole pipeline).")
_TARGETS = flags.DEFINE_list("targets", ["3.0", "6.0", "10.0"], "Overall MACs speed-ups.")
_METHODS = flags.DEFINE_list("methods", ["metanet", "group_l2", "sl", "random"], "Methods.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_CONFIG = flags.DEFINE_string("config", os.path.join(ROOT, "configs", "digits.py"),
                              "Config file, or file:arg (the shipped recipe by default).")
_REUSE = flags.DEFINE_string("reuse", "", "A folder whose seed_<s>/ hold finished pretrain runs "
                             "and data models of the same settings, to reuse.")
_CURVE_MAX = flags.DEFINE_float("curve_max", 0.0, "No-finetune curves stop at this speed-up "
                                "(0: the largest target).")
_SMOKE = flags.DEFINE_bool("smoke", False, "One epoch everywhere, 2 data models, 20 pruning "
                           "steps: checks the script, not the method.")
_PLOT = flags.DEFINE_bool("plot", True, "Write compare.png.")
_SET = flags.DEFINE_multi_string(
    "set", [], "METHOD:FIELD=VALUE, a setting for one method only (repeatable), e.g. "
    "sl:prune.sl.reg=0.03 or group_l2:finetune_after_pruning.lr=0.01: each method at its own "
    "validation-best settings. Only the method's own stages may differ (prune.*, the "
    "finetunes' schedules); their epochs may not (the budget is the same for every method).")


def load_config(path: str):
  """``get_config(arg)`` of a config file given as ``path`` or ``path:arg``."""
  arg = None
  if ":" in path and not os.path.exists(path):
    path, arg = path.rsplit(":", 1)
  spec = importlib.util.spec_from_file_location("_compare_config", os.path.abspath(path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def smoke(config):
  """The smallest settings that still run every stage (seconds per stage on a CPU)."""
  for sched in (config.pretrain, config.generate.train, config.generate.finetune,
                config.finetune_after_metanet, config.finetune_after_pruning):
    sched.epochs, sched.milestones = 1, ()
  config.generate.num_models = 2
  config.meta_train.epochs, config.meta_train.lr_milestones = 1, ()
  config.meta_train.val_fraction = 0.5
  config.meta_train.models_per_step = 1
  config.meta_train.batches_per_model = 1
  config.prune.steps = 20
  config.prune.latency_runs = 2
  return config


def check_args(methods, targets, seeds):
  """Raises ValueError naming the first bad argument (before anything is written)."""
  from metaprune_jax.modes import prune as prune_mode  # pylint: disable=g-import-not-at-top
  bad = [m for m in methods if m not in prune_mode.METHODS]
  if bad:
    raise ValueError(f"unknown method(s) {bad}; choose from {list(prune_mode.METHODS)}")
  if not methods or not targets or not seeds:
    raise ValueError("--methods, --targets and --seeds must each name at least one value")
  if any(t <= 1.0 for t in targets):
    raise ValueError(f"every target speed-up must be > 1, got {targets}")


# Per-method settings may touch only what each method runs alone (its transform, pruning and
# after-pruning finetune); everything before is shared by every method of a seed.
PER_METHOD_SECTIONS = ("prune", "finetune_after_metanet", "finetune_after_pruning")
_NOT_PER_METHOD = ("prune.method", "prune.target_speed_up", "prune.stage_dir",
                   "finetune_after_metanet.epochs", "finetune_after_pruning.epochs")


def parse_settings(items) -> dict:
  """``["sl:prune.sl.reg=0.03", ...]`` -> ``{"sl": {"prune.sl.reg": 0.03}}`` (values read as
  Python literals, else kept as strings). Raises ValueError naming a malformed item."""
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for item in items:
    method, sep, rest = item.partition(":")
    field, eq, value = rest.partition("=")
    if not sep or not eq or not method.strip() or not field.strip():
      raise ValueError(f"--set {item!r}: expected METHOD:FIELD=VALUE, e.g. sl:prune.sl.reg=0.03")
    try:
      value = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      value = value.strip()
    out.setdefault(method.strip(), {})[field.strip()] = value
  return out


def method_config(config, method: str, settings: dict):
  """A copy of ``config`` with ``settings[method]`` applied (``{dotted field: value}``).

  Raises:
    ValueError: a field outside the method's own stages, an epoch count (the budget every
      method gets), a field the config does not have, or a value of the wrong type.
  """
  c = copy.deepcopy(config)
  for field, value in settings.get(method, {}).items():
    path = field.split(".")
    if path[0] not in PER_METHOD_SECTIONS or field in _NOT_PER_METHOD:
      why = ("an epoch count: every method gets the same budget" if field.endswith(".epochs")
             else "not a setting of the method's own stages "
             f"({', '.join(PER_METHOD_SECTIONS)}, epochs and prune.method excepted)")
      raise ValueError(f"--set {method}:{field}: {why}")
    node = c
    for name in path[:-1]:
      node = node.get(name) if hasattr(node, "get") else None
    if not hasattr(node, "get") or path[-1] not in node:
      raise ValueError(f"--set {method}:{field}: the config has no field {field!r}")
    try:
      node[path[-1]] = value
    except TypeError as e:
      raise ValueError(f"--set {method}:{field}={value!r}: {e}") from e
  return c


def _has_data_models(d: str) -> bool:
  return os.path.isdir(os.path.join(d, "data_models"))


def curve_on_grid(curve: dict, grid: np.ndarray) -> np.ndarray:
  """A pruning curve's accuracy at each grid speed-up (the last step not past it; NaN beyond
  the curve's end)."""
  s = np.asarray(curve["speed_ups"])
  a = np.asarray(curve["accuracies"])
  idx = np.searchsorted(s, grid, side="right") - 1
  out = np.where(idx >= 0, a[np.clip(idx, 0, len(a) - 1)], a[0])
  return np.where(grid <= s[-1] * (1 + 1e-9), out, np.nan)


def summarise(results: dict, curves: dict, grid: np.ndarray) -> None:
  """Fills in, in place, each result's mean and std over its seeds (test and validation) and
  each method's no-finetune curves averaged over seeds on the speed-up ``grid``."""
  for cm in curves.values():
    cm["speed_ups"] = grid.tolist()
    for split in ("val", "test"):
      rows = np.stack([curve_on_grid(c[split], grid) for c in cm["per_seed"].values()])
      cm[f"{split}_mean"] = np.nanmean(rows, 0).tolist() if rows.size else []
      cm[f"{split}_std"] = np.nanstd(rows, 0).tolist() if rows.size else []
  for t in results.values():
    for r in t.values():
      for key, vals in (("", r["values"]), ("val_", r["val_values"])):
        r[f"{key}mean"] = float(np.mean(vals))
        r[f"{key}std"] = float(np.std(vals))


def run(config, seeds, targets, methods, out, reuse="", curve_max=0.0, plot=True,
        settings_per_method=None) -> dict:
  """Runs the comparison; returns (and writes) the compare.json dict.

  ``settings_per_method``: ``{method: {dotted field: value}}`` applied to that method's runs only
  (``method_config``), e.g. each method's validation-best learning rate; recorded in
  ``settings.per_method``.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from metaprune_jax.runtime import data as data_lib  # pylint: disable=g-import-not-at-top
  from metaprune_jax import modes  # pylint: disable=g-import-not-at-top
  from metaprune_jax.modes import common as pipeline  # pylint: disable=g-import-not-at-top
  from metaprune_jax.modes import config_check  # pylint: disable=g-import-not-at-top
  from metaprune_jax.modes import prune as prune_mode  # pylint: disable=g-import-not-at-top
  from metaprune_jax.runtime import train as train_lib  # pylint: disable=g-import-not-at-top
  from metaprune_jax.modes import visualize  # pylint: disable=g-import-not-at-top

  check_args(methods, targets, seeds)
  per_method = {m: dict(v) for m, v in (settings_per_method or {}).items() if v}
  stray = sorted(set(per_method) - set(methods))
  if stray:
    raise ValueError(f"settings for method(s) {stray} that are not compared ({methods})")
  configs = {m: method_config(config, m, per_method) for m in methods}
  for m in per_method:  # each method's own settings, checked as its prune run will see them
    probe = copy.deepcopy(configs[m])
    probe.mode, probe.prune.method = "prune", m
    config_check.check_config(probe, num_devices=1, num_local_devices=1, num_processes=1)
  for m in methods:
    if m in pipeline.SPARSE_METHODS:
      prune_mode.sl_settings(configs[m])
  out = os.path.abspath(out)
  curve_max = float(curve_max or max(targets))
  settings = pipeline.jsonable({
      "seeds": seeds, "targets": targets, "methods": methods, "config": config.to_dict(),
      "budget": {m: prune_mode.budget(configs[m], m) for m in methods},
      "curve_max": curve_max, "selection": "validation split (carved from train); test only "
      "reported", "reuse": reuse, **({"per_method": per_method} if per_method else {})})
  path = os.path.join(out, "compare.json")
  if os.path.exists(path):
    old = pipeline.read_json(path).get("settings", {})
    if {k: v for k, v in old.items() if k != "reuse"} != {
        k: v for k, v in settings.items() if k != "reuse"}:
      raise ValueError(f"{path} holds a comparison of other settings; nothing was overwritten: "
                       "use another --out")
  os.makedirs(out, exist_ok=True)
  dataset = data_lib.dataset_from_config(config)
  shape = pipeline.input_shape(dataset)
  results = {f"{t}": {m: {"values": [], "val_values": [], "speed_up": []} for m in methods}
             for t in targets}
  curves = {m: {"per_seed": {}} for m in methods}
  epochs_used = {}
  importance = {m: {"under_0.1": [], "under_0.2": [], "under_0.1_before": []} for m in methods}
  t0 = time.time()
  total, done = len(seeds) * len(targets) * len(methods), 0

  def say(msg):
    print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

  for seed in seeds:
    sd = os.path.join(out, f"seed_{seed}")
    c = copy.deepcopy(config)
    c.seed = int(seed)
    src = os.path.join(reuse, f"seed_{seed}") if reuse else ""
    base = src if src and os.path.exists(os.path.join(src, "pretrain.json")) else sd
    if not os.path.exists(os.path.join(base, "pretrain.json")):
      say(f"seed {seed}: pretrain")
      modes.get("pretrain")(c, sd)
    c.base_workdir = base
    if any(m in pipeline.METANET_METHODS for m in methods):
      dm = src if src and _has_data_models(src) else sd
      c.data_models_dir = dm
      if dm == sd:
        say(f"seed {seed}: generate {c.generate.num_models} data models")
        modes.get("generate")(c, sd)
      say(f"seed {seed}: meta_train {c.meta_train.epochs} epochs")
      modes.get("meta_train")(c, sd)
      c.metanet_dir = sd
      if any(int(configs[m].prune.get("metanet_epoch", -1)) == 0 for m in methods
             if m in pipeline.METANET_METHODS):
        say(f"seed {seed}: visualize (its validation curves choose the metanetwork epoch)")
        modes.get("visualize")(c, sd)
    c.prune.stage_dir = os.path.join(sd, "stages")
    for method in methods:
      report = None
      mc = method_config(c, method, per_method)
      for target in targets:
        p = copy.deepcopy(mc)
        p.mode = "prune"
        p.prune.method = method
        p.pruning.method = ""
        p.prune.target_speed_up = float(target)
        report = prune_mode.prune(p, os.path.join(sd, f"{method}_{target:g}"))
        r = results[f"{target}"][method]
        r["values"].append(report["accuracy_after"])
        r["val_values"].append(report["val_accuracy_after"])
        r["speed_up"].append(report["speed_up"])
        if method in pipeline.METANET_METHODS:
          epochs_used[f"{seed}"] = report["metanet_epoch"]
        done += 1
        say(f"seed {seed} {method:8s} @ {target:g}x: test {report['accuracy_after']:.4f} "
            f"(val {report['val_accuracy_after']:.4f}), reached {report['speed_up']:.3f}x "
            f"[{done}/{total}]")
      # the no-finetune curve of the network right before the final pruning
      tr = report["stages"]["transform"]
      importance[method]["under_0.1"].append(tr["importance_after"]["under_0.1"])
      importance[method]["under_0.2"].append(tr["importance_after"]["under_0.2"])
      importance[method]["under_0.1_before"].append(tr["importance_before"]["under_0.1"])
      _, arch, v, _ = train_lib.load_run(report["stage_dirs"]["transform"])
      v = jax.device_get(v)
      start = float(report["stages"]["initial"]["speed_up"])
      per = {}
      for split in ("val", "test"):
        ev = pipeline.MaskedEvaluator(arch, dataset,
                                      int(mc.finetune_after_pruning.eval_batch_size), split)
        per[split] = visualize.accuracy_curve(
            arch, v, ev, shape, start, curve_max, int(mc.prune.steps),
            "random" if method == "random" else "l2", mc.prune.get("normalizer", "max"),
            desc=f"{method} curve ({split})")
      curves[method]["per_seed"][f"{seed}"] = per

  summarise(results, curves, np.round(np.linspace(1.0, curve_max, 60), 4))
  summary = {"settings": settings, "targets": results, "curves": curves, "importance": importance,
             "metanet_epochs": epochs_used, "wall_s": round(time.time() - t0, 1)}
  pipeline.write_json(path, summary)
  if plot:
    plot_comparison(summary, os.path.join(out, "compare.png"))
  say(f"wrote {path}" + (f" and {os.path.join(out, 'compare.png')}" if plot else ""))
  return summary


COLORS = {"metanet": "tab:red", "sl": "tab:blue", "group_l2": "tab:green", "random": "tab:gray",
          "metanet_sl": "tab:purple"}


def plot_comparison(summary: dict, path: str) -> None:
  """Left: test accuracy after the final finetune per target (mean +- std over seeds); right:
  the no-finetune test-accuracy curves of the networks right before the final pruning."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  targets = sorted(summary["targets"], key=float)
  methods = summary["settings"]["methods"]
  n = len(summary["settings"]["seeds"])
  spare = iter(("tab:cyan", "tab:olive", "tab:brown", "tab:pink", "tab:orange"))
  colors = {m: COLORS.get(m) or next(spare, None) for m in methods}  # pooled rows' own labels
  for j, m in enumerate(methods):
    xs = np.arange(len(targets)) + (j - (len(methods) - 1) / 2) * min(0.18, 0.8 / len(methods))
    means = [summary["targets"][t][m]["mean"] for t in targets]
    stds = [summary["targets"][t][m]["std"] for t in targets]
    a1.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, color=colors[m], label=m)
    c = summary["curves"][m]
    mean, std = np.asarray(c["test_mean"]), np.asarray(c["test_std"])
    a2.plot(c["speed_ups"], mean, color=colors[m], label=m)
    a2.fill_between(c["speed_ups"], np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                    color=colors[m], alpha=0.15)
  a1.set_xticks(range(len(targets)), [f"{float(t):g}x" for t in targets])
  a1.set_xlabel("target speed-up (MACs)")
  a1.set_ylabel(f"test accuracy after the final finetune (mean +- std, {n} seeds)")
  a1.grid(alpha=0.3)
  a1.legend(fontsize=8)
  a2.set_xlabel("speed-up (MACs, vs the base network)")
  a2.set_ylabel("test accuracy, no finetuning")
  a2.set_title("pruning curves of the network before the final pruning", fontsize=9)
  a2.grid(alpha=0.3)
  a2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required")
  logging.set_verbosity(logging.WARNING)
  try:
    seeds = [int(s) for s in _SEEDS.value]
    targets = [float(t) for t in _TARGETS.value]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers and --targets numbers: {e}") from e
  methods = [m.strip() for m in _METHODS.value]
  try:
    check_args(methods, targets, seeds)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  config = load_config(_CONFIG.value)
  if _SMOKE.value:
    config = smoke(config)
  try:
    per_method = parse_settings(_SET.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  summary = run(config, seeds, targets, methods, _OUT.value, _REUSE.value, _CURVE_MAX.value,
                _PLOT.value, per_method)
  rows = []
  for t in sorted(summary["targets"], key=float):
    for m, r in summary["targets"][t].items():
      rows.append(f"  {float(t):5g}x  {m:9s} test {r['mean']:.4f} +- {r['std']:.4f}  "
                  f"(val {r['val_mean']:.4f})")
  print("\n".join(rows), flush=True)


if __name__ == "__main__":
  app.run(main)
