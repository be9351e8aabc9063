"""The full-width layout on the device: what ``to_graph`` and ``from_graph`` need per architecture.

:func:`device_layout` derives it once per architecture and widths from the numpy
:class:`~metaprune_jax.graphs.layout.GraphLayout` and caches it; the conversions
(:mod:`metaprune_jax.graphs.graph`) and the reference-order reader
(:mod:`metaprune_jax.graphs.reference_order`) share its ``senders``/``receivers`` arrays, so a
graph carrying them is recognised as ``arch``'s without reading them back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from metaprune_jax.graphs.flat import flat_spec
from metaprune_jax.graphs.layout import graph_layout
from metaprune_jax.nets.arch import Arch


class DeviceLayout(NamedTuple):
  """What the full-width conversions need, derived once per architecture.

  Kernels are the bulk of a graph (ResNet-50: 15M edges) and each conv/dense block of edges is
  just its kernel transposed to ``[o, i, kh, kw]``, so edges are built (and read back) with
  reshapes and transposes; XLA's CPU gather is an order of magnitude slower. Node features and
  the 1-D leaves (BatchNorms, biases) are small and use gathers, whose index arrays are passed to
  the jitted programs as arguments rather than baked-in constants.

  Fields: ``node_gather [N, node_dim]`` indices into the vector of 1-D leaves (+ 0, 1);
  ``edge_plan`` per kind, ``((block kind, layer, count, c), ...)``; ``vector_leaves``: ``(coll,
  layer, leaf)`` of the 1-D leaves in that vector's order; ``vector_index``: per vector leaf,
  its positions in the raveled node array; ``kernel_rows``: ``{layer: (kind index, start,
  count)}``; ``senders``, ``receivers``, ``n_node``, ``n_edge``: shared by every graph of
  ``arch``.
  """

  node_gather: jax.Array
  edge_plan: tuple
  vector_leaves: tuple
  vector_index: tuple
  kernel_rows: tuple
  senders: jax.Array
  receivers: jax.Array
  n_node: jax.Array
  n_edge: jax.Array


@functools.lru_cache(maxsize=8)
def device_layout(arch: Arch) -> DeviceLayout:
  """The :class:`DeviceLayout` of ``arch``'s full-width graph (cached; arrays on the device)."""
  layout = graph_layout(arch)
  spec = flat_spec(arch)
  # 1-D leaves (BN scale/bias/mean/var, biases) form a small vector; node features index it.
  remap = np.full(spec.size + 2, -1, np.int64)
  vector_leaves, n = [], 0
  for coll, layer, leaf, off, shape in spec.entries:
    if len(shape) == 1:
      remap[off:off + shape[0]] = n + np.arange(shape[0])
      vector_leaves.append((coll, layer, leaf, off, shape[0]))
      n += shape[0]
  remap[spec.zero], remap[spec.one] = n, n + 1
  node_gather = remap[layout.node_gather]
  if node_gather.min() < 0:
    raise ValueError(f"{arch.name}: node features read a kernel")
  # the way back for 1-D leaves: invert the node scatter
  ns = layout.node_scatter.ravel()
  where = np.full(spec.size + 2, -1, np.int64)
  p = np.flatnonzero(ns >= 0)
  where[ns[p]] = p
  vector_index = []
  for coll, layer, leaf, off, c in vector_leaves:
    w = where[off:off + c]
    if w.min() < 0:
      raise ValueError(f"{arch.name}: {layer}/{leaf} is not held by node features")
    vector_index.append(w.astype(np.int32))
  # edges: blocks in order per kind
  plan = [[] for _ in layout.edge_kinds]
  kernel_rows = {}
  for name, ki, start, count, dst, src in layout.edge_blocks:
    c = layout.node_sets[src][3]
    if name.startswith("identity:"):
      plan[ki].append(("identity", None, count, c))
    else:
      plan[ki].append(("kernel", name, count, c))
      kernel_rows[name] = (ki, start, count)
  # Cached across calls, so the arrays must be concrete even when the first call comes from
  # inside a jax transformation (to_graph under jit/grad): a device_put traced there would
  # leave tracers in the cache and break every later call for this architecture.
  with jax.ensure_compile_time_eval():
    put = jax.device_put
    return DeviceLayout(
        put(node_gather.astype(np.int32)), tuple(tuple(b) for b in plan),
        tuple((coll, layer, leaf) for coll, layer, leaf, _, _ in vector_leaves),
        tuple(put(i) for i in vector_index), tuple(sorted(kernel_rows.items())),
        put(layout.senders), put(layout.receivers),
        put(np.array([layout.num_nodes], np.int32)),
        put(np.array([layout.senders.shape[0]], np.int32)))
