"""The training state: one pytree with everything a resumed run needs.

`TrainState` holds the step counter, the network's params and BatchNorm statistics, the optimizer
state, the channel masks (or None for a dense network) and the run's PRNG key. It is a flax
struct dataclass, so it passes through `jax.jit` (donated), shardings and Orbax unchanged. The
optimizer itself (an `optax.GradientTransformation`) is static and is given to the step function,
never stored.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from metaprune_jax.prune import masks as masks_lib


Masks = dict[str, jax.Array]  # space name -> [width] float32, 1 keep / 0 pruned


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: [] int32, the number of optimizer steps taken (the global data position).
    params: the network's parameters, `{layer_name: {'kernel': ..., ...}}`.
    batch_stats: BatchNorm running statistics, same layout.
    opt_state: the optax state of `params`.
    masks: per-space channel masks `{space: [width] float32}`, or None (dense training).
    rng: [2] uint32, the run's raw PRNG key; a step uses `fold_in(rng, step)`.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  masks: Masks | None
  rng: jax.Array

  @property
  def variables(self) -> dict[str, Any]:
    """`{'params': ..., 'batch_stats': ...}` as `cnn.apply_model` takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(arch, variables: dict[str, Any], tx: optax.GradientTransformation,
                 rng: jax.Array, masks: Masks | None = None) -> TrainState:
  """A fresh state at step 0; with masks, the variables are masked first.

  Args:
    arch: the network's Arch.
    variables: `{'params': ..., 'batch_stats': ...}`.
    tx: the optimizer.
    rng: a raw PRNG key ([2] uint32).
    masks: optional `{space: [width] float32}`.
  """
  if masks is not None:
    masks = {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
    variables = masks_lib.mask_variables(arch, variables, masks)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    masks=masks,
    rng=jnp.asarray(rng),
  )
