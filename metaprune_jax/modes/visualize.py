"""The ``visualize`` mode: accuracy-vs-speed-up curves per metanetwork epoch (docs/design.md 2).

For every chosen meta-training epoch (``config.visualize.epochs``; empty: every saved one) the
first held-out data model (the validation split of meta-training, the reference's choice) goes
through that epoch's metanetwork, is finetuned with the "after metanetwork" schedule keeping the
best validation-accuracy epoch (``config.finetune_after_metanet`` with ``keep='best'``), and is
then pruned by a fresh progressive group-L2 pruning (``config.visualize.steps`` steps);
validation accuracy (the split carved from the training split: the curves are for choosing an
epoch) *without* finetuning is recorded at step 0 and after every step until the overall speed-up (the
data model's speed-up times this pruning's) reaches ``config.visualize.max_speed_up``. The same
curve without a metanetwork (the data model finetuned with the same schedule, as the reference's
baseline) is drawn beside them.

Outputs: ``<workdir>/visualize/curves.png`` and ``curves.json`` (``{key: {epoch, speed_ups,
accuracies, finetuned_accuracy, importance, ...}}``, ``key`` = ``epoch_XXX`` or ``baseline``),
and ``importance.png`` / ``importance.json``: the distribution of max-normalised group-L2 channel
importance of each finetuned network (histogram and the shares under 0.1 and 0.2), the
metanetwork's effect on what pruning sees. Each
finetune has its own resumable run directory ``visualize/<key>``; a curve whose settings match
the stored one is reused, not recomputed. The user picks the metanetwork epoch for ``prune`` by
looking at the curves (the reference has no automatic metric; ``config.visualize.
accuracy_threshold`` adds its optional one: the speed-up reached before the accuracy first falls
below the threshold).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import tqdm
from absl import logging

from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.modes import common
from metaprune_jax.modes.common import BASELINE, DIRNAME, curve_score, select_epoch  # noqa: F401
from metaprune_jax.prune import pruning
from metaprune_jax.runtime import data as data_lib
from metaprune_jax.runtime import datamodels
from metaprune_jax.runtime import train as train_lib



def held_out_model(config, root: str) -> datamodels.DataModel:
  """The first validation data model of ``root``'s data-model set (meta-training's split).

  Raises:
    ValueError: no data models, or too few for the validation split
      (``config.meta_train.val_fraction``).
  """
  indices = datamodels.list_data_models(root)
  if not indices:
    datamodels.load_data_model_set(root)  # raises the standard "run generate first" error
  val_fraction = float(config.get("meta_train", {}).get("val_fraction", 0.2))
  _, val_pos = common.split_models(len(indices), val_fraction)
  pos = int(config.visualize.get("data_model", 0))
  if not 0 <= pos < len(val_pos):
    raise ValueError(f"config.visualize.data_model={pos}: the validation split of {root} holds "
                     f"{len(val_pos)} data model(s)")
  return datamodels.load_data_model(root, indices[val_pos[pos]])


def accuracy_curve(arch, variables, evaluator: common.MaskedEvaluator, shape,
                   start_speed_up: float, max_speed_up: float, steps: int = 200,
                   criterion: str = "l2", normalizer: str = "max", desc: str = "curve") -> dict:
  """Accuracy (no finetune) along a fresh progressive pruning of ``variables``.

  Args:
    arch: the network's architecture at its (possibly already pruned) widths.
    variables: its ``{'params', 'batch_stats'}``.
    evaluator: a MaskedEvaluator for ``arch`` (its split: validation to choose, test to report).
    shape: the NCHW input shape MACs are counted at.
    start_speed_up: the network's own speed-up over the original (x-axis offset).
    max_speed_up: stop after the first step whose overall speed-up reaches this.
    steps, criterion, normalizer: the pruning schedule (the reference: 200, l2, max).
    desc: progress-bar label.

  Returns:
    ``{'speed_ups': [n], 'accuracies': [n], 'steps': [n]}`` lists, entry 0 the unpruned network.
  """
  hist, speeds = pruning.pruning_trajectory(arch, variables, shape, steps=steps,
                                            criterion=criterion, normalizer=normalizer)
  out = {"speed_ups": [float(start_speed_up)],
         "accuracies": [evaluator(variables, common.ones_like_masks(hist))["accuracy"]],
         "steps": [0]}
  for i in tqdm.tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True,
                     disable=jax.process_index() != 0):
    overall = float(start_speed_up * speeds[i])
    out["speed_ups"].append(overall)
    out["accuracies"].append(evaluator(variables, common.masks_at(hist, i))["accuracy"])
    out["steps"].append(i + 1)
    if overall >= max_speed_up:
      break
  return out


def speed_up_at_accuracy(curve: dict, threshold: float) -> float:
  """The speed-up of the last point before accuracy first falls below ``threshold``."""
  best = float("nan")
  for s, a in zip(curve["speed_ups"], curve["accuracies"]):
    if a < threshold:
      break
    best = s
  return best


IMPORTANCE_BINS = np.linspace(0.0, 1.0, 21)


def importance_histogram(arch, variables) -> dict:
  """The distribution of max-normalised group-L2 channel importance of a network.

  Args:
    arch: the architecture of ``variables``.
    variables: ``{'params', ...}``.

  Returns:
    ``{'bins': [21] edges on [0, 1], 'counts': [20], 'under_0.1', 'under_0.2', 'channels'}``
    over the channels of every pruning group.
  """
  from metaprune_jax.prune import groups as groups_lib  # pylint: disable=g-import-not-at-top
  imps = np.concatenate([np.asarray(i, np.float64).ravel()
                         for i in groups_lib.group_importance(arch, variables, "max")])
  counts, _ = np.histogram(np.clip(imps, 0.0, 1.0), IMPORTANCE_BINS)
  return {"bins": IMPORTANCE_BINS.tolist(), "counts": counts.tolist(),
          "under_0.1": float(np.mean(imps < 0.1)), "under_0.2": float(np.mean(imps < 0.2)),
          "channels": int(imps.size)}


def plot_importance(hists: dict, path: str, title: str = "") -> None:
  """Step histograms of normalised channel importance (one per network), saved as PNG.

  Args:
    hists: ``{label: importance_histogram(...)}``.
    path: the PNG path.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  cmap = plt.get_cmap("viridis")
  keys = [k for k in hists if k != BASELINE]
  for j, k in enumerate(keys):
    h = hists[k]
    share = np.asarray(h["counts"], np.float64) / max(h["channels"], 1)
    ax.stairs(share, h["bins"], color=cmap(j / max(len(keys) - 1, 1)), lw=1.2,
              label=f"{k}: {h['under_0.1']:.0%} under 0.1")
  if BASELINE in hists:
    h = hists[BASELINE]
    share = np.asarray(h["counts"], np.float64) / max(h["channels"], 1)
    ax.stairs(share, h["bins"], color="k", ls="--", lw=1.8,
              label=f"no metanetwork: {h['under_0.1']:.0%} under 0.1")
  ax.set_xlabel("normalised group-L2 importance (channel / max of its group)")
  ax.set_ylabel("share of channels")
  ax.set_title(title or "Channel importance")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(curves: dict, path: str, title: str = "",
                ylabel: str = "validation accuracy (no finetuning)") -> None:
  """Accuracy vs speed-up, one line per metanetwork epoch plus the baseline, saved as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  keys = sorted(k for k in curves if k != BASELINE)
  cmap = plt.get_cmap("viridis")
  for j, k in enumerate(keys):
    c = curves[k]
    ax.plot(c["speed_ups"], c["accuracies"], color=cmap(j / max(len(keys) - 1, 1)), lw=1.2,
            label=f"metanet epoch {c['epoch']}")
  if BASELINE in curves:
    c = curves[BASELINE]
    ax.plot(c["speed_ups"], c["accuracies"], "k--", lw=1.8, label="no metanetwork")
  ax.set_xlabel("speed-up (MACs, vs the original network)")
  ax.set_ylabel(ylabel)
  ax.set_title(title or "Pruning curves after the metanetwork")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def visualize(config, workdir: str) -> dict:
  """The ``visualize`` mode. Returns the curves dict also stored in ``curves.json``.

  Raises:
    ValueError: too few data models for the validation split, an epoch without a checkpoint,
      a metanetwork trained for another architecture.
    CheckpointError: no metanetwork checkpoints.
  """
  vc = config.visualize
  dataset = data_lib.dataset_from_config(config)
  shape = common.input_shape(dataset)
  dm_root = common.source_dir(config, "data_models_dir", workdir)
  mn_root = common.source_dir(config, "metanet_dir", workdir)
  out_dir = os.path.join(os.path.abspath(workdir), DIRNAME)
  dm = held_out_model(config, dm_root)
  available = common.metanet_epochs(mn_root)
  every = int(vc.get("every", 1) or 1)
  epochs = [int(e) for e in (vc.get("epochs", ()) or ())] or sorted(
      set(available[every - 1::every]) | set(available[-1:]))
  if not available:
    raise train_lib.ckpt_lib.CheckpointError(
        f"no metanetwork checkpoint in {os.path.join(mn_root, common.META_DIR)}; run "
        "`meta_train` first (config.metanet_dir points at its workdir)")
  missing = sorted(set(epochs) - set(available))
  if missing:
    raise ValueError(f"config.visualize.epochs asks for epochs {missing} that have no "
                     f"metanetwork checkpoint in {mn_root}; available: {available}")
  # Check the architecture before anything is written.
  common.load_metanet(mn_root, epochs[-1], arch=dm.full_arch)

  schedule = common.with_keep(config.finetune_after_metanet, "best")
  compat = bool(config.get("reference_compat", False))
  max_speed, steps = float(vc.max_speed_up), int(vc.get("steps", 200))
  criterion, normalizer = vc.get("criterion", "l2"), vc.get("normalizer", "max")
  settings = {"data_model": dm.index, "data_models_dir": dm_root, "metanet_dir": mn_root,
              "schedule": schedule.to_dict(), "max_speed_up": max_speed, "steps": steps,
              "criterion": criterion, "normalizer": normalizer, "reference_compat": compat,
              "seed": int(config.seed), "protocol": "val-split-v2"}
  settings = common.jsonable(settings)
  json_path = os.path.join(out_dir, "curves.json")
  stored = common.read_json(json_path) if os.path.exists(json_path) else {}
  curves = {k: c for k, c in stored.get("curves", {}).items() if c.get("settings") == settings}
  evaluator = common.MaskedEvaluator(dm.arch, dataset,
                                       int(vc.get("eval_batch_size", schedule.eval_batch_size)),
                                       "val")
  base_speed = float(dm.info["speed_up"])
  logging.info("visualize: data model %d (%s, speed-up %.3f, test accuracy %.4f); epochs %s",
               dm.index, dm.arch.name, base_speed, dm.info.get("test_accuracy") or float("nan"),
               epochs)
  todo = [BASELINE] + [f"epoch_{e:03d}" for e in epochs]
  for key in tqdm.tqdm(todo, desc="visualize", dynamic_ncols=True,
                       disable=jax.process_index() != 0):
    if key in curves:
      logging.info("visualize: %s reused from %s", key, json_path)
      continue
    epoch = None if key == BASELINE else int(key.split("_")[1])
    variables = {"params": dm.variables["params"], "batch_stats": dm.variables["batch_stats"]}
    if epoch is not None:
      mc, phi, _ = common.load_metanet(mn_root, epoch, arch=dm.full_arch)
      variables = metanet_lib.transform(mc, phi, dm.arch, variables, reference_compat=compat)
    elif compat and metanet_lib.scramble_applies(dm.arch):
      variables = metanet_lib.scramble_classifier(dm.arch, variables)  # as the reference
    before = evaluator(variables)["accuracy"]
    fitted = train_lib.fit(schedule, dm.arch, variables, None, dataset,
                           os.path.join(out_dir, key), seed=int(config.seed), config=config,
                           signature={"visualize": key, "data_model": dm.index},
                           desc=f"visualize {key} finetune")
    v = jax.device_get(fitted.variables)
    curve = accuracy_curve(dm.arch, v, evaluator, shape, base_speed, max_speed, steps, criterion,
                           normalizer, desc=f"{key} pruning curve")
    curve.update(epoch=epoch, settings=settings, accuracy_after_metanet=before,
                 finetuned_accuracy=curve["accuracies"][0], finetune_best_epoch=fitted.best_epoch,
                 importance=importance_histogram(dm.arch, v),
                 importance_input=importance_histogram(dm.arch, variables))
    thr = float(vc.get("accuracy_threshold", 0.0) or 0.0)
    if thr > 0:
      curve["speed_up_at_threshold"] = speed_up_at_accuracy(curve, thr)
    curves[key] = curve
    if jax.process_index() == 0:  # after every curve: a kill loses at most the current one
      common.write_json(json_path, {"data_model": dm.index, "arch": dm.arch.name,
                                      "data_model_speed_up": base_speed, "curves": curves})
    logging.info("visualize: %s finetuned accuracy %.4f; at %.2fx: %.4f", key,
                 curve["accuracies"][0], curve["speed_ups"][-1], curve["accuracies"][-1])
  shown = {k: curves[k] for k in todo}
  if jax.process_index() == 0:
    common.write_json(json_path, {"data_model": dm.index, "arch": dm.arch.name,
                                    "data_model_speed_up": base_speed, "curves": curves})
    plot_curves(shown, os.path.join(out_dir, "curves.png"),
                f"{dm.arch.name} on {dataset.spec.name}: data model {dm.index}")
    hists = {k: c["importance"] for k, c in shown.items()}
    common.write_json(os.path.join(out_dir, "importance.json"),
                        {"data_model": dm.index, "histograms": hists,
                         "metanet_outputs_before_finetune": {
                             k: c["importance_input"] for k, c in shown.items()}})
    plot_importance(hists, os.path.join(out_dir, "importance.png"),
                    f"{dm.arch.name}, data model {dm.index}: channel importance after the "
                    "finetune")
  print(f"visualize: curves in {os.path.join(out_dir, 'curves.png')} and {json_path}; "
        f"importance in {os.path.join(out_dir, 'importance.png')}", flush=True)
  return shown


