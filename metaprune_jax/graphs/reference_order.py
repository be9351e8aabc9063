"""The reference's edge order: our graphs as the reference's arrays and back.

Our graph differs from the reference's only in the order of the edges inside each layer:
input-major here (edge (o, i) at row ``i * O + o`` of its block), out-major there (why:
:mod:`metaprune_jax.graphs.layout`'s docstring). :func:`reference_edge_order` is the
permutation, :func:`graph_to_reference_arrays` gives the reference's exact arrays (its
``graph.npz``) and :func:`graph_from_reference_arrays` reads them back as ``arch``'s graph.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax.numpy as jnp
import jraph
import numpy as np

from metaprune_jax.graphs.device_layout import device_layout
from metaprune_jax.graphs.layout import graph_layout
from metaprune_jax.nets.arch import Arch


@functools.lru_cache(maxsize=64)
def reference_edge_order(arch: Arch) -> tuple:
  """Per edge kind, the positions of the reference's edges in ``arch``'s graph (numpy int64).

  ``graph.edges[k][reference_edge_order(arch)[k]]`` is kind k's edges in the reference's order
  (docs/design.md 3: out-major, in-minor within a layer); our graph holds each layer input-major.
  Multi-kind identity edges (one per channel) are in the same order in both.

  Args:
    arch: the architecture at its widths.

  Returns:
    A tuple with one ``[E_k]`` int64 permutation per edge kind (``graph_layout(arch)``'s kind
    order). Cached per ``arch``.
  """
  layout = graph_layout(arch)
  counts = [c for _, _, _, c in layout.node_sets]
  order = [[] for _ in layout.edge_kinds]
  for name, ki, start, count, dst, src in layout.edge_blocks:
    o, i = counts[dst], counts[src]
    if count == o * i:  # a grid, rows i * o + o_index
      order[ki].append(start + (np.arange(i)[None, :] * o + np.arange(o)[:, None]).ravel())
    else:  # diagonal identity
      order[ki].append(start + np.arange(count))
  return tuple(np.concatenate(p) if p else np.zeros((0,), np.int64) for p in order)


@functools.lru_cache(maxsize=16)
def reference_edge_index(arch: Arch) -> np.ndarray:
  """``[2, E]`` senders/receivers of ``arch``'s graph in the reference's edge order."""
  layout = graph_layout(arch)
  starts = np.concatenate([[0], np.cumsum(layout.num_edges)])
  idx = np.concatenate([s + p for s, p in zip(starts, reference_edge_order(arch))])
  return np.stack([layout.senders[idx], layout.receivers[idx]]).astype(np.int64)


def graph_to_reference_arrays(arch: Arch, graph: jraph.GraphsTuple) -> dict:
  """The reference's arrays for ``graph`` (padding, if any, removed; edges reordered).

  Our graph differs from the reference's only in the order of the edges inside each layer
  (input-major here, out-major there; see :func:`reference_edge_order`); this puts them, their
  features and ``edge_index`` in the reference's order.

  Args:
    arch: the graph's architecture at its widths.
    graph: ``arch``'s ``GraphsTuple`` (:func:`to_graph`, ``apply_metanet``'s output), padded
      or not: only the real nodes and the first ``E_k`` edges of each kind are read.

  Returns:
    ``node_features [N, d]``, ``edge_index [2, E] int64`` (row 0 = senders), and
    ``edge_features [E, 9]`` (single-kind) or ``edge_features_49/_9/_1`` (multi-kind), numpy.
  """
  layout = graph_layout(arch)
  nodes = np.asarray(graph.nodes)[:layout.num_real_nodes]
  snd, rcv = np.asarray(graph.senders), np.asarray(graph.receivers)
  out, idx, start = {"node_features": nodes}, [], 0
  for k, e, perm in zip(layout.edge_kinds, graph.edges, reference_edge_order(arch)):
    e = np.asarray(e)
    idx.append(start + perm)
    start += e.shape[0]
    key = "edge_features" if arch.edge_style == "single" else f"edge_features_{k}"
    out[key] = e[perm]
  idx = np.concatenate(idx)
  out["edge_index"] = np.stack([snd[idx], rcv[idx]]).astype(np.int64)
  return out


def graph_from_reference_arrays(arch: Arch, arrays: Mapping) -> jraph.GraphsTuple:
  """The inverse of :func:`graph_to_reference_arrays`: a reference graph (its ``graph.npz``
  arrays) as ``arch``'s graph, ready for :func:`from_graph` and the metanetwork's block path.

  Args:
    arch: the graph's architecture at its widths.
    arrays: ``node_features [N, node_dim]``, ``edge_index [2, E]`` and ``edge_features [E, 9]``
      (single-kind) or ``edge_features_<d> [E_d, d]`` per kind (multi-kind), e.g. an
      ``np.load``-ed ``graph.npz``.

  Returns:
    An unpadded ``GraphsTuple`` in our edge order: ``nodes [N, node_dim]`` and per-kind
    ``edges [E_k, d_k]`` float32, ``arch``'s own ``senders`` / ``receivers [E]`` int32.

  Raises:
    ValueError: missing arrays, shapes that do not fit ``arch``, or an ``edge_index`` other than
      ``arch``'s (another architecture, other widths).
  """
  layout = graph_layout(arch)
  keys = (["edge_features"] if arch.edge_style == "single" else
          [f"edge_features_{k}" for k in layout.edge_kinds])
  missing = [k for k in ["node_features", "edge_index"] + keys if k not in arrays]
  if missing:
    raise ValueError(f"{arch.name}: reference graph arrays lack {missing}")
  want = reference_edge_index(arch)
  ei = np.asarray(arrays["edge_index"])
  if ei.shape != want.shape or not np.array_equal(ei, want):
    raise ValueError(f"{arch.name}: reference edge_index {ei.shape} is not this architecture's "
                     f"{want.shape} at widths {dict(arch.widths)}")
  nodes = np.asarray(arrays["node_features"], np.float32)
  if nodes.shape != layout.node_gather.shape:
    raise ValueError(f"{arch.name}: node_features {nodes.shape}, expected "
                     f"{layout.node_gather.shape}")
  edges = []
  for key, k, perm, n in zip(keys, layout.edge_kinds, reference_edge_order(arch),
                             layout.num_edges):
    e = np.asarray(arrays[key], np.float32)
    if e.shape != (n, k):
      raise ValueError(f"{arch.name}: {key} {e.shape}, expected {(n, k)}")
    ours = np.empty_like(e)
    ours[perm] = e
    edges.append(ours)
  dl = device_layout(arch)
  return jraph.GraphsTuple(nodes=jnp.asarray(nodes), edges=tuple(jnp.asarray(e) for e in edges),
                           senders=dl.senders, receivers=dl.receivers, n_node=dl.n_node,
                           n_edge=dl.n_edge, globals=None)
