"""The ``prune`` mode: base network -> metanetwork-assisted pruning -> report (DESIGN.md 2).

Stages (each resumable; ``<workdir>/prune/state.json`` records after every stage the masks
(kept channel indices) and speed-ups it produced, and each finetune has its own resumable
``fit`` run directory, so a killed run restarts at the stage and step where it stopped):

1. ``initial``: progressive group-L2 pruning of the base network to the initial speed-up
   (``config.prune.initial_speed_up``, 0: ``config.generate.initial_speed_up``), finetuned as the
   data models are (``config.generate.finetune``; run dir ``prune/initial_finetune``), then
   materialised: this is a network like those the metanetwork was trained on.
2. ``metanet``: the metanetwork of epoch ``config.prune.metanet_epoch`` (-1: the last) applied
   once, then finetuned "after metanetwork" keeping the last epoch
   (``config.finetune_after_metanet``; ``prune/after_metanet``). Skipped with
   ``config.prune.method='group_l2'`` (plain DepGraph-style pruning, for comparison).
3. ``prune``: a fresh progressive pruning to ``target / speed_up_so_far``, finetuned "after
   pruning" keeping the best-test-accuracy epoch (``config.finetune_after_pruning``;
   ``prune/after_pruning``), then materialised.
4. ``report``: ``prune/report.json`` and ``<workdir>/report.json`` (speed-up vs the base network
   as an exact MACs ratio, accuracies, MACs/params, wall-clock inference speed-up of the
   materialised network), a table ``report.txt``, and the materialised network in Orbax
   (``prune/final``; :func:`load_pruned`) and in the reference's PyTorch state-dict format
   (``prune/final_state_dict.npz``, and ``.pth`` when torch is importable).

Everything is checked before anything is written: a missing base network, a metanetwork trained
for another architecture, a target the network cannot reach, or a ``prune/`` folder holding a run
of other settings stop with an error naming the problem.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from metaprune_jax import checkpoint as ckpt_lib
from metaprune_jax import cnn
from metaprune_jax import data as data_lib
from metaprune_jax import groups as groups_lib
from metaprune_jax import inference
from metaprune_jax import macs as macs_lib
from metaprune_jax import masks as masks_lib
from metaprune_jax import meta_modes
from metaprune_jax import metanet as metanet_lib
from metaprune_jax import pipeline
from metaprune_jax import pruning
from metaprune_jax import reference
from metaprune_jax import train as train_lib
from metaprune_jax import xla_hints
from metaprune_jax.arch import Arch

DIRNAME = "prune"
METHODS = ("metanet", "group_l2")


# ------------------------------------------------------------------------------------ inputs
def pruning_method(config) -> str:
  """``config.pruning.method`` when set (the issue's spelling), else ``config.prune.method``."""
  alias = config.get("pruning", {}).get("method", "") if config.get("pruning") else ""
  return alias or config.prune.get("method", "metanet")


def load_base(config, workdir: str) -> tuple[Arch, dict, str]:
  """The base network: ``(arch, variables, source)``.

  From ``config.prune.base_state_dict`` (a reference state dict, ``.npz`` or ``.pth``, imported
  as ``config.arch``) when set, else the finished ``pretrain`` run in ``config.base_workdir``
  ('' = ``workdir``).

  Raises:
    CheckpointError: no finished pretrain run there.
  """
  sd_path = config.prune.get("base_state_dict", "") or ""
  if sd_path:
    dataset_classes = data_lib.SPECS[config.dataset].num_classes
    sd = reference.load_state_dict_file(sd_path)
    arch, variables = reference.import_reference_model(sd, config.arch, dataset_classes)
    return arch, variables, os.path.abspath(sd_path)
  base_dir = pipeline.source_dir(config, "base_workdir", workdir)
  if not os.path.exists(os.path.join(base_dir, "pretrain.json")):
    raise ckpt_lib.CheckpointError(
        f"no finished base network in {base_dir} ({os.path.join(base_dir, 'pretrain.json')} is "
        "missing): run the `pretrain` mode there first, point config.base_workdir at a pretrain "
        "workdir, or give a reference state dict in config.prune.base_state_dict")
  _, arch, variables, _ = train_lib.load_run(base_dir)
  return arch, variables, base_dir


def max_speed_up(arch: Arch, shape) -> float:
  """An upper bound of any pruning's speed-up: every prunable group cut to one channel."""
  base, _ = macs_lib.count_macs(arch, shape)
  least, _ = macs_lib.count_macs(
      arch.with_widths({g.space: 1 for g in groups_lib.pruning_groups(arch)}), shape)
  return base / least


def inference_seconds(arch: Arch, variables, image_hw, batch: int = 128, runs: int = 20,
                      fold: bool = True) -> float:
  """Median wall-clock seconds of one jitted eval-mode forward pass at ``batch`` images.

  With ``fold`` (the default) the network is timed in its inference form, BatchNorm folded into
  the convolutions (``inference.fold_batchnorm``; networks without a foldable BatchNorm are timed
  as they are), as ``benchmarks/pruning.py`` times it.
  """
  if fold:
    try:
      arch, variables = inference.fold_batchnorm(arch, variables)
    except ValueError:  # nothing to fold, or a BatchNorm not after a conv: time it as it is
      pass
  fn = jax.jit(lambda v, x: cnn.apply_model(arch, v, x),
               compiler_options=xla_hints.conv_compiler_options())
  v = jax.device_put({"params": variables["params"], "batch_stats": variables["batch_stats"]})
  x = jnp.zeros((batch, *image_hw, 3), jnp.float32)
  for _ in range(3):
    fn(v, x).block_until_ready()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn(v, x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(statistics.median(times))


def _keep_lists(arch, masks):
  return {s: [int(i) for i in k] for s, k in masks_lib.kept_indices(arch, masks).items()
          if s in arch.prunable_spaces}


def save_pruned(directory: str, arch: Arch, variables, meta: dict) -> None:
  """Saves a materialised network with Orbax (``<directory>/checkpoints/1``)."""
  c = ckpt_lib.Checkpointer(directory, max_to_keep=1, async_save=False)
  try:
    c.save(1, {"variables": jax.device_get(variables)}, {"arch": arch.to_json(), **meta})
  finally:
    c.close()


def load_pruned(workdir: str) -> tuple[Arch, dict]:
  """The materialised network a ``prune`` run saved: ``(arch at its widths, variables)``."""
  c = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), DIRNAME, "final"),
                            max_to_keep=1, async_save=False)
  try:
    if c.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"no pruned network in {c.directory}; run `prune` first")
    arrays, meta = c.restore_raw()
  finally:
    c.close()
  return Arch.from_json(meta["arch"]), arrays["variables"]


def _table(report: dict) -> str:
  rows = [("method", report["method"]),
          ("target speed-up", f"{report['target_speed_up']:.4g}x"),
          ("speed-up (MACs)", f"{report['speed_up']:.4f}x"),
          ("accuracy before", f"{report['accuracy_before']:.4f}"),
          ("accuracy after", f"{report['accuracy_after']:.4f}"),
          ("MACs", f"{report['base_macs']:,} -> {report['macs']:,}"),
          ("params", f"{report['base_params']:,} -> {report['params']:,}"),
          ("inference speed-up (wall clock)",
           f"{report['inference_speed_up']:.3f}x (batch {report['latency_batch']}: "
           f"{report['base_latency_ms']:.3f} ms -> {report['latency_ms']:.3f} ms, "
           f"{report['device']}, BatchNorm folded)")]
  for name, st in report["stages"].items():
    if "accuracy" in st:
      rows.append((f"  stage {name}", f"accuracy {st['accuracy']:.4f}" +
                   (f", speed-up {st['speed_up']:.4f}x" if "speed_up" in st else "")))
  w = max(len(r[0]) for r in rows)
  return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows) + "\n"


# -------------------------------------------------------------------------------------- mode
def prune(config, workdir: str) -> dict:
  """The ``prune`` mode. Returns the report (also written as JSON and a table).

  Raises:
    ValueError: unknown method, target speed-up <= the initial one or unreachable, a
      metanetwork for another architecture, ``prune/`` holding a run of other settings.
    CheckpointError: missing base network or metanetwork checkpoint.
  """
  pc = config.prune
  method = pruning_method(config)
  if method not in METHODS:
    raise ValueError(f"config.prune.method={method!r}; choose from {METHODS}")
  dataset = data_lib.get_dataset(config.dataset, config.get("data_dir"))
  shape = pipeline.input_shape(dataset)
  workdir = os.path.abspath(workdir)
  out = os.path.join(workdir, DIRNAME)
  seed = int(config.seed)
  steps = int(pc.get("steps", 200))
  criterion, normalizer = pc.get("criterion", "l2"), pc.get("normalizer", "max")
  compat = bool(config.get("reference_compat", False))

  # ---- checks, before anything is written
  arch, base_vars, base_src = load_base(config, workdir)
  target = float(pc.target_speed_up)
  initial = float(pc.get("initial_speed_up", 0.0) or config.generate.initial_speed_up)
  if not 1.0 < initial < target:
    raise ValueError(f"need 1 < initial speed-up ({initial}) < target speed-up ({target})")
  bound = max_speed_up(arch, shape)
  if target > bound:
    raise ValueError(f"target speed-up {target} is unreachable for {arch.name} at input "
                     f"{shape}: even one channel per prunable group gives only {bound:.3f}x; "
                     "nothing was written")
  mn_root = pipeline.source_dir(config, "metanet_dir", workdir)
  if method == "metanet":
    mc, phi, mn_epoch = meta_modes.load_metanet(mn_root, int(pc.get("metanet_epoch", -1)),
                                                arch=arch)
  signature = pipeline.jsonable({
      "method": method, "target_speed_up": target, "initial_speed_up": initial,
      "base": base_src, "metanet_dir": mn_root if method == "metanet" else None,
      "metanet_epoch": int(pc.get("metanet_epoch", -1)) if method == "metanet" else None,
      "steps": steps, "criterion": criterion, "normalizer": normalizer, "seed": seed,
      "reference_compat": compat, "initial_finetune": config.generate.finetune.to_dict(),
      "finetune_after_metanet": (config.finetune_after_metanet.to_dict()
                                 if method == "metanet" else None),
      "finetune_after_pruning": config.finetune_after_pruning.to_dict()})
  state_path = os.path.join(out, "state.json")
  state = {"signature": signature, "stages": {}}
  if os.path.exists(state_path):
    state = pipeline.read_json(state_path)
    diff = ckpt_lib.diff_signatures(state.get("signature", {}), signature)
    if diff:
      raise ValueError(f"{out} holds a prune run of other settings (differing: {diff}); "
                       "nothing was overwritten: use another workdir or restore the settings")
  st = state["stages"]
  is_chief = jax.process_index() == 0

  def commit(name, record):
    st[name] = pipeline.jsonable(record)
    if is_chief:
      pipeline.write_json(state_path, state)
    logging.info("prune: stage %s done: %s", name,
                 {k: v for k, v in record.items() if k != "keep"})

  if "report" in st and os.path.exists(os.path.join(out, "report.json")):
    logging.info("prune: already finished; report in %s", os.path.join(out, "report.json"))
    return pipeline.read_json(os.path.join(out, "report.json"))

  base_eval = pipeline.MaskedEvaluator(arch, dataset, config.finetune_after_pruning.eval_batch_size)
  if "base" not in st:
    commit("base", {"accuracy": base_eval(base_vars)["accuracy"], "source": base_src})

  # ---- 1. initial pruning + the data-model finetune
  if "initial" not in st:
    res = pruning.prune_to_target(arch, base_vars, initial, shape, steps=steps,
                                  criterion=criterion, normalizer=normalizer)
    commit("initial", {"keep": _keep_lists(arch, res.masks), "speed_up": res.speed_up,
                       "pruning_steps": res.steps,
                       "accuracy_no_finetune": base_eval(base_vars, res.masks)["accuracy"]})
  masks1 = masks_lib.masks_from_keep(arch, st["initial"]["keep"])
  ft = train_lib.fit(config.generate.finetune, arch,
                     masks_lib.mask_variables(arch, base_vars, masks1), masks1, dataset,
                     os.path.join(out, "initial_finetune"), seed=seed, config=config,
                     signature={"stage": "initial_finetune"}, desc="prune: initial finetune")
  small, v = masks_lib.materialize(arch, jax.device_get(ft.variables), masks1)
  small_eval = pipeline.MaskedEvaluator(small, dataset,
                                        config.finetune_after_pruning.eval_batch_size)
  if "initial_finetune" not in st:
    commit("initial_finetune", {"accuracy": small_eval(v)["accuracy"],
                                "speed_up": st["initial"]["speed_up"]})

  # ---- 2. metanetwork + finetune "after metanetwork" (keep last)
  if method == "metanet":
    if "metanet" in st:
      mn_epoch = int(st["metanet"]["epoch"])
      mc, phi, _ = meta_modes.load_metanet(mn_root, mn_epoch, arch=arch)
    v = metanet_lib.transform(mc, phi, small, v, reference_compat=compat)
    if "metanet" not in st:
      commit("metanet", {"epoch": mn_epoch, "accuracy": small_eval(v)["accuracy"]})
    ft = train_lib.fit(pipeline.with_keep(config.finetune_after_metanet, "last"), small, v, None,
                       dataset, os.path.join(out, "after_metanet"), seed=seed, config=config,
                       signature={"stage": "after_metanet"}, desc="prune: after-metanet finetune")
    v = jax.device_get(ft.variables)
    if "after_metanet" not in st:
      commit("after_metanet", {"accuracy": small_eval(v)["accuracy"]})

  # ---- 3. pruning to the target + finetune "after pruning" (keep best)
  if "prune" not in st:
    stage_target = target / st["initial"]["speed_up"] * (1 + 1e-9)  # exact product >= target
    try:
      res = pruning.prune_to_target(small, v, stage_target, shape, steps=steps,
                                    criterion=criterion, normalizer=normalizer)
    except ValueError as e:
      raise ValueError(f"prune: the overall target {target}x needs {stage_target:.4f}x more "
                       f"after the initial {st['initial']['speed_up']:.4f}x, which is "
                       f"unreachable: {e}") from e
    commit("prune", {"keep": _keep_lists(small, res.masks), "speed_up": res.speed_up,
                     "pruning_steps": res.steps,
                     "accuracy_no_finetune": small_eval(v, res.masks)["accuracy"]})
  masks3 = masks_lib.masks_from_keep(small, st["prune"]["keep"])
  ft = train_lib.fit(pipeline.with_keep(config.finetune_after_pruning, "best"), small,
                     masks_lib.mask_variables(small, v, masks3), masks3, dataset,
                     os.path.join(out, "after_pruning"), seed=seed, config=config,
                     signature={"stage": "after_pruning"}, desc="prune: after-pruning finetune")
  final_arch, final_vars = masks_lib.materialize(small, jax.device_get(ft.variables), masks3)
  final_vars = jax.device_get(final_vars)

  # ---- 4. report and the materialised network
  acc_after = pipeline.MaskedEvaluator(final_arch, dataset,
                                       config.finetune_after_pruning.eval_batch_size)(final_vars)
  base_macs, base_params = macs_lib.count_macs(arch, shape)
  macs, params = macs_lib.count_macs(final_arch, shape)
  batch, runs = int(pc.get("latency_batch", 128)), int(pc.get("latency_runs", 20))
  t_base = inference_seconds(arch, base_vars, dataset.image_hw, batch, runs)
  t_final = inference_seconds(final_arch, final_vars, dataset.image_hw, batch, runs)
  commit("after_pruning", {"accuracy": acc_after["accuracy"],
                           "speed_up": base_macs / macs, "best_epoch": ft.best_epoch})
  d = jax.devices()[0]
  report = {
      "method": method, "arch": arch.name, "dataset": dataset.spec.name,
      "target_speed_up": target, "speed_up": base_macs / macs,
      "accuracy_before": st["base"]["accuracy"], "accuracy_after": acc_after["accuracy"],
      "loss_after": acc_after["loss"], "macs": int(macs), "params": int(params),
      "base_macs": int(base_macs), "base_params": int(base_params),
      "mac_input_shape": list(shape), "widths": dict(final_arch.widths),
      "inference_speed_up": t_base / t_final, "base_latency_ms": 1e3 * t_base,
      "latency_ms": 1e3 * t_final, "latency_batch": batch, "latency_runs": runs,
      "inference_form": "BatchNorm folded into the convolutions (fold_batchnorm), both networks",
      "device": f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}",
      "metanet_epoch": st.get("metanet", {}).get("epoch"),
      "stages": {k: {kk: vv for kk, vv in r.items() if kk != "keep"} for k, r in st.items()},
      "saved": {"orbax": os.path.join(out, "final"),
                "state_dict_npz": os.path.join(out, "final_state_dict.npz"),
                # the saved network keeps its BatchNorm layers (trainable, reference layout)
                "fast_form": "metaprune_jax.inference.fold_batchnorm("
                             "*metaprune_jax.prune_mode.load_pruned(workdir))"},
  }
  # every process takes part in the Orbax save (it writes from process 0)
  save_pruned(os.path.join(out, "final"), final_arch, final_vars,
              {"accuracy": acc_after["accuracy"], "speed_up": report["speed_up"]})
  if is_chief:
    sd = reference.export_reference_state_dict(final_arch, final_vars, num_batches_tracked=True)
    np.savez(os.path.join(out, "final_state_dict.npz"), **sd)
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.save({k: torch.from_numpy(np.asarray(a)) for k, a in sd.items()},
                 os.path.join(out, "final_state_dict.pth"))
      report["saved"]["state_dict_pth"] = os.path.join(out, "final_state_dict.pth")
    except ImportError:  # torch is an optional extra; the .npz holds the same state dict
      logging.info("torch is not installed: no final_state_dict.pth (final_state_dict.npz has "
                   "the same arrays; `pip install torch==2.13.0` for the .pth)")
    table = _table(report)
    for d_ in (out, workdir):
      pipeline.write_json(os.path.join(d_, "report.json"), report)
      with open(os.path.join(d_, "report.txt"), "w") as f:
        f.write(table)
    commit("report", {"path": os.path.join(out, "report.json")})
    print(table, end="", flush=True)
  return report
