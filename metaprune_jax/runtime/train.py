"""Training loops shared by every run mode: `fit` (train or finetune a possibly masked network
with a given schedule, resumable) and the `pretrain` mode built on it.

`fit` owns one run directory: Orbax checkpoints in `<dir>/checkpoints` (periodic, end of each
epoch, and on SIGTERM), per-epoch metrics as JSON lines in `<dir>/metrics.jsonl` and TensorBoard
events in `<dir>/tb/` (`metric_writers`), one log line per epoch and a tqdm bar per epoch. Resume
order: the directory's latest checkpoint (after checking it belongs to the same run signature),
else the variables given. The data position is the state's step, so a resumed run replays exactly
the batches an uninterrupted run would see, and ends with bit-identical parameters.
"""

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from metaprune_jax.backends import xla_hints
from metaprune_jax.runtime import checkpoint as ckpt_lib
from metaprune_jax.runtime import data as data_lib
from metaprune_jax.runtime import metric_writers
from metaprune_jax.runtime import optim
from metaprune_jax.runtime import sharding
from metaprune_jax.runtime import state as state_lib

KEEP = ("last", "best", "best_from_start")  # schedule.keep values (see `fit`)
START_EPOCH = -1  # FitResult.best_epoch when keep='best_from_start' kept the given network


class Preempted(SystemExit):
  """Raised after the SIGTERM checkpoint has been written (exit status 143)."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


@dataclasses.dataclass
class FitResult:
  """What `fit` returns.

  Attributes:
    variables: {'params', 'batch_stats'} of the kept epoch, masked.
    history: one dict of metrics per epoch.
    step: the final optimizer step.
    best_epoch: the epoch of `variables` (0-based; the last one for keep='last';
      ``START_EPOCH`` (-1) when keep='best_from_start' kept the given network).
  """

  variables: dict[str, Any]
  history: list[dict[str, Any]]
  step: int
  best_epoch: int


def _schedule_dict(schedule: Mapping[str, Any]) -> dict[str, Any]:
  d = schedule.to_dict() if hasattr(schedule, "to_dict") else dict(schedule)
  return json.loads(json.dumps(d, default=list))


def evaluate(arch, variables, masks, dataset: data_lib.Dataset, batch_size: int,
             mesh=None, split: str = "test") -> dict[str, float]:
  """Loss and accuracy of a network on one evaluation split (``'test'`` or ``'val'``).

  Args:
    arch: the Arch.
    variables: {'params', 'batch_stats'}.
    masks: {space: [width] float32} or None.
    dataset: the Dataset.
    batch_size: global eval batch (divisible by the device count).
    mesh: the mesh (default: all devices).
    split: 'test' (default) or 'val', the validation split carved from the training split.

  Returns:
    {'loss': mean CE, 'accuracy': fraction correct} over the whole split.

  Raises:
    ValueError: a batch size not divisible by the mesh's device count, an unknown split, or
      ``'val'`` on a dataset without a validation split.
  """
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh, "eval batch size")
  dataset = dataset.for_mesh(mesh)
  eval_fn = sharding.jit_eval_step(arch, mesh)
  variables = sharding.replicate(variables, mesh)
  masks = sharding.replicate(masks, mesh) if masks is not None else None
  totals = None
  for batch in dataset.eval_batches(batch_size, split):
    out = eval_fn(variables, masks, sharding.to_global(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count}


def check_validation_split(dataset: data_lib.Dataset, eval_batch: int, required: bool) -> None:
  """Raises ValueError when a selection needs the validation split and it cannot serve.

  ``required``: something is selected on it (keep='best'). The split must then be non-empty and
  hold at least one whole eval batch (smaller splits make the selection noise).
  """
  if not required:
    return
  if dataset.num_val == 0:
    raise ValueError(f"keep='best' selects on the validation split, but {dataset.spec.name!r} "
                     "has none (val_fraction 0): set val_fraction > 0 or keep='last'")
  if dataset.num_val < eval_batch:
    raise ValueError(f"the validation split of {dataset.spec.name!r} has {dataset.num_val} "
                     f"examples, fewer than one eval batch ({eval_batch}): raise val_fraction "
                     "or lower eval_batch_size")


def fit(schedule: Mapping[str, Any], arch, variables: dict[str, Any], masks,
        dataset: data_lib.Dataset, workdir: str, *, seed: int = 0,
        signature: Mapping[str, Any] | None = None, config: Any = None, mesh=None,
        desc: str = "train", sparsity: tuple[float, float, str] | None = None) -> FitResult:
  """Trains `variables` (masked by `masks`) with `schedule`, resuming from `workdir`.

  Args:
    schedule: config section with `epochs`, `batch_size`, `eval_batch_size`, `optimizer`,
      `lr`, `milestones`, `gamma`, `momentum`, `weight_decay`, `keep` ('last' epoch | 'best'
      validation-accuracy epoch | 'best_from_start': the same, with the given network as a
      candidate before the first epoch, kept only if no epoch is strictly better; the test
      split is only reported), `ckpt_every_steps` (0: end of epoch only), `max_to_keep`.
    arch: the Arch.
    variables: initial {'params', 'batch_stats'} (ignored when resuming).
    masks: {space: [width] float32} (pruned channels stay exactly zero) or None.
    dataset: the Dataset.
    workdir: this run's directory (checkpoints, metrics.jsonl).
    seed: seeds the data order/augmentation and the state's PRNG key.
    signature: extra identity of the run (checked on resume besides arch, dataset, schedule).
    config: the full config, stored beside the checkpoints.
    mesh: the mesh (default: all devices of all processes). In a multi-host job, a mesh over
      one process's devices (`sharding.local_mesh()`) makes an independent run of that process:
      it reads whole batches, checkpoints alone and writes the metrics (inside
      `checkpoint.process_local_checkpointing`).
    desc: progress-bar / log prefix.
    sparsity: ``(alpha, reg, normalizer)``: train with the group-norm regulariser of
      meta-training on the network's own weights added to the loss (DepGraph's sparse
      learning; ``steps.train_step``). None: plain cross-entropy.

  Returns:
    A FitResult.

  Raises:
    ValueError: batch sizes not divisible by the device count, unknown optimizer or keep, a
      mesh over several but not all processes.
    ckpt_lib.CheckpointError: the workdir holds another run or a corrupt checkpoint.
    FloatingPointError: a non-finite training loss (names the epoch's step range).
    Preempted: after saving on SIGTERM.
  """
  mesh = mesh or sharding.make_mesh()
  batch_size = int(schedule["batch_size"])
  eval_batch = int(schedule.get("eval_batch_size", batch_size))
  sharding.check_batch_size(batch_size, mesh)
  sharding.check_batch_size(eval_batch, mesh, "eval batch size")
  subset = sharding.is_process_subset(mesh)
  if subset and len(sharding.mesh_processes(mesh)) > 1:
    raise ValueError(f"fit runs on a mesh over every process or over one process's devices, "
                     f"not over processes {sharding.mesh_processes(mesh)} of "
                     f"{jax.process_count()}.")
  dataset = dataset.for_mesh(mesh)
  keep = schedule.get("keep", "last")
  if keep not in KEEP:
    raise ValueError(f"schedule.keep must be one of {KEEP}, got {keep!r}.")
  selects = keep != "last"
  check_validation_split(dataset, eval_batch, selects)
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  epochs = int(schedule["epochs"])
  total_steps = epochs * steps_per_epoch
  tx, lr_fn = optim.make_optimizer(schedule, steps_per_epoch)
  run_signature = {
    "arch": json.loads(arch.to_json()), "dataset": dataset.spec.name, "seed": int(seed),
    "schedule": _schedule_dict(schedule), "masked": masks is not None,
    **_schedule_dict(signature or {}),
  }
  if sparsity is not None:
    alpha, reg, normalizer = float(sparsity[0]), float(sparsity[1]), str(sparsity[2])
    if not reg > 0 or not alpha >= 1:
      raise ValueError(f"sparse learning needs reg > 0 and alpha >= 1, got reg={reg}, "
                       f"alpha={alpha}")
    sparsity = (alpha, reg, normalizer)
    run_signature["sparsity"] = list(sparsity)
  run_signature["schedule"].pop("ckpt_every_steps", None)  # may change between restarts
  run_signature["schedule"].pop("max_to_keep", None)

  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  state = state_lib.create_state(arch, variables, tx, rng, masks)
  best = state.variables if selects else {}
  arrays = sharding.replicate({"train": state, "best": best}, mesh)
  history: list[dict[str, Any]] = []
  best_acc, best_epoch = -1.0, -1

  workdir = os.path.abspath(workdir)
  is_chief = sharding.is_writer(mesh)
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=int(schedule.get("max_to_keep", 3)),
                               processes=sharding.mesh_processes(mesh) if subset else None)
  resumed = ckpt.latest_step() is not None
  if resumed:
    ckpt.check_signature(run_signature)
    arrays, meta = ckpt.restore(arrays)
    history = meta.get("history", [])
    best_acc, best_epoch = meta.get("best_accuracy", -1.0), meta.get("best_epoch", -1)
    logging.info("%s: resumed from %s at step %d.", desc, ckpt.directory, ckpt.latest_step())
  else:
    logging.info("%s: no checkpoint in %s; starting from the given variables.", desc, workdir)
  state, best = arrays["train"], arrays["best"]
  if keep == "best_from_start" and not resumed:  # the given network, before any epoch
    best_acc = evaluate(arch, state.variables, state.masks, dataset, eval_batch, mesh,
                        "val")["accuracy"]
    best_epoch = START_EPOCH
    logging.info("%s: the given network's val acc %.4f is the first candidate.", desc, best_acc)
  # The checkpoint's history is authoritative: lines and events of lost epochs are dropped.
  metrics = metric_writers.MetricWriter(workdir, history, (ckpt.latest_step() or 0) + 1,
                                        enabled=is_chief)

  def meta_at(step):
    return {"signature": run_signature, "arch": arch.to_json(), "history": history,
            "config": config.to_dict() if hasattr(config, "to_dict") else config,
            "best_accuracy": best_acc, "best_epoch": best_epoch, "keep": keep,
            "finished": step >= total_steps, "steps_per_epoch": steps_per_epoch}

  train_step = sharding.jit_train_step(arch, tx, mesh, sparsity)
  step = start_step = int(jax.device_get(state.step))
  ckpt_every = int(schedule.get("ckpt_every_steps", 0) or 0)
  try:
    with ckpt_lib.PreemptionGuard(local=subset) as guard:
      workers = int(config.get("data_workers", 0) or 0) if hasattr(config, "get") else 0
      batches = dataset.train_batches(batch_size, seed, start_step=step,
                                      num_steps=total_steps - step, num_workers=workers)
      while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        epoch_end = (epoch + 1) * steps_per_epoch
        sums, t0 = None, time.time()
        bar = tqdm.tqdm(total=steps_per_epoch, initial=first, desc=f"{desc} epoch {epoch + 1}/"
                        f"{epochs}", leave=False, disable=not is_chief, dynamic_ncols=True)
        while step < epoch_end:
          batch = sharding.to_global(next(batches), mesh)
          if step == start_step:  # compiled, and the compiler's memory released, before the run
            xla_hints.compile_and_release(train_step, state, batch)
          state, m = train_step(state, batch)
          sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
          step += 1
          bar.update(1)
          if ckpt_every and step % ckpt_every == 0 and step < epoch_end:
            ckpt.save(step, {"train": state, "best": best}, meta_at(step))
          if guard.should_stop(step):
            ckpt.save(step, {"train": state, "best": best}, meta_at(step))
            ckpt.wait()
            raise Preempted(step)
        bar.close()
        sums = jax.device_get(sums)
        num = step - epoch * steps_per_epoch - first
        train_loss = float(sums["loss"]) / num
        if not np.isfinite(train_loss):
          raise FloatingPointError(
            f"{desc}: non-finite training loss in epoch {epoch + 1} (steps "
            f"{epoch * steps_per_epoch + first}-{step - 1}); the last good checkpoint in "
            f"{ckpt.directory} is kept.")
        test = evaluate(arch, state.variables, state.masks, dataset, eval_batch, mesh)
        val = (evaluate(arch, state.variables, state.masks, dataset, eval_batch, mesh, "val")
               if dataset.num_val else {"loss": float("nan"), "accuracy": float("nan")})
        record = {"epoch": epoch + 1, "step": step, "lr": float(lr_fn(step - 1)),
                  "train_loss": train_loss, "train_accuracy": float(sums["accuracy"]) / num,
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "epoch_time_s": round(time.time() - t0, 3)}
        if "reg" in sums:
          record["train_reg"] = float(sums["reg"]) / num
        history.append(record)
        if selects and val["accuracy"] > best_acc:  # selected on validation only
          best_acc, best_epoch = val["accuracy"], epoch
          best = jax.tree.map(jnp.copy, state.variables)
        elif keep == "last":
          best_acc, best_epoch = val["accuracy"], epoch
        logging.info("%s epoch %d/%d: train loss %.4f acc %.4f | val acc %.4f | test loss %.4f "
                     "acc %.4f | lr %.4g | %.1fs", desc, epoch + 1, epochs, record["train_loss"],
                     record["train_accuracy"], val["accuracy"], test["loss"], test["accuracy"],
                     record["lr"], record["epoch_time_s"])
        metrics.write(step, record)
        ckpt.save(step, {"train": state, "best": best}, meta_at(step))
  finally:
    metrics.close()
    ckpt.close()
  final = best if selects else state.variables
  return FitResult(variables=final, history=history, step=step, best_epoch=best_epoch)


def load_run(workdir: str, subdir: str | None = None):
  """The latest checkpoint of a run, for research code that picks it up.

  Args:
    workdir: the run's workdir.
    subdir: a stage's directory inside it (None: the workdir itself, i.e. pretrain).

  Returns:
    (config, arch, variables, step): the config as a ConfigDict (None if not stored), the
    Arch, {'params', 'batch_stats'} as numpy arrays (the kept epoch's variables when the run
    finished with keep='best', else the latest state's), and the step.

  Raises:
    ckpt_lib.CheckpointError: no checkpoint or an unreadable one.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  from metaprune_jax.nets import arch as arch_lib  # pylint: disable=g-import-not-at-top

  directory = os.path.join(workdir, subdir) if subdir else workdir
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  if ckpt.latest_step() is None:
    raise ckpt_lib.CheckpointError(f"No checkpoint in {ckpt.directory}.")
  arrays, meta = ckpt.restore_raw()
  ckpt.close()
  train = arrays["train"]
  variables = {"params": train["params"], "batch_stats": train.get("batch_stats", {})}
  if meta.get("finished") and meta.get("keep", "last") != "last" and arrays.get("best"):
    variables = arrays["best"]
  config = meta.get("config")
  config = ml_collections.ConfigDict(config) if isinstance(config, dict) else config
  return config, arch_lib.Arch.from_json(meta["arch"]), variables, int(train["step"])
