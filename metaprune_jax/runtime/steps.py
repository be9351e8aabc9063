"""Pure train and eval steps of a (possibly masked) CNN: `(state, batch) -> (state, metrics)`.

Masked training keeps the pruned channels exactly zero everywhere: the forward pass multiplies
activations by the masks, gradients are masked before the optimizer (so momentum / Adam moments
of pruned slices stay zero, and coupled weight decay sees zero parameters), and params and
BatchNorm statistics are re-masked after the update (`masks.mask_variables`), which also pins the
running statistics of pruned channels at zero. Masks are arrays in the state, so any mask of an
architecture reuses one compilation.

Both steps are plain functions; the architecture and optimizer are bound with
`functools.partial` before `jax.jit` (see `sharding.jit_train_step`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metaprune_jax.nets import cnn
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.prune.regularizer import regularizer as group_norm_regularizer
from metaprune_jax.runtime.state import TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy; logits [B, C] float, labels [B] int -> [B] float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _mask_params(arch, params, batch_stats, masks):
  out = masks_lib.mask_variables(arch, {"params": params, "batch_stats": batch_stats}, masks)
  return out["params"], out["batch_stats"]


def train_step(state: TrainState, batch: Batch, *, arch, tx: optax.GradientTransformation,
               sparsity: tuple[float, float, str] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD/AdamW step on a batch (train-mode BatchNorm over the whole global batch).

  Args:
    state: the TrainState.
    batch: {'image': [B, H, W, 3] float32, 'label': [B] int32}.
    arch: the Arch (static).
    tx: the optimizer (static).
    sparsity: ``(alpha, reg, normalizer)`` (static) adds the group-norm regulariser of
      meta-training (:func:`metaprune_jax.prune.regularizer.regularizer`) on the network's own weights
      to the loss: DepGraph's sparse learning (``prune.method='sl'``). None: plain training.

  Returns:
    (new_state, metrics) with metrics {'loss': [] mean CE, 'accuracy': [] float32} (and
    'reg': [] the regulariser's value with ``sparsity``).
  """
  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, new_stats = cnn.apply_model(arch, variables, batch["image"], train=True,
                                        masks=state.masks)
    loss = cross_entropy(logits, batch["label"]).mean()
    r = jnp.float32(0.0)
    if sparsity is not None:
      alpha, reg, normalizer = sparsity
      r = group_norm_regularizer(arch, {"params": params}, alpha, reg, normalizer,
                                 masks=state.masks)
    return loss + r, (loss, r, logits, new_stats)

  (_, (loss, r, logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  if state.masks is not None:
    grads = masks_lib.mask_tree(arch, grads, state.masks, "params")
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if state.masks is not None:
    params, new_stats = _mask_params(arch, params, new_stats, state.masks)
  accuracy = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32).mean()
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state)
  metrics = {"loss": loss, "accuracy": accuracy}
  if sparsity is not None:
    metrics["reg"] = r
  return new_state, metrics


def eval_step(variables: dict[str, Any], masks, batch: Batch, *, arch) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the valid examples of a (padded) batch.

  Args:
    variables: {'params': ..., 'batch_stats': ...}.
    masks: {space: [width] float32} or None.
    batch: {'image': [B, H, W, 3], 'label': [B] int32, 'mask': [B] float32 (0 = padding)}.
    arch: the Arch (static).

  Returns:
    {'loss_sum': [], 'correct': [], 'count': []} float32 sums over valid examples.
  """
  logits = cnn.apply_model(arch, variables, batch["image"], train=False, masks=masks)
  weight = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {
    "loss_sum": (cross_entropy(logits, batch["label"]) * weight).sum(),
    "correct": (correct * weight).sum(),
    "count": weight.sum(),
  }
