"""The flat variable vector: every variable of a network in one ``float32`` vector.

:func:`flatten_variables` ravels ``{'params', 'batch_stats'}`` leaf by leaf in layer order and
appends two constant slots, 0 and 1; :class:`FlatSpec` says where each leaf sits. The graph
layout (:mod:`metaprune_jax.graphs.layout`) indexes this vector: every node and edge feature of
a network's graph is a gather from it and the way back a scatter into it.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.nets.arch import Arch


class FlatSpec(NamedTuple):
  """Where each variable leaf sits in the flat vector.

  ``entries``: ``((collection, layer, leaf, offset, shape), ...)``; ``size``: number of variable
  elements; the flat vector has ``size + 2`` entries, ``[size] = 0`` and ``[size + 1] = 1``.
  """

  entries: tuple
  size: int

  @property
  def zero(self) -> int:
    return self.size

  @property
  def one(self) -> int:
    return self.size + 1


@functools.lru_cache(maxsize=256)
def flat_spec(arch: Arch) -> FlatSpec:
  """Where ``arch``'s variable leaves sit in its flat vector (cached per architecture)."""
  pshapes, sshapes = arch.param_shapes(), arch.stat_shapes()
  entries, off = [], 0
  for l in arch.layers:
    leaves = [("params", k, s) for k, s in pshapes[l.name].items()]
    leaves += [("batch_stats", k, s) for k, s in sshapes.get(l.name, {}).items()]
    for coll, leaf, shape in leaves:
      entries.append((coll, l.name, leaf, off, tuple(shape)))
      off += int(np.prod(shape))
  return FlatSpec(tuple(entries), off)


def flatten_variables(arch: Arch, variables: Mapping) -> jax.Array:
  """``{'params', 'batch_stats'}`` -> ``[size + 2] float32`` (the last two entries are 0, 1).

  Raises:
    ValueError: a missing leaf or a leaf whose shape does not fit ``arch`` (names it).
  """
  leaves = check_variables(arch, variables)
  parts = [jnp.ravel(a).astype(jnp.float32) for a in leaves]
  parts.append(jnp.array([0.0, 1.0], jnp.float32))
  return jnp.concatenate(parts)


def check_variables(arch: Arch, variables: Mapping) -> list:
  """The variable leaves in flat order; ValueError naming a missing or misshapen leaf."""
  out = []
  for coll, layer, leaf, _, shape in flat_spec(arch).entries:
    try:
      a = variables[coll][layer][leaf]
    except (KeyError, TypeError):
      raise ValueError(f"{arch.name}: variables lack {coll}/{layer}/{leaf} "
                       f"(expected shape {shape})") from None
    if tuple(a.shape) != shape:
      raise ValueError(f"{arch.name}: {coll}/{layer}/{leaf} has shape {tuple(a.shape)}, "
                       f"expected {shape} at widths {dict(arch.widths)}")
    out.append(a)
  return out


def unflatten_variables(arch: Arch, flat: jax.Array) -> dict:
  """Inverse of :func:`flatten_variables` (the constant tail is ignored)."""
  spec = flat_spec(arch)
  out = {"params": {}, "batch_stats": {}}
  for coll, layer, leaf, off, shape in spec.entries:
    n = int(np.prod(shape))
    out[coll].setdefault(layer, {})[leaf] = jax.lax.slice(flat, (off,), (off + n,)).reshape(shape)
  return out
