"""The ``prune`` mode: base network -> pruning by one of four methods -> report (docs/design.md 2).

Why one module of ~540 lines: it is one run mode, read top to bottom. Its inputs (base network,
budget, sparse-learning settings), its stage cache and stages, and its outputs (report, the
saved network, :func:`load_pruned`) share one settings hash and one order of checks before
anything is written; :func:`prune` is a linear script of the stages below. Other modes and users
reach it only through :func:`load_pruned` (via ``metaprune_jax.load_pruned``), so nothing would
gain from smaller files but the line count.

Methods (``config.prune.method``), all run through the same stages on the same budget:

* ``metanet``: the metanetwork (MetaPruning) then a finetune, then group-L2 pruning;
* ``sl``: DepGraph's sparse learning (training with the group-norm regulariser of meta-training
  on the network's own weights, ``config.prune.sl``), then group-L2 pruning;
* ``group_l2``: a plain finetune, then group-L2 pruning (DepGraph without sparse learning);
* ``random``: a plain finetune, then random channel choice (the floor);
* ``metanet_sl``: the metanetwork, then sparse learning instead of the plain finetune (does the
  metanetwork's output make a better start for sparse learning?), then group-L2 pruning.

Stages (each cached under ``config.prune.stage_dir`` ('' = ``<workdir>/prune/stages``) by a hash
of everything it depends on, so methods and targets that share a stage compute it once, and each
finetune has its own resumable ``fit`` run directory):

1. ``initial``: progressive group-L2 pruning of the base network to the initial speed-up
   (``config.prune.initial_speed_up``, 0: ``config.generate.initial_speed_up``), finetuned as the
   data models are (``config.generate.finetune``), then materialised: a network like those the
   metanetwork was trained on.
2. ``transform``: the method's stage of ``config.finetune_after_metanet.epochs`` epochs, keeping
   the last epoch (the metanetwork of epoch ``config.prune.metanet_epoch`` applied once and
   finetuned, where epoch 0 means the best on the validation curves ``visualize`` drew,
   :func:`metaprune_jax.modes.visualize.select_epoch`; sparse learning; or a plain finetune).
3. ``prune``: a fresh progressive pruning to ``target / speed_up_so_far``, finetuned "after
   pruning" keeping the best *validation*-accuracy epoch (``config.finetune_after_pruning``),
   then materialised.
4. ``report``: ``prune/report.json`` and ``<workdir>/report.json`` (speed-up vs the base network
   as an exact MACs ratio, validation and test accuracies, the budget, MACs/params, wall-clock
   inference speed-up of the materialised network), a table ``report.txt``, and the
   materialised network in Orbax (``prune/final``; :func:`load_pruned`) and in the reference's
   PyTorch state-dict format (``prune/final_state_dict.npz``, and ``.pth`` when torch is
   importable).

Every selection is made on the validation split (carved from the training split); the test
split is only reported. Everything is checked before anything is written: an unknown method,
bad sparse-learning settings, a missing base network, a metanetwork trained for another
architecture, a target the network cannot reach, or a ``prune/`` folder holding a run of other
settings stop with an error naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from metaprune_jax.backends import xla_hints
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.modes import common
from metaprune_jax.nets import cnn
from metaprune_jax.nets import inference
from metaprune_jax.nets import macs as macs_lib
from metaprune_jax.nets import reference
from metaprune_jax.nets.arch import Arch
from metaprune_jax.prune import groups as groups_lib
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.prune import pruning
from metaprune_jax.runtime import checkpoint as ckpt_lib
from metaprune_jax.runtime import data as data_lib
from metaprune_jax.runtime import train as train_lib

DIRNAME = "prune"
METHODS = ("metanet", "group_l2", "sl", "random", "metanet_sl")


# ------------------------------------------------------------------------------------ inputs


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
  base_dir = common.source_dir(config, "base_workdir", workdir)
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

  With ``fold`` (the default) the network is timed in its inference form
  (``inference.inference_form``): BatchNorm folded into the convolutions (networks without a
  foldable BatchNorm are timed as they are), as ``benchmarks/pruning.py`` times it, and its
  widths padded to the backend's channel multiple (8 on GPUs, none on the CPU).
  """
  if fold:
    arch, variables = inference.inference_form(arch, variables)
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
  """The materialised network a ``prune`` run saved: ``(arch at its widths, variables)``.

  Args:
    workdir: the run's workdir (the one passed to the ``prune`` mode).

  Returns:
    ``(arch, variables)``: the Arch at the pruned widths and its ``{'params',
    'batch_stats'}`` as numpy arrays, ready for ``apply_model(arch, variables, images [B, H,
    W, 3])``.

  Raises:
    CheckpointError: no pruned network in the workdir, or one that cannot be read.
  """
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
          ("test accuracy before", f"{report['accuracy_before']:.4f}"),
          ("test accuracy after", f"{report['accuracy_after']:.4f}"),
          ("val accuracy before/after", f"{report['val_accuracy_before']:.4f} -> "
                                        f"{report['val_accuracy_after']:.4f}"),
          ("budget (epochs)", f"{report['budget']['initial_finetune']} initial + "
                              f"{report['budget']['transform']} {report['budget']['transform_kind']}"
                              f" + {report['budget']['after_pruning']} after pruning"),
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


# ------------------------------------------------------------------------------------ stages
def importance_shares(arch: Arch, variables, thresholds=(0.1, 0.2)) -> dict:
  """Share of prunable channels whose max-normalised group-L2 importance is under each threshold.

  Args:
    arch: the architecture of ``variables``.
    variables: ``{'params', ...}``.
    thresholds: normalised-importance levels.

  Returns:
    ``{'under_0.1': share, 'under_0.2': share, 'channels': count}`` over every pruning group's
    channels (the groups of :func:`metaprune_jax.prune.groups.pruning_groups`).
  """
  imps = np.concatenate([np.asarray(i, np.float64).ravel() for i in
                         groups_lib.group_importance(arch, variables, "max")])
  out = {f"under_{t:g}": float(np.mean(imps < t)) for t in thresholds}
  out["channels"] = int(imps.size)
  return out


def _stage_key(*parts) -> str:
  """A short content hash of a stage's inputs (the chain of stages before it included)."""
  blob = json.dumps(common.jsonable(parts), sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


class _StageCache:
  """Finished stages, each in ``<root>/<name>-<key>/`` with its record in ``stage.json``.

  A stage's key hashes everything it depends on (its settings and its input stage's key), so
  runs of other targets or methods that share a stage (the initial pruning and finetune; the
  metanetwork-free finetune of ``group_l2`` and ``random``) compute it once, and a killed run
  resumes inside the stage's own ``fit`` directory.
  """

  def __init__(self, root: str, is_chief: bool):
    self.root, self.is_chief = root, is_chief

  def dir(self, name: str, key: str) -> str:
    return os.path.join(self.root, f"{name}-{key}")

  def get(self, name: str, key: str) -> dict | None:
    path = os.path.join(self.dir(name, key), "stage.json")
    return common.read_json(path) if os.path.exists(path) else None

  def put(self, name: str, key: str, record: dict) -> dict:
    record = common.jsonable(record)
    if self.is_chief:
      common.write_json(os.path.join(self.dir(name, key), "stage.json"), record)
    return record


def sl_settings(config) -> tuple[float, float, str] | None:
  """``(alpha, reg, normalizer)`` of the ``sl`` method, checked against the matched budget.

  Raises:
    ValueError: a non-positive strength, zero epochs, or epochs that differ from the
      transform budget (``config.finetune_after_metanet.epochs``) every method gets.
  """
  sl = config.prune.get("sl", None) or {}
  reg = float(sl.get("reg", 1e-2))
  alpha = float(sl.get("alpha", 16.0))
  budget = int(config.finetune_after_metanet.epochs)
  epochs = int(sl.get("epochs", -1))
  if not reg > 0:
    raise ValueError(f"config.prune.sl.reg={reg}: the sparse-learning strength must be > 0")
  if alpha < 1:
    raise ValueError(f"config.prune.sl.alpha={alpha}: gamma's base must be >= 1")
  if epochs == 0 or budget == 0:
    raise ValueError("sparse learning with zero epochs: config.prune.sl.epochs and "
                     "config.finetune_after_metanet.epochs (the budget it runs in) must be > 0")
  if epochs > 0 and epochs != budget:
    raise ValueError(f"config.prune.sl.epochs={epochs} cannot be matched to the transform "
                     f"budget every method gets (config.finetune_after_metanet.epochs={budget}): "
                     "set it to -1 (the budget) or change the budget")
  return alpha, reg, str(sl.get("normalizer", "max"))


def after_pruning_keep(config) -> str:
  """The after-pruning finetune's selection: 'best', or 'best_from_start' when the config asks
  for the pruned network before it as a candidate too (any other value selects 'best')."""
  keep = config.finetune_after_pruning.get("keep")
  return "best_from_start" if keep == "best_from_start" else "best"


def budget(config, method: str) -> dict:
  """Training epochs each stage of ``method`` gets (the same for every method)."""
  b = {"initial_finetune": int(config.generate.finetune.epochs),
       "transform": int(config.finetune_after_metanet.epochs),
       "after_pruning": int(config.finetune_after_pruning.epochs)}
  b["total"] = sum(b.values())
  b["transform_kind"] = TRANSFORMS[method]
  start = (", the pruned network before it counting as a candidate"
           if after_pruning_keep(config) == "best_from_start" else "")
  b["selection"] = (f"after-pruning finetune keeps its best validation-accuracy epoch{start}; "
                    "the transform keeps its last epoch; the test split is only reported")
  return b


# Stage 2 of each method, run on the same budget: the metanetwork then a finetune; DepGraph's
# sparse learning (CE + the group-norm regulariser on the network's own weights); a plain
# finetune (group L2 and random pruning).
TRANSFORMS = {"metanet": "metanet+finetune", "sl": "sparse_learning", "group_l2": "finetune",
              "random": "finetune", "metanet_sl": "metanet+sparse_learning"}


# -------------------------------------------------------------------------------------- mode
def prune(config, workdir: str) -> dict:
  """The ``prune`` mode. Returns the report (also written as JSON and a table).

  Every method runs the same stages on the same budget (:func:`budget`): the initial pruning
  and its finetune; the transform (``metanet``: metanetwork + finetune; ``sl``: sparse
  learning; ``group_l2`` / ``random``: plain finetune) for ``finetune_after_metanet.epochs``;
  pruning to the target (``random``: random channel choice, else group L2); the finetune
  after pruning, keeping its best *validation* epoch. Test accuracy is only reported.

  Raises:
    ValueError: unknown method, bad ``sl`` settings or budget, target speed-up <= the initial
      one or unreachable, a metanetwork for another architecture, ``prune/`` holding a run of
      other settings.
    CheckpointError: missing base network or metanetwork checkpoint.
  """
  pc = config.prune
  method = common.pruning_method(config)
  if method not in METHODS:
    raise ValueError(f"config.prune.method={method!r} is unknown; choose from {METHODS}")
  sparsity = sl_settings(config) if method in common.SPARSE_METHODS else None
  round_to = pruning.check_round_to(pc.get("round_to", 1))
  max_ratio = pruning.check_max_pruning_ratio(pc.get("max_pruning_ratio", 1.0))
  dataset = data_lib.dataset_from_config(config)
  shape = common.input_shape(dataset)
  workdir = os.path.abspath(workdir)
  out = os.path.join(workdir, DIRNAME)
  seed = int(config.seed)
  steps = int(pc.get("steps", 200))
  normalizer = pc.get("normalizer", "max")
  criterion = "random" if method == "random" else pc.get("criterion", "l2")
  compat = bool(config.get("reference_compat", False))
  eval_batch = int(config.finetune_after_pruning.eval_batch_size)
  train_lib.check_validation_split(dataset, eval_batch, True)

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
  mn_root = common.source_dir(config, "metanet_dir", workdir)
  mn_epoch, selection = None, None
  if method in common.METANET_METHODS:
    want = int(pc.get("metanet_epoch", -1))
    if want == 0:  # chosen on the validation curves of `visualize`
      here = os.path.exists(os.path.join(workdir, common.DIRNAME, "curves.json"))
      want, selection = common.select_epoch(workdir if here else mn_root)
      logging.info("prune: metanetwork epoch %d chosen on validation curves: %s", want,
                   selection)
    mc, phi, mn_epoch = common.load_metanet(mn_root, want, arch=arch)
  plan = budget(config, method)
  val_fraction = dataset.num_val / max(dataset.num_val + dataset.num_train, 1)
  signature = common.jsonable({
      "method": method, "target_speed_up": target, "initial_speed_up": initial,
      "base": base_src, "metanet_dir": mn_root if method in common.METANET_METHODS else None,
      "metanet_epoch": mn_epoch, "steps": steps, "criterion": criterion,
      "normalizer": normalizer, "seed": seed, "reference_compat": compat,
      "val_fraction": val_fraction, "sparsity": sparsity,
      "initial_finetune": config.generate.finetune.to_dict(),
      "transform": config.finetune_after_metanet.to_dict(),
      "finetune_after_pruning": config.finetune_after_pruning.to_dict()})
  state_path = os.path.join(out, "state.json")
  state = {"signature": signature, "stages": {}}
  if os.path.exists(state_path):
    state = common.read_json(state_path)
    diff = ckpt_lib.diff_signatures(state.get("signature", {}), signature)
    if diff:
      raise ValueError(f"{out} holds a prune run of other settings (differing: {diff}); "
                       "nothing was overwritten: use another workdir or restore the settings")
  st = state["stages"]
  is_chief = jax.process_index() == 0
  cache = _StageCache(os.path.abspath(pc.get("stage_dir", "") or os.path.join(out, "stages")),
                      is_chief)

  def commit(name, record):
    st[name] = common.jsonable(record)
    if is_chief:
      common.write_json(state_path, state)
    logging.info("prune: stage %s done: %s", name,
                 {k: v for k, v in record.items() if k != "keep"})

  if "report" in st and os.path.exists(os.path.join(out, "report.json")):
    logging.info("prune: already finished; report in %s", os.path.join(out, "report.json"))
    return common.read_json(os.path.join(out, "report.json"))

  def evaluators(a):
    return (common.MaskedEvaluator(a, dataset, eval_batch, "val"),
            common.MaskedEvaluator(a, dataset, eval_batch, "test"))

  base_val, base_test = evaluators(arch)
  if "base" not in st:
    commit("base", {"accuracy": base_test(base_vars)["accuracy"],
                    "val_accuracy": base_val(base_vars)["accuracy"], "source": base_src})

  # ---- 1. initial pruning + the data-model finetune (shared by every method and target)
  k1 = _stage_key("initial", base_src, st["base"]["accuracy"], initial, steps, normalizer, seed,
                  config.generate.finetune.to_dict(), val_fraction)
  rec1 = cache.get("initial", k1)
  if rec1 is None:
    res = pruning.prune_to_target(arch, base_vars, initial, shape, steps=steps,
                                  criterion="l2", normalizer=normalizer)
    masks1 = masks_lib.masks_from_keep(arch, _keep_lists(arch, res.masks))
    ft = train_lib.fit(config.generate.finetune, arch,
                       masks_lib.mask_variables(arch, base_vars, masks1), masks1, dataset,
                       os.path.join(cache.dir("initial", k1), "finetune"), seed=seed,
                       config=config, signature={"stage": "initial_finetune"},
                       desc="prune: initial finetune")
    small, v = masks_lib.materialize(arch, jax.device_get(ft.variables), masks1)
    sv, stest = evaluators(small)
    rec1 = cache.put("initial", k1, {
        "keep": _keep_lists(arch, res.masks), "speed_up": res.speed_up,
        "pruning_steps": res.steps,
        "accuracy_no_finetune": base_test(base_vars, res.masks)["accuracy"],
        "accuracy": stest(v)["accuracy"], "val_accuracy": sv(v)["accuracy"]})
  masks1 = masks_lib.masks_from_keep(arch, rec1["keep"])
  _, _, v1, _ = train_lib.load_run(os.path.join(cache.dir("initial", k1), "finetune"))
  small, v = masks_lib.materialize(arch, jax.device_get(v1), masks1)
  small_val, small_test = evaluators(small)
  commit("initial", rec1)

  # ---- 2. the method's transform on the same budget (keep the last epoch)
  kind = TRANSFORMS[method]
  k2 = _stage_key("transform", k1, kind, config.finetune_after_metanet.to_dict(),
                  {"metanet_dir": mn_root, "epoch": mn_epoch, "compat": compat}
                  if method in common.METANET_METHODS else None, sparsity)
  rec2 = cache.get("transform", k2)
  d2 = os.path.join(cache.dir("transform", k2), "finetune")
  if rec2 is None:
    rec2 = {"kind": kind, "importance_before": importance_shares(small, v)}
    vt = v
    if method in common.METANET_METHODS:
      vt = metanet_lib.transform(mc, phi, small, v, reference_compat=compat)
      rec2.update(metanet_epoch=mn_epoch, accuracy_metanet_output=small_test(vt)["accuracy"],
                  val_accuracy_metanet_output=small_val(vt)["accuracy"],
                  importance_metanet_output=importance_shares(small, vt))
    ft = train_lib.fit(common.with_keep(config.finetune_after_metanet, "last"), small, vt,
                       None, dataset, d2, seed=seed, config=config,
                       signature={"stage": "transform", "kind": kind},
                       desc=f"prune: {kind}", sparsity=sparsity)
    vt = jax.device_get(ft.variables)
    rec2.update(accuracy=small_test(vt)["accuracy"], val_accuracy=small_val(vt)["accuracy"],
                importance_after=importance_shares(small, vt))
    rec2 = cache.put("transform", k2, rec2)
  _, _, v, _ = train_lib.load_run(d2)
  v = jax.device_get(v)
  commit("transform", rec2)

  # ---- 3. pruning to the target + finetune "after pruning" (keep the best validation epoch;
  # with keep='best_from_start' the pruned network before the finetune is a candidate too)
  stage_target = target / rec1["speed_up"] * (1 + 1e-9)  # exact product >= target
  k3 = _stage_key("final", k2, stage_target, steps, criterion, normalizer, seed,
                  config.finetune_after_pruning.to_dict(), *((round_to,) if round_to > 1 else ()),
                  *((("max_pruning_ratio", max_ratio),) if max_ratio < 1.0 else ()))
  rec3 = cache.get("final", k3)
  d3 = os.path.join(cache.dir("final", k3), "finetune")
  if rec3 is None:
    try:
      res = pruning.prune_to_target(small, v, stage_target, shape, steps=steps,
                                    criterion=criterion, normalizer=normalizer,
                                    rng=jax.random.PRNGKey(seed), round_to=round_to,
                                    max_pruning_ratio=max_ratio)
    except ValueError as e:
      raise ValueError(f"prune: the overall target {target}x needs {stage_target:.4f}x more "
                       f"after the initial {rec1['speed_up']:.4f}x, which is "
                       f"unreachable: {e}") from e
    masks3 = masks_lib.masks_from_keep(small, _keep_lists(small, res.masks))
    rec3 = {"keep": _keep_lists(small, res.masks), "speed_up": res.speed_up,
            "pruning_steps": res.steps,
            "accuracy_no_finetune": small_test(v, masks3)["accuracy"],
            "val_accuracy_no_finetune": small_val(v, masks3)["accuracy"]}
    schedule = common.with_keep(config.finetune_after_pruning, after_pruning_keep(config))
    ft = train_lib.fit(schedule, small,
                       masks_lib.mask_variables(small, v, masks3), masks3, dataset, d3,
                       seed=seed, config=config, signature={"stage": "after_pruning"},
                       desc="prune: after-pruning finetune")
    rec3["best_epoch"] = ft.best_epoch
    rec3 = cache.put("final", k3, rec3)
  commit("prune", {k: rec3[k] for k in ("keep", "speed_up", "pruning_steps",
                                        "accuracy_no_finetune", "val_accuracy_no_finetune")})
  masks3 = masks_lib.masks_from_keep(small, rec3["keep"])
  _, _, v3, _ = train_lib.load_run(d3)
  final_arch, final_vars = masks_lib.materialize(small, jax.device_get(v3), masks3)
  final_vars = jax.device_get(final_vars)

  # ---- 4. report and the materialised network
  final_val, final_test = evaluators(final_arch)
  acc_after = final_test(final_vars)
  val_after = final_val(final_vars)
  base_macs, base_params = macs_lib.count_macs(arch, shape)
  macs, params = macs_lib.count_macs(final_arch, shape)
  batch, runs = int(pc.get("latency_batch", 128)), int(pc.get("latency_runs", 20))
  t_base = inference_seconds(arch, base_vars, dataset.image_hw, batch, runs)
  t_final = inference_seconds(final_arch, final_vars, dataset.image_hw, batch, runs)
  commit("after_pruning", {"accuracy": acc_after["accuracy"],
                           "val_accuracy": val_after["accuracy"],
                           "speed_up": base_macs / macs, "best_epoch": rec3["best_epoch"]})
  d = jax.devices()[0]
  report = {
      "method": method, "arch": arch.name, "dataset": dataset.spec.name,
      "target_speed_up": target, "speed_up": base_macs / macs,
      "accuracy_before": st["base"]["accuracy"], "accuracy_after": acc_after["accuracy"],
      "val_accuracy_before": st["base"]["val_accuracy"],
      "val_accuracy_after": val_after["accuracy"],
      "loss_after": acc_after["loss"], "macs": int(macs), "params": int(params),
      "base_macs": int(base_macs), "base_params": int(base_params),
      "mac_input_shape": list(shape), "widths": dict(final_arch.widths),
      "inference_speed_up": t_base / t_final, "base_latency_ms": 1e3 * t_base,
      "latency_ms": 1e3 * t_final, "latency_batch": batch, "latency_runs": runs,
      "inference_form": "BatchNorm folded into the convolutions, widths padded to "
                        "inference_channel_multiple (inference.inference_form), both networks",
      "inference_channel_multiple": xla_hints.inference_channel_multiple(),
      "round_to": round_to, "max_pruning_ratio": max_ratio,
      "device": f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}",
      "metanet_epoch": mn_epoch, "metanet_epoch_selection": selection, "budget": plan,
      "stage_dirs": {"initial": os.path.join(cache.dir("initial", k1), "finetune"),
                     "transform": d2, "final": d3},
      "split_sizes": {"train": dataset.num_train, "val": dataset.num_val,
                      "test": dataset.num_test},
      "stages": {k: {kk: vv for kk, vv in r.items() if kk != "keep"} for k, r in st.items()},
      "saved": {"orbax": os.path.join(out, "final"),
                "state_dict_npz": os.path.join(out, "final_state_dict.npz"),
                # the saved network keeps its BatchNorm layers (trainable, reference layout)
                "fast_form": "metaprune_jax.nets.inference.inference_form("
                             "*metaprune_jax.modes.prune.load_pruned(workdir))"},
  }
  if sparsity is not None:
    report["sl"] = {"alpha": sparsity[0], "reg": sparsity[1], "normalizer": sparsity[2]}
  # every process takes part in the Orbax save (it writes from process 0)
  save_pruned(os.path.join(out, "final"), final_arch, final_vars,
              {"accuracy": acc_after["accuracy"], "speed_up": report["speed_up"]})
  if is_chief:
    sd = reference.export_reference_state_dict(final_arch, final_vars, num_batches_tracked=True)
    np.savez(os.path.join(out, "final_state_dict.npz"), **sd)
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.save({k: torch.from_numpy(np.array(a)) for k, a in sd.items()},  # writable copies
                 os.path.join(out, "final_state_dict.pth"))
      report["saved"]["state_dict_pth"] = os.path.join(out, "final_state_dict.pth")
    except ImportError:  # torch is an optional extra; the .npz holds the same state dict
      logging.info("torch is not installed: no final_state_dict.pth (final_state_dict.npz has "
                   "the same arrays; `pip install torch==2.13.0` for the .pth)")
    table = _table(report)
    for d_ in (out, workdir):
      common.write_json(os.path.join(d_, "report.json"), report)
      with open(os.path.join(d_, "report.txt"), "w") as f:
        f.write(table)
    commit("report", {"path": os.path.join(out, "report.json")})
    print(table, end="", flush=True)
  return report
