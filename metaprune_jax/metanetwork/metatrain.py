"""Meta-training: the loss of a metanetwork over data models, and its gradients (docs/design.md 5).

For one data model (parameters ``theta``, graph ``G``) and ``theta' = from_graph(metanet_phi(G))``
(running statistics from ``theta``)::

    loss(phi) = sum_b CE(f(x_b; theta'), y_b) + R(theta')

with ``f`` in eval mode and ``R`` the group-norm regulariser (:mod:`metaprune_jax.prune.regularizer`).

The gradient is computed as the reference does, but with one metanetwork pass: ``theta'`` and
its pullback come from a single ``jax.vjp``; the CE gradients of every data batch are summed
with respect to ``theta'`` (a ``lax.scan`` over batches, cheap: only the CNN), ``R``'s gradient is
added, and the sum is pulled back through ``from_graph`` and the metanetwork once.

Shapes are static across data models of one architecture: a data model is held embedded in the
full-width network with channel masks, and its graph is the full-width graph (gathered through
the full-width :class:`~metaprune_jax.graphs.layout.GraphLayout`, whose index arrays are *arguments* of
the jitted step) with the pruned channels' nodes marked invalid: the metanetwork's dense-block
path (:mod:`metaprune_jax.metanetwork.blocks`) ignores invalid nodes and their edges, so valid ones
compute what the materialised data model's graph computes, and outputs 0 for them (pruned
parameters stay exactly 0). One compilation serves every data model whatever its widths, and
a stack of data models is processed by ``vmap``, sharded over the mesh's ``data`` axis (each
device takes its own data models and batches; gradients are averaged).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.nets import cnn
from metaprune_jax.nets.arch import Arch
from metaprune_jax.prune import groups as groups_lib
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.prune import pruning
from metaprune_jax.prune.regularizer import regularizer


def cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1))


class ModelSlot(NamedTuple):
  """One data model in the static-shape form meta-training consumes (all jnp/np arrays).

  Fields:
    flat: ``[F]`` float32, the full-width embedded variables (:func:`graph.flatten_variables`).
    layout: ``graph_layout(full_arch).arrays()`` (int32 index arrays, the same for every
      data model of ``full_arch``).
    masks: ``{space: [width] float32}`` (they also mark the graph's valid nodes).
    batch_stats: the embedded running statistics (kept as they are, docs/design.md 3.1).
    target: None, or ``[F]`` float32: the embedded parameters the metanetwork's output is
      pulled towards (:func:`imitation_distance`; ``meta_train.imitate_sl``: the data model
      after sparse learning).
  """

  flat: Any
  layout: Any
  masks: Any
  batch_stats: Any
  target: Any = None


def make_slot(full_arch: Arch, variables: Mapping, keep: Mapping | None = None,
              target: Mapping | None = None) -> ModelSlot:
  """Packs a data model for meta-training.

  Args:
    full_arch: the full-width architecture (the padding budget).
    variables: the data model's variables, materialised (``keep`` given: the kept channel
      indices of each space) or already at full width (``keep`` None, unmasked).
    keep: ``{space: kept indices}`` of the data model inside ``full_arch``.
    target: optional variables of the same widths as ``variables`` (for example the data
      model after sparse learning), embedded the same way as ``ModelSlot.target``.
  """
  def embedded(v):
    return masks_lib.embed(full_arch, v, keep) if keep is not None else (
        v, masks_lib.full_masks(full_arch))
  variables, masks = embedded(variables)
  layout = graph_lib.graph_layout(full_arch)
  flat = graph_lib.flatten_variables(full_arch, variables)
  target_flat = None
  if target is not None:
    target_flat = np.asarray(graph_lib.flatten_variables(full_arch, embedded(target)[0]))
  return ModelSlot(np.asarray(flat), layout.arrays(), {k: np.asarray(v) for k, v in masks.items()},
                   jax.tree_util.tree_map(np.asarray, variables["batch_stats"]), target_flat)


def imitation_distance(full_arch: Arch, params, target_flat, masks=None) -> jax.Array:
  """How differently two networks share each pruning group's norm among its channels.

  ``sum over groups g of || sqrt(q_g(params)) - sqrt(q_g(target)) ||^2`` (a scalar, at most 2
  per group), where ``q_g`` is the group-L2 importance of each channel of ``g``
  (:func:`metaprune_jax.prune.groups.raw_group_importance`, what group-L2 pruning ranks) as a
  share of the group's total: scale-free, so it asks for the target's pattern of strong and
  weak channels, not its overall size (sparse learning, the target of
  ``meta_train.imitate_sl``, also shrinks every kernel about 4x, which BatchNorm undoes), and
  not for weight-level changes that cannot be told from the weights (docs/recipe_search.md, round
  13). Pruned channels (``masks``) are zero in both and add nothing.

  Args:
    full_arch: the architecture of ``params`` (full width when ``masks`` are given).
    params: the network's params.
    target_flat: ``[F]`` the target's flat variables (:attr:`ModelSlot.target`).
    masks: channel masks of an embedded network (its groups as meta-training's regulariser
      takes them) or None.

  Returns:
    ``[]`` float32. Traceable (``full_arch`` static).
  """
  target = graph_lib.unflatten_variables(full_arch, target_flat)["params"]
  total = jnp.float32(0.0)
  for g in groups_lib.pruning_groups(full_arch, ignore_classes=masks is None):
    total = total + _share_gap(full_arch, g, masks,
                               groups_lib.raw_group_importance(full_arch, params, g),
                               groups_lib.raw_group_importance(full_arch, target, g))
  return total


def _share_gap(full_arch: Arch, g, masks, mine, theirs) -> jax.Array:
  """``|| sqrt(mine / sum(mine)) - sqrt(theirs / sum(theirs)) ||^2`` for group ``g`` (``[width]``
  magnitudes each); 0 for a group the materialised network does not have
  (:func:`groups_lib.kept_as_group`)."""
  shares = [jnp.sqrt(a / (jnp.sum(a) + 1e-30) + 1e-12) for a in (mine, theirs)]
  term = jnp.sum(jnp.square(shares[0] - shares[1]))
  if masks is not None and g.space in masks:  # only the materialised network's groups
    term = jnp.where(groups_lib.kept_as_group(full_arch, g, masks), term, 0.0)
  return term


def bn_signal(arch: Arch, params, batch_stats, masks, x) -> dict:
  """Each BatchNorm layer's per-channel signal on ``x``: the root mean square of its output
  after a ReLU, BatchNorm on ``x``'s batch statistics (training mode, as the finetunes run it).

  Args:
    arch: the architecture of ``params`` (full width when ``masks`` are given).
    params, batch_stats: the network's variables (``batch_stats`` only fills the collection:
      training mode does not read it).
    masks: channel masks or None (a pruned channel's parameters are zero, so its signal is 0).
    x: ``[n, H, W, 3]`` images.

  Returns:
    ``{bn layer name: [width] float32}``. Traceable.
  """
  _, state = cnn.CNN(arch).apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, masks=masks,
      capture_intermediates=lambda mdl, _: isinstance(mdl, cnn.BatchNorm),
      mutable=["batch_stats", "intermediates"])
  out = {}
  for name, val in state["intermediates"].items():
    y = jax.nn.relu(val["__call__"][0])
    out[name] = jnp.sqrt(jnp.mean(jnp.square(y), axis=tuple(range(y.ndim - 1))) + 1e-12)
  return out


def activation_imitation_distance(full_arch: Arch, params, batch_stats, target_flat, x,
                                  masks=None) -> jax.Array:
  """:func:`imitation_distance` on what the channels carry instead of their weights.

  ``sum over groups g of || sqrt(s_g(params)) - sqrt(s_g(target)) ||^2``, where ``s_g`` is each
  channel's share of the group's signal: the sum over the group's BatchNorm layers of
  :func:`bn_signal` on ``x``. A channel whose kernels shrink is normalised back by BatchNorm and
  keeps its signal; only a channel whose BatchNorm scale and shift silence it, as sparse
  learning's do, loses it (docs/recipe_search.md, round 14). The target runs on the same images
  under ``stop_gradient``. Groups without a BatchNorm add nothing; on an embedded network a
  group pruned to exactly ``num_classes`` channels is left out, as in the materialised one.

  Args:
    full_arch: the architecture of ``params``.
    params: the network's params; batch_stats: its running statistics (unread).
    target_flat: ``[F]`` the target's flat variables (:attr:`ModelSlot.target`).
    x: ``[n, H, W, 3]`` images.
    masks: channel masks of an embedded network or None.

  Returns:
    ``[]`` float32. Traceable (``full_arch`` static).
  """
  target = jax.lax.stop_gradient(graph_lib.unflatten_variables(full_arch, target_flat)["params"])
  mine = bn_signal(full_arch, params, batch_stats, masks, x)
  theirs = bn_signal(full_arch, target, batch_stats, masks, x)
  total = jnp.float32(0.0)
  for g in groups_lib.pruning_groups(full_arch, ignore_classes=masks is None):
    bns = [m.layer for m in g.members if m.kind == "bn" and m.layer in mine]
    if not bns:
      continue
    total = total + _share_gap(full_arch, g, masks, sum(mine[l] for l in bns),
                               sum(theirs[l] for l in bns))
  return total


IMITATE_ON = ("weights", "activations", "both")


def stack_slots(slots) -> ModelSlot:
  """Stacks slots along a new leading "model" axis (for ``vmap``/sharding)."""
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *slots)


def _spec(config):
  return metanet_lib._spec(config)  # pylint: disable=protected-access


def transformed_params(spec, phi, full_arch: Arch, slot: ModelSlot, masked: bool = True):
  """``theta'`` params (full width, pruned channels exactly zero) of one slot. Traceable.

  ``masked``: the slot's masks mark pruned channels (False: the network is unmasked).
  """
  flat = jnp.asarray(slot.flat)
  g = graph_lib.graph_from_flat(slot.layout, flat)
  valid = graph_lib.node_valid(full_arch, slot.masks) if masked else None
  imp = None
  if spec.importance_input:
    params_in = graph_lib.unflatten_variables(full_arch, flat)["params"]
    imp = metanet_lib.node_importance(full_arch, params_in, slot.masks if masked else None,
                                      g.nodes.shape[0])
  out = metanet_lib._forward(spec, phi, g, metanet_lib.block_plan(full_arch), valid, imp)  # pylint: disable=protected-access
  new_flat = graph_lib.flat_from_graph(slot.layout, out, flat.shape[0])
  # the flat cotangent is a sum of one padded slice per leaf: computed once, not per gathered
  # element of flat_from_graph's transpose (0.3 s of a ResNet-56 meta step otherwise)
  new_flat = xla_hints.materialize_cotangent(new_flat)
  return graph_lib.unflatten_variables(full_arch, new_flat)["params"]


DEFAULT_CHUNK = 100  # images per scanned forward/backward of a data model's network


def chunk_size(batch: int, chunk: int) -> int:
  """The largest divisor of ``batch`` that is at most ``chunk`` (``chunk <= 0``: ``batch``)."""
  if chunk <= 0 or chunk >= batch:
    return batch
  return max(d for d in range(1, chunk + 1) if batch % d == 0)


def _chunks(images, labels, chunk: int):
  """``(xs [n, c, H, W, 3], ys [n, c], c, b)``: the ``[B, b]`` batches cut into chunks of
  ``c = chunk_size(b, chunk)`` images."""
  n_batches, b = images.shape[:2]
  c = chunk_size(b, chunk)
  return (images.reshape(n_batches * b // c, c, *images.shape[2:]),
          labels.reshape(n_batches * b // c, c), c, b)


def _logits(arch: Arch, params, batch_stats, masks, x, batch_bn: bool):
  """The network's logits on ``x``: eval mode, or BatchNorm on ``x``'s batch statistics
  (training mode; the running statistics are not updated)."""
  v = {"params": params, "batch_stats": batch_stats}
  if batch_bn:
    return cnn.apply_model(arch, v, x, train=True, masks=masks)[0]
  return cnn.apply_model(arch, v, x, masks=masks)


def network_grads(arch: Arch, params, batch_stats, masks, images, labels,
                  chunk: int = DEFAULT_CHUNK, batch_bn: bool = False):
  """Gradient of the summed per-batch mean cross-entropy of the network (eval mode).

  Args:
    arch: the architecture of ``params`` (full width when ``masks`` are given).
    params, batch_stats: the network's variables.
    masks: channel masks or None.
    images: ``[B, b, H, W, 3]``; labels ``[B, b]``.
    chunk: images per scanned forward/backward (:func:`chunk_size`).
    batch_bn: BatchNorm with each chunk's batch statistics (training mode; the running
      statistics are not updated) instead of the running ones.

  Returns:
    ``(grads like params, sum over the B batches of their mean CE, accuracy)``.
  """
  xs, ys, c, b = _chunks(images, labels, chunk)

  def step(carry, xy):
    g_acc, l_acc, a_acc = carry
    x, y = xy

    def ce(th):
      logits = _logits(arch, th, batch_stats, masks, x, batch_bn)
      # this chunk's share of its batch's mean cross-entropy
      return cross_entropy(logits, y) * (c / b), jnp.sum(jnp.argmax(logits, -1) == y)
    (l, a), g = jax.value_and_grad(ce, has_aux=True)(params)
    return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, a_acc + a), None
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  # convolutions inside the scan use cnn.conv2d's explicit backward (fast in loops too)
  (g, ce_sum, correct), _ = jax.lax.scan(step, (zeros, 0.0, 0), (xs, ys))
  return g, ce_sum, correct / (xs.shape[0] * c)


def unrolled_finetune_grads(arch: Arch, params, batch_stats, masks, images, labels,
                            steps: int, lr: float, chunk: int = DEFAULT_CHUNK,
                            batch_bn: bool = False):
  """Gradient, through ``steps`` of plain SGD, of the network's loss after that finetune.

  The network (under ``masks``) takes ``steps`` SGD steps of learning rate ``lr`` on the
  cross-entropy of the first ``steps`` chunks of ``images`` (cycled when there are fewer), then
  its loss is the summed per-batch mean cross-entropy over all of ``images`` (as
  :func:`network_grads`). The gradient flows back through every update (second order), so it
  says how the starting parameters should change for the finetuned network to be better: what
  a pruned network's finetune makes of it, in a few differentiable steps.

  Args:
    arch, params, batch_stats, masks: as :func:`network_grads` (``masks``: the pruned network,
      at full width; masked channels stay zero through the updates).
    images: ``[B, b, H, W, 3]``; labels ``[B, b]``.
    steps: SGD steps (>= 1).
    lr: their learning rate.
    chunk: images per step and per evaluated piece (:func:`chunk_size`).
    batch_bn: BatchNorm on batch statistics (training mode, running statistics not updated).

  Returns:
    ``(grads like params, loss)``: the loss is the sum over the ``B`` batches of the finetuned
    network's mean cross-entropy.
  """
  xs, ys, c, b = _chunks(images, labels, chunk)
  idx = np.arange(steps) % xs.shape[0]
  fx, fy = xs[idx], ys[idx]

  def logits_of(th, x):
    return _logits(arch, th, batch_stats, masks, x, batch_bn)

  def loss(th0):
    def sgd(th, xy):
      x, y = xy
      g = jax.grad(lambda t: cross_entropy(logits_of(t, x), y))(th)
      return jax.tree_util.tree_map(lambda a, d: a - lr * d, th, g), None
    th, _ = jax.lax.scan(sgd, th0, (fx, fy))

    def piece(total, xy):
      x, y = xy
      return total + cross_entropy(logits_of(th, x), y) * (c / b), None
    total, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32), (xs, ys))
    return total
  value, g = jax.value_and_grad(loss)(params)
  return g, value


def _model_loss_grads(spec, full_arch, phi, slot, images, labels, alpha, reg, normalizer,
                      use_masks=True, compat=False, chunk=DEFAULT_CHUNK, form="absolute",
                      prune_aware=None, batch_bn=False, imitate=0.0, imitate_on="weights"):
  """Per-slot ``(loss, ce, r, d, accuracy, grads_phi)``; images ``[B, b, H, W, 3]``.

  The network runs in eval mode (running BatchNorm statistics, docs/design.md section 5), so its
  loss is a sum over images (``batch_bn``, an extension: BatchNorm on each chunk's batch
  statistics instead, as in training, where shrinking a channel's producer is normalised away
  and only its BatchNorm scale and shift and its readers decide the loss;
  ``prune_aware=(speed_up, max_pruning_ratio[, bn[, steps, lr]])``: plus the same cross-entropy
  of the transformed network pruned by group L2 to ``speed_up`` over the data model,
  :func:`pruning.traced_prune_masks`, no gradient through the choice;
  ``bn='batch'``: that pruned network's BatchNorm uses batch statistics; ``steps > 0``: its
  cross-entropy after ``steps`` differentiated SGD steps of rate ``lr``,
  :func:`unrolled_finetune_grads`): :func:`network_grads` cuts the ``B * b`` images into chunks
  (``chunk_size(b, chunk)`` images) and a ``lax.scan`` accumulates the cross-entropy gradient
  with respect to the transformed parameters, one chunk at a time. The loss is the
  reference's: the sum over batches of each batch's mean cross-entropy. Chunking bounds the
  activation memory (linear in the chunk) and is faster on CPU too (ResNet-56, 500 images:
  7.1 s in one piece, 4.3-4.4 s in chunks of 50-100, cache-sized activations).

  ``imitate > 0`` (an extension, with ``slot.target``): the loss also takes ``imitate *
  d``, ``d`` the :func:`imitation_distance` of the transformed parameters to the slot's target
  (0 when off); ``imitate_on="activations"``: :func:`activation_imitation_distance` on the
  first chunk of ``images`` instead; ``"both"``: the sum of the two.
  """
  masks = slot.masks if use_masks else None

  def theta_fn(p):
    th = transformed_params(spec, p, full_arch, slot, masked=use_masks)
    if compat:
      th = metanet_lib.scramble_classifier(full_arch, {"params": th}, masks)["params"]
    return th
  theta, pull = jax.vjp(theta_fn, phi)
  g_ce, ce_sum, accuracy = network_grads(full_arch, theta, slot.batch_stats, masks, images,
                                         labels, chunk, batch_bn=batch_bn)
  if prune_aware is not None:  # (speed_up, max_pruning_ratio): also the pruned network's CE
    speed_up, max_ratio, *rest = prune_aware
    pruned_bn = bool(rest and rest[0] == "batch")
    steps = int(rest[1]) if len(rest) > 1 else 0
    h, w = images.shape[-3:-1]
    pruned = pruning.traced_prune_masks(full_arch, theta, masks, speed_up, (1, 3, h, w),
                                        normalizer=normalizer, max_pruning_ratio=max_ratio)
    if steps:  # the pruned network's loss after a short, differentiated finetune
      g_p, ce_p = unrolled_finetune_grads(full_arch, theta, slot.batch_stats, pruned, images,
                                          labels, steps, float(rest[2]), chunk, pruned_bn)
    else:
      g_p, ce_p, _ = network_grads(full_arch, theta, slot.batch_stats, pruned, images, labels,
                                   chunk, batch_bn=pruned_bn)
    g_ce = jax.tree_util.tree_map(jnp.add, g_ce, g_p)
    ce_sum = ce_sum + ce_p
  r, g_r = jax.value_and_grad(
      lambda th: regularizer(full_arch, {"params": th}, alpha, reg, normalizer,
                             masks=masks, form=form))(theta)
  g_theta = jax.tree_util.tree_map(jnp.add, g_ce, g_r)
  d = jnp.float32(0.0)
  if imitate and slot.target is not None:
    x0 = _chunks(images, labels, chunk)[0][0] if imitate_on != "weights" else None

    def dist(th):
      out = jnp.float32(0.0)
      if imitate_on in ("weights", "both"):
        out = out + imitation_distance(full_arch, th, slot.target, masks)
      if imitate_on in ("activations", "both"):
        out = out + activation_imitation_distance(full_arch, th, slot.batch_stats, slot.target,
                                                  x0, masks)
      return out
    d, g_d = jax.value_and_grad(dist)(theta)
    g_theta = jax.tree_util.tree_map(lambda a, b: a + imitate * b, g_theta, g_d)
  (g_phi,) = pull(g_theta)
  return ce_sum + r + imitate * d, ce_sum, r, d, accuracy, g_phi


def meta_train_grads(config, params, arch: Arch, variables: Mapping, images_nhwc, labels,
                     alpha: float = 16.0, reg: float = 10.0, reference_compat: bool = False,
                     normalizer: str = "max", chunk: int = DEFAULT_CHUNK,
                     form: str = "absolute"):
  """Gradient of one data model's meta-training loss w.r.t. the metanetwork ``params``.

  Args:
    config: metanetwork config.
    params: metanetwork params.
    arch: the data model's architecture at its widths.
    variables: its ``{'params', 'batch_stats'}``.
    images_nhwc: one batch ``[b, H, W, 3]`` float32 (or ``[B, b, H, W, 3]`` for B batches).
    labels: ``[b]`` (or ``[B, b]``) int.
    alpha, reg: regulariser settings.
    reference_compat: decode the classifier as the reference does (docs/design.md 3.2), to match
      its gradients.
    normalizer: importance normaliser of the regulariser.
    chunk: images per scanned forward/backward (memory; see :func:`_model_loss_grads`).
    form: the regulariser's form (:func:`metaprune_jax.regularizer`): ``absolute`` (the
      reference's) or ``relative``.

  Returns:
    A pytree with the structure and shapes of ``params`` (float32): the gradient of the
    reference's loss (the sum over the ``B`` batches of each batch's mean cross-entropy, plus
    the regulariser).

  Raises:
    ValueError: variables that do not fit ``arch`` (:func:`to_graph`), or a graph that does
      not fit the metanetwork (:func:`validate_graph`: node/edge widths, NaN/Inf).
  """
  metanet_lib.validate_graph(config, graph_lib.to_graph(arch, variables))
  x, y = jnp.asarray(images_nhwc), jnp.asarray(labels)
  if x.ndim == 4:
    x, y = x[None], y[None]
  slot = ModelSlot(graph_lib.flatten_variables(arch, variables), graph_lib.graph_layout(arch).arrays(),
                   masks_lib.full_masks(arch), variables["batch_stats"])
  return _grads_jit()(_spec(config), arch, params, slot, x, y, float(alpha), float(reg),
                      normalizer, bool(reference_compat), int(chunk), str(form))


@functools.cache
def _grads_jit():
  """The jitted single-model gradient (made on first use: its compiler options need the
  backend)."""
  def grads(spec, arch, params, slot, x, y, alpha, reg, normalizer, compat, chunk, form):
    *_, g = _model_loss_grads(spec, arch, params, slot, x, y, alpha, reg, normalizer,
                              use_masks=False, compat=compat, chunk=chunk, form=form)
    return g
  return jax.jit(grads, static_argnums=(0, 1, 6, 7, 8, 9, 10, 11),
                 compiler_options=xla_hints.conv_compiler_options())


def batched_loss_grads(spec, full_arch, phi, slots: ModelSlot, images, labels, alpha, reg,
                       normalizer, lanes: int = 1, chunk: int = DEFAULT_CHUNK,
                       form: str = "absolute", compat: bool = False, prune_aware=None,
                       bn: str = "running", imitate: float = 0.0,
                       imitate_on: str = "weights"):
  """Mean over a stack of data models ``[M, ...]`` of the loss gradients (and metrics).

  The ``M`` models are cut into ``lanes`` groups (``M % lanes == 0``; the data-parallel width,
  one lane per device when the model axis is sharded over the mesh): lanes are vmapped (the
  partitioner gives each device its own), and each lane runs its models one after another in a
  ``lax.scan``, so a device never runs a model-batched (grouped) convolution. ``compat``: the
  reference's classifier scramble on each transformed model (at its kept widths);
  ``prune_aware``: see :func:`_model_loss_grads`; ``bn``: the data models' BatchNorm in the
  cross-entropy, ``running`` statistics (the reference's) or each chunk's ``batch`` statistics;
  ``imitate``: the weight of the distance to each slot's target (``slots.target``, see
  :func:`_model_loss_grads`; the metrics' ``imitate`` is that distance, 0 when off);
  ``imitate_on``: ``weights`` (:func:`imitation_distance`), ``activations``
  (:func:`activation_imitation_distance`) or ``both`` (their sum).
  """
  if imitate_on not in IMITATE_ON:
    raise ValueError(f"imitate_on={imitate_on!r}: the imitation distance is on one of "
                     f"{IMITATE_ON}")
  if bn not in ("running", "batch"):
    raise ValueError(f"bn={bn!r}: the BatchNorm mode is 'running' or 'batch'")
  if imitate and slots.target is None:
    raise ValueError(f"imitate={imitate}: the slots carry no targets to imitate "
                     "(make_slot(..., target=))")
  m = slots.flat.shape[0]
  if m % lanes:
    raise ValueError(f"{m} data models do not split into {lanes} lanes")
  split = lambda a: a.reshape(lanes, m // lanes, *a.shape[1:])  # pylint: disable=unnecessary-lambda-assignment
  slots_l, images_l, labels_l = jax.tree_util.tree_map(split, (slots, images, labels))

  def lane(lane_slots, lane_images, lane_labels):
    def one(g_sum, xs):
      s, x, y = xs
      loss, ce, r, d, acc, g = _model_loss_grads(spec, full_arch, phi, s, x, y, alpha, reg,
                                                 normalizer, chunk=chunk, form=form,
                                                 compat=compat, prune_aware=prune_aware,
                                                 batch_bn=bn == "batch", imitate=imitate,
                                                 imitate_on=imitate_on)
      return jax.tree_util.tree_map(jnp.add, g_sum, g), (loss, ce, r, d, acc)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, phi)
    return jax.lax.scan(one, zeros, (lane_slots, lane_images, lane_labels))

  g, (loss, ce, r, d, acc) = jax.vmap(lane)(slots_l, images_l, labels_l)
  g = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0) / m, g)
  flat = lambda a: a.reshape(m)  # pylint: disable=unnecessary-lambda-assignment
  metrics = {"loss": flat(loss), "ce": flat(ce), "reg": flat(r), "accuracy": flat(acc)}
  if imitate:
    metrics["imitate"] = flat(d)
  return g, metrics


def transform_slot(config, params, full_arch: Arch, slot: ModelSlot) -> dict:
  """The transformed (masked, full-width) variables of one slot. Jittable."""
  th = transformed_params(_spec(config), params, full_arch, slot)
  return {"params": th, "batch_stats": slot.batch_stats}
