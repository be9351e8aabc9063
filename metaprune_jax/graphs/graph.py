"""Network <-> graph: channels are nodes, weights are edges (docs/design.md section 3).

The conversions: :func:`to_graph` and its exact inverse :func:`from_graph` (full width, one
jitted program per architecture), and the jittable gather/scatter pair
:func:`graph_from_flat` / :func:`flat_from_graph` over any :class:`GraphLayout` (masked,
padded). ``from_graph(to_graph(v)) == v`` bit for bit at any widths.

The graph's structure and its reasons live with the pieces this module builds on, one concern
each: :mod:`~metaprune_jax.graphs.flat` (all variables as one flat vector),
:mod:`~metaprune_jax.graphs.layout` (the node/edge layout as gather/scatter indices into it:
node columns, edge kinds and order, padding), :mod:`~metaprune_jax.graphs.device_layout` (the
full-width layout's device arrays, shared by every graph of an architecture) and
:mod:`~metaprune_jax.graphs.reference_order` (the reference's edge order, both ways). Their
public names are re-exported here, so ``graph.X`` keeps naming all of them.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from metaprune_jax.graphs.device_layout import device_layout
from metaprune_jax.graphs.flat import (FlatSpec, check_variables, flat_spec, flatten_variables,
                                       unflatten_variables)
from metaprune_jax.graphs.layout import GraphLayout, edge_kinds, graph_layout, node_dim
from metaprune_jax.graphs.reference_order import (graph_from_reference_arrays,
                                                  graph_to_reference_arrays, reference_edge_index,
                                                  reference_edge_order)
from metaprune_jax.nets.arch import Arch

__all__ = [
    # conversions (this module)
    "to_graph", "from_graph", "check_graph", "node_valid", "graph_from_flat", "flat_from_graph",
    "split_rows",
    # re-exported: flat vector, layout, reference order
    "FlatSpec", "flat_spec", "flatten_variables", "check_variables", "unflatten_variables",
    "GraphLayout", "graph_layout", "edge_kinds", "node_dim",
    "reference_edge_order", "graph_to_reference_arrays", "graph_from_reference_arrays",
]


def node_valid(arch: Arch, masks: Mapping | None) -> jax.Array:
  """``[N]`` float32 validity of the full-width graph's nodes under channel ``masks``.

  Args:
    arch: the (full-width) architecture.
    masks: ``{space: [width]}`` (1 keep, 0 pruned); spaces without a mask are all valid.
  """
  parts = []
  for _, space, _, count in graph_layout(arch).node_sets:
    m = (masks or {}).get(space)
    parts.append(jnp.ones((count,), jnp.float32) if m is None else
                 jnp.asarray(m, jnp.float32).reshape(count))
  return jnp.concatenate(parts)


def graph_from_flat(layout_arrays: Mapping, flat: jax.Array) -> jraph.GraphsTuple:
  """Gathers a graph from a flat vector. Jittable; ``layout_arrays`` = ``layout.arrays()``."""
  la = layout_arrays
  nodes = flat[la["node_gather"]]
  edges = tuple(flat[g] for g in la["edge_gather"])
  n, e = nodes.shape[0], la["senders"].shape[0]
  return jraph.GraphsTuple(nodes=nodes, edges=edges, senders=jnp.asarray(la["senders"]),
                           receivers=jnp.asarray(la["receivers"]),
                           n_node=jnp.array([n], jnp.int32), n_edge=jnp.array([e], jnp.int32),
                           globals=None)


def flat_from_graph(layout_arrays: Mapping, graph: jraph.GraphsTuple, flat_size: int,
                    base: jax.Array | None = None) -> jax.Array:
  """Scatters a graph's features back into a flat vector (``base`` or zeros). Jittable."""
  la = layout_arrays
  flat = jnp.zeros((flat_size,), jnp.float32) if base is None else base
  oob = flat_size  # -1 entries are redirected out of bounds and dropped

  def put(flat, idx, vals):
    idx = jnp.asarray(idx).ravel()
    idx = jnp.where(idx < 0, oob, idx)
    return flat.at[idx].set(vals.ravel().astype(flat.dtype), mode="drop")
  flat = put(flat, la["node_scatter"], graph.nodes)
  for s, e in zip(la["edge_scatter"], graph.edges):
    flat = put(flat, s, e)
  return flat


def _kernel_rows(arch: Arch, layer: str, kernel: jax.Array, dim: int) -> jax.Array:
  """A conv/dense kernel as its edge rows ``[i * o, dim]``, input-major (1x1 at the centre of 9).

  HWIO ``[kh, kw, i, o]`` holds ``kh * kw`` contiguous ``[i, o]`` planes, so input-major rows
  are one 2-D transpose of ``[kh * kw, i * o]`` (a reshape for 1x1 kernels and the classifier).
  """
  if arch.layer(layer).kind == "conv":
    kh, kw, i, o = kernel.shape
    rows = kernel.reshape(kh * kw, i * o).T if kh * kw > 1 else kernel.reshape(i * o, 1)
  else:  # [in, out]
    rows = kernel.reshape(-1, 1)
  if rows.shape[1] == dim:
    return rows
  return jnp.pad(rows, ((0, 0), (dim // 2, dim // 2)))  # 1x1 in a zero 3x3


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _build_graph(arch, edge_plan, vector_leaves, variables, node_gather):
  params = variables["params"]
  vec = [variables[coll][layer][leaf].astype(jnp.float32) for coll, layer, leaf in vector_leaves]
  vec = jnp.concatenate(vec + [jnp.array([0.0, 1.0], jnp.float32)])
  nodes = vec[node_gather]
  edges = []
  for dim, blocks in zip(edge_kinds(arch), edge_plan):
    parts = []
    for kind, layer, count, c in blocks:
      if kind == "kernel":
        parts.append(_kernel_rows(arch, layer, params[layer]["kernel"].astype(jnp.float32), dim))
      elif dim == 1:  # diagonal identity edges, feature 1
        parts.append(jnp.ones((c, 1), jnp.float32))
      else:  # dense identity block, 1 at the centre of the diagonal pairs
        eye = jnp.eye(c, dtype=jnp.float32).reshape(c * c, 1)
        parts.append(jnp.pad(eye, ((0, 0), (dim // 2, dim - dim // 2 - 1))))
    edges.append(_stack_rows(parts, dim))
  return nodes, tuple(edges)


def _stack_rows(parts, dim):
  """``concatenate(parts)``, written as in-place updates of one output buffer.

  XLA:CPU materialises every transposed kernel before a concatenation copies it (ResNet-50:
  88 MB of temporaries, page-faulted in on every call); an update fuses the transpose and writes
  the output directly. Same values, bit for bit.
  """
  total = sum(p.shape[0] for p in parts)
  out = jnp.zeros((total, dim), jnp.float32)
  start = 0
  for p in parts:
    out = jax.lax.dynamic_update_slice_in_dim(out, p, start, axis=0)
    start += p.shape[0]
  return out


def split_rows(arrays, pieces, axis: int = 0):
  """``[arrays[k][start:start + count] for k, start, count in pieces]`` as one ``lax.split``
  per array (pieces must not overlap); ``axis`` (default 0) is the axis cut.

  The same values as separate slices; the difference is the gradient. A slice's transpose is
  a zero-padded copy of the whole array, and the cotangent of n slices was a chain of n such
  full-size pads and adds (ResNet-56's metanetwork backward: ~50 passes over its
  [140720, 9] edge array). The transpose of a split is one concatenation.

  Args:
    arrays: per kind ``[E_k, ...]``.
    pieces: ``(kind index, start row, row count)`` per piece, static ints.

  Returns:
    the pieces, in the order given.
  """
  out = [None] * len(pieces)
  for k, arr in enumerate(arrays):
    mine = sorted((start, count, j) for j, (ki, start, count) in enumerate(pieces) if ki == k)
    if not mine:
      continue
    sizes, slots, pos = [], [], 0
    for start, count, j in mine:
      if start < pos:
        raise ValueError(f"overlapping row pieces at row {start} of edge kind {k}")
      if start > pos:
        sizes.append(start - pos)
        slots.append(None)
      sizes.append(count)
      slots.append(j)
      pos = start + count
    if pos < arr.shape[axis]:
      sizes.append(arr.shape[axis] - pos)
      slots.append(None)
    for j, part in zip(slots, jax.lax.split(arr, sizes, axis=axis)):
      if j is not None:
        out[j] = part
  return out


@functools.lru_cache(maxsize=8)
def _graph_reader(arch: Arch):
  """``from_graph``'s jitted body for ``arch``, its index arrays held as program constants.

  One jitted function per architecture and widths: a call hashes nothing large and sends no
  index arrays (passed as arguments, ResNet-50's 213 of them cost ~5 ms per call).
  """
  dl = device_layout(arch)
  return jax.jit(functools.partial(_read_graph, arch, dl.vector_leaves, dl.kernel_rows,
                                   vector_index=dl.vector_index))


def _read_graph(arch, vector_leaves, kernel_rows, nodes, edges, vector_index):
  out = {"params": {}, "batch_stats": {}}
  flat_nodes = jnp.ravel(nodes).astype(jnp.float32)
  for (coll, layer, leaf), idx in zip(vector_leaves, vector_index):
    out[coll].setdefault(layer, {})[leaf] = flat_nodes[idx]
  pshapes = arch.param_shapes()
  # Each kind's edge array is transposed once, [E_k, d] -> [d, E_k] (one 2-D transpose, ~3 ms
  # for ResNet-50's 45 MB of 3x3 rows), and every kernel is then a contiguous column range of
  # it, [kh * kw, i * o] = HWIO up to a reshape. Transposing each kernel's rows on its own took
  # ResNet-50's 3x3 kernels 8.6 ms against 7.6 ms this way (same process). Width-1 kinds are
  # their own transpose (a reshape).
  cols = [jnp.reshape(e.astype(jnp.float32), (1, -1)) if e.shape[1] == 1 else
          e.astype(jnp.float32).T for e in edges]
  pieces = split_rows(cols, [(ki, start, count) for _, (ki, start, count) in kernel_rows], axis=1)
  for (layer, _), block in zip(kernel_rows, pieces):
    shape = pshapes[layer]["kernel"]
    d = block.shape[0]
    if arch.layer(layer).kind == "conv":
      kh, kw, i, o = shape
      if d != kh * kw:  # 1x1 at the centre
        block = block[d // 2:d // 2 + 1]
      k = block.reshape(kh, kw, i, o)
    else:
      i, o = shape
      k = block[d // 2].reshape(i, o)
    out["params"].setdefault(layer, {})["kernel"] = k
  return {coll: {l: out[coll][l] for l in out[coll]} for coll in out}


def to_graph(arch: Arch, variables: Mapping) -> jraph.GraphsTuple:
  """Network -> graph.

  Args:
    arch: the architecture at the variables' widths.
    variables: ``{'params', 'batch_stats'}``.

  Returns:
    ``GraphsTuple(nodes [N, node_dim], edges (per kind [E_k, d_k]), senders [E] int32,
    receivers [E] int32, n_node [1], n_edge [1])`` (see :mod:`metaprune_jax.graphs.layout`).

  Raises:
    ValueError: a variable leaf that is missing or whose shape does not fit ``arch``'s widths
      (the message names it).
  """
  check_variables(arch, variables)
  dl = device_layout(arch)
  nodes, edges = _build_graph(arch, dl.edge_plan, dl.vector_leaves,
                              {"params": variables["params"],
                               "batch_stats": variables["batch_stats"]}, dl.node_gather)
  return jraph.GraphsTuple(nodes=nodes, edges=edges, senders=dl.senders,
                           receivers=dl.receivers, n_node=dl.n_node, n_edge=dl.n_edge,
                           globals=None)


def check_graph(arch: Arch, graph: jraph.GraphsTuple, layout: GraphLayout | None = None):
  """Raises ValueError if ``graph`` does not have ``arch``'s graph structure."""
  layout = layout or graph_layout(arch)
  if not isinstance(graph.edges, (tuple, list)) or len(graph.edges) != len(layout.edge_kinds):
    raise ValueError(f"{arch.name}: graph has {len(graph.edges) if isinstance(graph.edges, (tuple, list)) else 'non-tuple'} "
                     f"edge kinds, expected {len(layout.edge_kinds)} {layout.edge_kinds}")
  if graph.nodes.shape != layout.node_gather.shape:
    raise ValueError(f"{arch.name}: graph has node features {tuple(graph.nodes.shape)}, "
                     f"expected {layout.node_gather.shape} for widths {dict(arch.widths)}")
  for k, e, g in zip(layout.edge_kinds, graph.edges, layout.edge_gather):
    if e.shape != g.shape:
      raise ValueError(f"{arch.name}: graph edge kind {k} has features {tuple(e.shape)}, "
                       f"expected {g.shape} for widths {dict(arch.widths)}")


def from_graph(arch: Arch, graph: jraph.GraphsTuple) -> dict:
  """Graph -> network variables (exact inverse of :func:`to_graph`).

  Args:
    arch: the architecture at the graph's widths.
    graph: an unpadded ``GraphsTuple`` of ``arch`` as :func:`to_graph` makes it (``nodes [N,
      node_dim]``, per-kind ``edges [E_k, d_k]``), e.g. the output of ``apply_metanet``.

  Returns:
    ``{'params', 'batch_stats'}`` at ``arch``'s widths (the shapes :func:`to_graph` read).

  Raises:
    ValueError: the graph is of another architecture or other widths, or its ``senders`` /
      ``receivers`` are not ``arch``'s (e.g. a graph in the reference's edge order: read those
      with :func:`graph_from_reference_arrays`).
  """
  check_graph(arch, graph)
  _check_topology(arch, graph)
  return _graph_reader(arch)(graph.nodes, tuple(graph.edges))


def _check_topology(arch: Arch, graph: jraph.GraphsTuple):
  """ValueError unless ``graph``'s senders and receivers are ``arch``'s graph's.

  Free for graphs that carry ``to_graph``'s own index arrays (the same objects); traced ones
  (inside jit) cannot be read and are taken as they are.
  """
  dl = device_layout(arch)
  for field, want in (("senders", dl.senders), ("receivers", dl.receivers)):
    got = getattr(graph, field)
    if got is want or got is None:
      continue
    try:
      got = np.asarray(got)
    except jax.errors.TracerArrayConversionError:
      return
    if not np.array_equal(got, np.asarray(want)):
      ref = reference_edge_index(arch)
      hint = (" it is in the reference's edge order: convert it with "
              "graph_from_reference_arrays" if got.shape == ref[0].shape and np.array_equal(
                  got, ref[0 if field == "senders" else 1]) else "")
      raise ValueError(f"{arch.name}: graph {field} are not this architecture's at widths "
                       f"{dict(arch.widths)};{hint or ' another network or edge order'}")

