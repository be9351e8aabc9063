"""Exact identities that stop XLA from re-fusing (recomputing) a value into its consumers.

XLA fuses cheap elementwise producers into every consumer, duplicating them. That is usually a
win, but it turns quadratic when the producer is itself a long fused chain that several
expensive consumers read element by element. Two cases measured on XLA:CPU here:

* a ResNet's residual stream (BN, add, ReLU of every earlier block) was re-fused into each
  weight-gradient transpose: a ResNet-56 train step took 2.7 s instead of 1.6 s (batch 128);
* the cotangent of a flat parameter vector (a sum of ~170 padded slices) was re-fused into the
  gather that ``flat_from_graph``'s transpose performs: 0.31 s of a meta-training step.

``lax.optimization_barrier`` does not help there: XLA:CPU expands barriers before fusion. A
division is one of the ops XLA will not duplicate into consumers, and dividing by exactly 1.0
is exact, so :func:`materialize` (forward) and :func:`materialize_cotangent` (backward) change
no bit of any result. The 1.0s are computed from the data so that they cannot be constant-folded.
"""

import jax
import jax.numpy as jnp


def _ones_like(x: jax.Array) -> jax.Array:
  """Exactly 1.0 everywhere, computed elementwise from ``x`` so that it cannot be folded.

  Full-shape on purpose: XLA rewrites a division by a broadcast scalar into a multiplication,
  which it does duplicate. ``nan_to_num`` keeps it 1.0 whatever ``x`` holds.
  """
  x = jax.lax.stop_gradient(x)
  return 1 + 0 * jnp.nan_to_num(x, nan=0, posinf=0, neginf=0)


def materialize(y: jax.Array) -> jax.Array:
  """``y``, bit for bit, computed once instead of being re-fused into its consumers.

  Its cotangent is divided the same way (so it is materialised too).
  """
  return y / _ones_like(y)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """The identity; its cotangent is computed once instead of being re-fused downstream."""
  return x


def _mc_fwd(x):
  return x, x


def _mc_bwd(x, ct):
  return (ct / _ones_like(x).astype(ct.dtype),)


materialize_cotangent.defvjp(_mc_fwd, _mc_bwd)
