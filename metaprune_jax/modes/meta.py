"""The ``generate`` and ``meta_train`` run modes (docs/design.md sections 2 and 5).

``generate``: ``config.generate.num_models`` data models, each trained from scratch
(``config.generate.train``, default ``config.pretrain``), pruned with the group-L2 criterion to
``config.generate.initial_speed_up`` and finetuned (``config.generate.finetune``), stored with
:mod:`metaprune_jax.runtime.datamodels`. Every training run checkpoints in
``<workdir>/generate/model_XXXXX/{train,finetune}``, so a killed run resumes the model it was on;
finished models are skipped. On several processes each process trains its own share (model i on
process i % P, on its own devices; ``config.generate.per_process``), then all wait for each
other; ``per_process=False`` trains every model data parallel over all processes.

``meta_train``: the metanetwork (``config.metanet``) is trained over the first 80% of the data
models (generation order), validated on the rest every epoch, with AdamW and a step LR decay at
``config.meta_train.lr_milestones`` (epochs). One optimizer step takes
``config.meta_train.models_per_step`` data models (default: the device count, one per device;
the faithful single-device setting is 1), each with ``batches_per_model`` augmented training
batches of ``batch_size`` (the reference: every batch of the training set; its low-memory mode:
one). A checkpoint per epoch in ``<workdir>/meta_train/checkpoints/<epoch>`` (all kept, for
``visualize``); a restart resumes after the last complete epoch. A non-finite loss stops the run
with an error naming the epoch and the data models; the last good checkpoint stays. On several
processes each process builds the data batches of the models its devices hold.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metaprune_jax.backends import xla_hints
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.metanetwork import metatrain
from metaprune_jax.nets import cnn
from metaprune_jax.nets import zoo
from metaprune_jax.nets.arch import Arch
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.prune import pruning
from metaprune_jax.runtime import checkpoint as ckpt_lib
from metaprune_jax.runtime import data as data_lib
from metaprune_jax.runtime import datamodels
from metaprune_jax.runtime import metric_writers
from metaprune_jax.runtime import optim
from metaprune_jax.runtime import sharding
from metaprune_jax.runtime import train as train_lib
from metaprune_jax.modes import common
from metaprune_jax.modes import prune as prune_mode
from metaprune_jax.modes.common import (META_DIR, load_metanet,  # noqa: F401 (also public here)
                                        metanet_config_for, metanet_epochs, split_models)


def _root(config, key, workdir):
  d = config.get(key, "") or ""
  return os.path.abspath(d or workdir)


def input_shape(dataset) -> tuple:
  """NCHW shape MACs are counted at: the reference's 32x32 / 224x224, else the data's size."""
  h, w = dataset.image_hw
  return (1, 3, int(h), int(w))


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def generate(config, workdir: str) -> list[int]:
  """The ``generate`` mode; returns the indices of the complete data models."""
  dataset = data_lib.dataset_from_config(config)
  full = zoo.get_arch(config.arch, dataset.num_classes, widths=config.get("widths") or None)
  gen = config.generate
  root = _root(config, "data_models_dir", workdir)
  done = set(datamodels.list_data_models(root))
  num, procs, me = int(gen.num_models), jax.process_count(), jax.process_index()
  per_process = procs > 1 and bool(gen.get("per_process", True))
  if per_process:  # process p trains models p, p + P, ... on its own devices, alone
    mesh, mine, desc = sharding.local_mesh(), range(me, num, procs), f"data models (process {me})"
  else:  # every process takes part in every model (data parallel over all devices)
    mesh, mine, desc = sharding.make_mesh(), range(num), "data models"
  writer = sharding.is_writer(mesh)
  if per_process:  # the next stage reads every process's models: wait for them at the end
    timeout = int(float(gen.get("barrier_timeout_hours", 72.0)) * 3600)
    scope = ckpt_lib.process_local_checkpointing(f"metaprune_generate_done:{root}", timeout)
  else:
    scope = contextlib.nullcontext()
  with scope:
    _generate_models(config, workdir, dataset, full, root, mine, done, mesh, writer, desc)
  return datamodels.list_data_models(root)


def data_model_seed(config, index: int) -> int:
  """The seed data model ``index`` is made from (``generate`` stores it in the model's info)."""
  return int(config.seed) * 100003 + 1 + int(index)


def _generate_models(config, workdir, dataset, full, root, indices, done, mesh, writer, desc):
  """Trains, prunes, finetunes and stores the data models `indices` (those not `done`) on
  `mesh`; `writer`: this process stores them."""
  gen = config.generate
  init = jax.jit(cnn.init_variables, static_argnums=(0, 2))
  train_schedule = gen.get("train", None) or config.pretrain
  shape = input_shape(dataset)
  bar = tqdm.tqdm(indices, desc=desc, dynamic_ncols=True, disable=not writer)
  for i in bar:
    if i in done:
      continue
    seed = data_model_seed(config, i)
    base = os.path.join(workdir, "generate", f"model_{i:05d}")
    v = init(full, jax.random.fold_in(jax.random.PRNGKey(seed), 0), tuple(dataset.image_hw))
    trained = train_lib.fit(train_schedule, full, v, None, dataset, os.path.join(base, "train"),
                            seed=seed, config=config, mesh=mesh, desc=f"model {i} train")
    res = pruning.prune_to_target(full, trained.variables, float(gen.initial_speed_up), shape)
    v = masks_lib.mask_variables(full, trained.variables, res.masks)
    tuned = train_lib.fit(gen.finetune, full, v, res.masks, dataset, os.path.join(base, "finetune"),
                          seed=seed, config=config, mesh=mesh, desc=f"model {i} finetune")
    small, sv = masks_lib.materialize(full, tuned.variables, res.masks)
    keep = masks_lib.kept_indices(full, res.masks)
    last = tuned.history[-1] if tuned.history else {}
    info = {"seed": seed, "process": jax.process_index(), "speed_up": res.speed_up,
            "pruning_steps": res.steps,
            "train_accuracy": last.get("train_accuracy"), "train_loss": last.get("train_loss"),
            "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
            "accuracy_before_pruning": (trained.history[-1]["test_accuracy"]
                                        if trained.history else None)}
    if writer:
      datamodels.save_data_model(root, i, small, jax.device_get(sv), keep, info, full)
    logging.info("data model %d: speed-up %.3f, test accuracy %.4f", i, res.speed_up,
                 info["test_accuracy"] or float("nan"))
  if jax.process_count() > 1:
    logging.info("process %d: its data models are done", jax.process_index())


# ---------------------------------------------------------------------------------------------
# meta_train
# ---------------------------------------------------------------------------------------------


def make_meta_step(spec, full_arch: Arch, tx, mesh, alpha, reg, normalizer,
                   chunk: int = metatrain.DEFAULT_CHUNK, form: str = "absolute",
                   compat: bool = False, prune_aware=None, bn: str = "running",
                   imitate: float = 0.0, imitate_on: str = "weights"):
  """Jitted ``(phi, opt_state, slots[M], images[M,B,b,H,W,3], labels[M,B,b], reg_scale[]) ->
  (phi, opt_state, metrics)``; the model axis is sharded over the mesh's ``data`` axis (one lane
  of models per device, see :func:`metatrain.batched_loss_grads`); ``chunk``: images per scanned
  network forward/backward; ``form``: the regulariser's form (``absolute``, the reference's, or
  ``relative``); ``compat``: the reference's classifier scramble (``config.reference_compat``).

  The step's regulariser strength is ``reg * reg_scale`` (``reg_scale`` a float32 scalar, traced:
  a warm-up schedule, :func:`reg_warmup_scale`, compiles once); ``reg_scale=1`` is bit for bit
  the strength ``reg``. ``prune_aware=(speed_up, max_pruning_ratio, bn[, steps, lr])``: the loss also takes
  the cross-entropy of each transformed model pruned to ``speed_up``, its BatchNorm on
  ``bn`` (``running`` or ``batch``) statistics (``meta_train.prune_aware``, an extension, off by
  default); ``bn``: the data models' BatchNorm in the cross-entropy, ``running`` statistics (the
  reference's) or ``batch`` statistics (``meta_train.bn``, an extension); ``imitate``: the
  weight of each transformed model's distance to its slot's target (``meta_train.imitate_sl``,
  an extension; the slots then carry targets), on the ``imitate_on`` form
  (``meta_train.imitate_on``: ``weights``, ``activations`` or ``both``)."""
  model_sharded = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())

  def step(phi, opt_state, slots, images, labels, reg_scale):
    strength = jnp.float32(reg) * jnp.asarray(reg_scale, jnp.float32)
    g, m = metatrain.batched_loss_grads(spec, full_arch, phi, slots, images, labels, alpha,
                                        strength, normalizer, lanes=mesh.shape["data"],
                                        chunk=chunk, form=form, compat=compat,
                                        prune_aware=prune_aware, bn=bn, imitate=imitate,
                                        imitate_on=imitate_on)
    updates, opt_state = tx.update(g, opt_state, phi)
    return optax.apply_updates(phi, updates), opt_state, m
  return jax.jit(step, in_shardings=(repl, repl, model_sharded, model_sharded, model_sharded,
                                     repl),
                 out_shardings=(repl, repl, repl), donate_argnums=(0, 1),
                 compiler_options=xla_hints.conv_compiler_options(mesh.devices.flat))


def reg_warmup_scale(warmup_epochs: int, steps_per_epoch: int):
  """The regulariser's warm-up: ``step -> scale`` (``step`` counted from 0 over the whole run).

  ``warmup_epochs=0``: 1.0 at every step (no warm-up). Otherwise the scale rises linearly,
  ``(step + 1) / (warmup_epochs * steps_per_epoch)``, and stays 1.0 from the last step of epoch
  ``warmup_epochs`` on, so the metanetwork first learns to keep the networks' accuracy and meets
  the full strength only gradually (``meta_train.reg_warmup_epochs``).
  """
  total = int(warmup_epochs) * int(steps_per_epoch)
  if total <= 1:
    return lambda step: 1.0
  ramp = optax.linear_schedule(1.0 / total, 1.0, total - 1)
  return lambda step: float(ramp(step))


@functools.lru_cache(maxsize=8)
def _eval_fn(spec, full_arch, compat=False, batch_bn=False):
  def f(phi, slot, x, y, valid):
    th = metatrain.transformed_params(spec, phi, full_arch, slot)
    if compat:
      th = metanet_lib.scramble_classifier(full_arch, {"params": th}, slot.masks)["params"]
    logits = metatrain._logits(full_arch, th, slot.batch_stats, slot.masks, x, batch_bn)  # pylint: disable=protected-access
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * valid), jnp.sum((jnp.argmax(logits, -1) == y) * valid), jnp.sum(valid)
  return jax.jit(f, compiler_options=xla_hints.conv_compiler_options())


def validate_metanet(spec, full_arch, phi, slots, dataset, batch_size, max_batches,
                     compat=False, bn="running"):
  """Mean loss/accuracy of the transformed validation data models (no finetuning) on the
  validation split of the images (carved from the training split); ``compat``: with the
  reference's classifier scramble, as meta-training saw them; ``bn="batch"``: BatchNorm on each
  validation batch's statistics (its padding left out), as ``meta_train.bn="batch"`` trained
  them (the data models' running statistics no longer fit what the metanetwork returns)."""
  batch_bn = bn == "batch"
  f = _eval_fn(spec, full_arch, bool(compat), batch_bn)
  losses, accs = [], []
  for slot in slots:
    tot = np.zeros(3)
    for b, batch in enumerate(dataset.eval_batches(batch_size, "val")):
      if max_batches and b >= max_batches:
        break
      x, y, valid = batch["image"], batch["label"], batch["mask"]
      if batch_bn:  # padded rows must not enter the statistics: the valid rows come first
        n = int(np.sum(np.asarray(valid)))
        if n == 0:
          continue
        x, y, valid = x[:n], y[:n], valid[:n]
      out = f(phi, slot, x, y, valid)
      tot += np.array(jax.device_get(out), np.float64)
    losses.append(tot[0] / max(tot[2], 1))
    accs.append(tot[1] / max(tot[2], 1))
  return float(np.mean(losses)), float(np.mean(accs))


def sl_targets(config, dataset, models, root: str) -> list[dict]:
  """Each data model after sparse learning (``meta_train.imitate_sl``'s targets).

  Every data model is trained as the ``sl`` prune method trains a network in its transform
  stage (``config.finetune_after_metanet``, keeping the last epoch, with the group-norm
  regulariser of ``config.prune.sl`` on its own weights), from its own seed, in
  ``root/model_XXXXX`` (resumed and reused like any training run).

  Returns:
    The trained variables of each data model, at its own widths.
  """
  sparsity = prune_mode.sl_settings(config)
  schedule = common.with_keep(config.finetune_after_metanet, "last")
  out = []
  for m in tqdm.tqdm(models, desc="meta_train: sparse-learning targets", dynamic_ncols=True,
                     disable=jax.process_index() != 0):
    seed = int(m.info.get("seed", data_model_seed(config, m.index)))
    ft = train_lib.fit(schedule, m.arch, m.variables, None, dataset,
                       os.path.join(root, f"model_{m.index:05d}"), seed=seed, config=config,
                       signature={"stage": "sl_target"}, desc=f"sl target {m.index}",
                       sparsity=sparsity)
    out.append(jax.device_get(ft.variables))
  return out


def meta_train(config, workdir: str) -> dict:
  """The ``meta_train`` mode. Returns the last epoch's metrics."""
  mt = config.meta_train
  dataset = data_lib.dataset_from_config(config)
  root = _root(config, "data_models_dir", workdir)
  models = datamodels.load_data_model_set(root, expected=config.get("generate", {}).get(
      "num_models", None) if mt.get("require_all_models", True) else None)
  full = models[0].full_arch
  mc = metanet_config_for(config, full)
  spec = metatrain._spec(mc)  # pylint: disable=protected-access
  train_pos, val_pos = split_models(len(models), float(mt.get("val_fraction", 0.2)))
  logging.info("meta_train: %d data models (%d train, %d validation), %s", len(models),
               len(train_pos), len(val_pos), full.name)
  imitate = float(mt.get("imitate_sl", 0.0))
  targets = (sl_targets(config, dataset, models, os.path.join(os.path.abspath(workdir), META_DIR,
                                                              "sl_targets"))
             if imitate else [None] * len(models))
  slots = [metatrain.make_slot(full, m.variables, m.keep, t) for m, t in zip(models, targets)]

  mesh = sharding.make_mesh()
  per_step = int(mt.get("models_per_step", 0) or jax.device_count())
  sharding.check_batch_size(per_step, mesh, "meta_train.models_per_step")
  if per_step > len(train_pos):
    raise ValueError(f"meta_train.models_per_step={per_step} exceeds the {len(train_pos)} "
                     "training data models")
  steps_per_epoch = len(train_pos) // per_step
  epochs = int(mt.epochs)
  lr = optim.multistep_schedule(float(mt.lr), tuple(mt.lr_milestones), steps_per_epoch,
                                float(mt.get("gamma", 0.1)))
  tx = optim.adamw(lr, weight_decay=float(mt.weight_decay))
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 7)
  phi = metanet_lib.init_metanet(mc, key)
  opt_state = tx.init(phi)
  out_dir = os.path.join(os.path.abspath(workdir), META_DIR)
  phi, opt_state = sharding.replicate((phi, opt_state), mesh)  # restored onto these shardings
  ckpt = ckpt_lib.Checkpointer(out_dir, max_to_keep=None)
  signature = {"metanet": mc.to_dict(), "arch": json.loads(full.to_json()),
               "num_models": len(models), "meta_train": {k: v for k, v in mt.to_dict().items()
                                                         if k not in ("epochs", "chunk_size")},
               "seed": int(config.seed), "dataset": dataset.spec.name}
  compat = bool(config.get("reference_compat", False)) and metanet_lib.scramble_applies(full)
  if compat:  # only then: earlier checkpoints' signatures stay valid
    signature["reference_compat"] = True
  warmup = int(mt.get("reg_warmup_epochs", 0))
  if not warmup:  # likewise: without a warm-up, the signature of earlier checkpoints
    signature["meta_train"].pop("reg_warmup_epochs", None)
  aware = float(mt.get("prune_aware", 0.0))
  aware_steps = int(mt.get("prune_aware_steps", 0)) if aware else 0
  prune_aware = None
  if aware:  # (+ the pruned network's loss after a differentiated finetune of aware_steps)
    prune_aware = ((aware, float(config.prune.get("max_pruning_ratio", 1.0)),
                    str(mt.get("prune_aware_bn", "running")))
                   + ((aware_steps, float(mt.get("prune_aware_lr", 0.1))) if aware_steps else ()))
    signature["prune_aware"] = list(prune_aware)
  # keys at their off value stay out of the signature: earlier checkpoints stay valid
  off = (() if aware else ("prune_aware", "prune_aware_bn")) + (
      () if aware_steps else ("prune_aware_steps", "prune_aware_lr"))
  bn = str(mt.get("bn", "running"))
  if bn == "running":
    off += ("bn",)
  imitate_on = str(mt.get("imitate_on", "weights"))
  if imitate:  # the targets: sparse learning as the prune method `sl` runs it
    signature["imitate_sl"] = {"sl": list(prune_mode.sl_settings(config)),
                               "schedule": config.finetune_after_metanet.to_dict()}
  else:
    off += ("imitate_sl",)
  if not imitate or imitate_on == "weights":
    off += ("imitate_on",)
  for key in off:
    signature["meta_train"].pop(key, None)
  history, start = [], 0
  if ckpt.latest_step() is not None:
    ckpt.check_signature(signature)
    arrays, meta = ckpt.restore({"params": phi, "opt_state": opt_state})
    phi, opt_state = arrays["params"], arrays["opt_state"]
    history, start = meta.get("history", []), int(ckpt.latest_step())
    logging.info("meta_train: resumed after epoch %d from %s", start, ckpt.directory)
  step_fn = make_meta_step(spec, full, tx, mesh, float(mt.alpha), float(mt.reg),
                           str(mt.get("normalizer", "max")),
                           int(mt.get("chunk_size", metatrain.DEFAULT_CHUNK)),
                           str(mt.get("reg_form", "absolute")), compat, prune_aware, bn,
                           imitate, imitate_on)
  stacked = jax.device_get(metatrain.stack_slots([slots[p] for p in train_pos]))
  bsz, nb = int(mt.batch_size), int(mt.batches_per_model)
  if nb <= 0:  # the whole training split at every step (the reference's faithful setting)
    nb = dataset.steps_per_epoch(bsz)
  data_seed = int(config.seed) + 12345
  # Each process builds the whole data batches of the step's models that its devices hold.
  local_data = dataset.for_mesh(sharding.local_mesh())

  def step_inputs(epoch, s, ids, rows):
    """Slots, images [n, nb, bsz, H, W, 3] and labels [n, nb, bsz] of the step's models `rows`."""
    imgs, labs = [], []
    for j in rows:
      xs, ys = [], []
      for b in range(nb):
        k = ((epoch * steps_per_epoch + s) * per_step + int(j)) * nb + b
        bt = local_data.train_batch(bsz, data_seed, k)
        xs.append(bt["image"])
        ys.append(bt["label"])
      imgs.append(np.stack(xs))
      labs.append(np.stack(ys).astype(np.int32))
    return (jax.tree_util.tree_map(lambda a: a[ids[rows]], stacked), np.stack(imgs),
            np.stack(labs))
  scale_at = reg_warmup_scale(warmup, steps_per_epoch)
  metrics = metric_writers.MetricWriter(out_dir, history, start + 1,
                                        enabled=jax.process_index() == 0)
  try:
    for epoch in range(start, epochs):
      t0 = time.time()
      order = np.random.default_rng([data_seed, epoch]).permutation(len(train_pos))
      sums = []
      bar = tqdm.tqdm(range(steps_per_epoch), desc=f"meta_train epoch {epoch + 1}/{epochs}",
                      leave=False, dynamic_ncols=True, disable=jax.process_index() != 0)
      for s in bar:
        ids = order[s * per_step:(s + 1) * per_step]
        inputs = sharding.rows_to_global(
            functools.partial(step_inputs, epoch, s, ids), per_step, mesh)
        reg_scale = np.float32(scale_at(epoch * steps_per_epoch + s))
        inputs = (*inputs, sharding.replicate(reg_scale, mesh))
        if epoch == start and s == 0:  # the compiler's memory is released before the run
          xla_hints.compile_and_release(step_fn, phi, opt_state, *inputs)
        phi, opt_state, m = step_fn(phi, opt_state, *inputs)
        m = jax.device_get(m)
        if not np.all(np.isfinite(m["loss"])):
          bad = [models[train_pos[i]].index for i, ok in zip(ids, np.isfinite(m["loss"]))
                 if not ok]
          raise FloatingPointError(
              f"meta_train: non-finite loss in epoch {epoch + 1}, step {s + 1}, data model(s) "
              f"{bad}; the last good checkpoint (epoch {ckpt.latest_step()}) in "
              f"{ckpt.directory} is kept and a restart resumes from it")
        sums.append({k: float(np.mean(v)) for k, v in m.items()})
        bar.set_postfix(loss=f"{sums[-1]['loss']:.4g}")
      # every process validates alone (on its default device), the same models and batches
      val_loss, val_acc = validate_metanet(spec, full, jax.device_get(phi),
                                           [slots[p] for p in val_pos], local_data,
                                           int(mt.get("eval_batch_size", 500)),
                                           int(mt.get("val_batches", 0)), compat, bn)
      rec = {"epoch": epoch + 1, "lr": float(lr((epoch + 1) * steps_per_epoch - 1)),
             **{f"train_{k}": float(np.mean([d[k] for d in sums])) for k in sums[0]},
             **({"reg_scale": float(reg_scale)} if warmup else {}),
             "val_loss": val_loss, "val_accuracy": val_acc,
             "epoch_time_s": round(time.time() - t0, 2)}
      history.append(rec)
      logging.info("meta_train epoch %d/%d: loss %.4f (ce %.4f, reg %.4f) | val loss %.4f acc "
                   "%.4f | %.1fs", epoch + 1, epochs, rec["train_loss"], rec["train_ce"],
                   rec["train_reg"], val_loss, val_acc, rec["epoch_time_s"])
      metrics.write(epoch + 1, rec)
      ckpt.save(epoch + 1, {"params": phi, "opt_state": opt_state},
                {"signature": signature, "metanet_config": mc.to_dict(), "arch": full.to_json(),
                 "history": history, "epoch": epoch + 1,
                 "config": config.to_dict() if hasattr(config, "to_dict") else None})
  finally:
    metrics.close()
    ckpt.close()
  return history[-1] if history else {}


