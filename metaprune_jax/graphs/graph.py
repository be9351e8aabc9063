"""Network <-> graph: channels are nodes, weights are edges (docs/design.md section 3).

All index arithmetic is done once per (architecture, widths, kept channels) in numpy and
cached as a :class:`GraphLayout`: every node and edge feature is a *gather* from one flat
vector holding all of the network's variables (plus a constant 0 and 1 slot), and the way back
is the matching *scatter*. Every variable element appears in exactly one writable graph slot,
so ``from_graph(to_graph(v)) == v`` bit for bit at any widths; constant slots (defaults,
identity edges, the zero padding of 1x1 kernels) are gathered but never written back.

Graph layout (identical to the reference's where docs/design.md says so):

* nodes ``[N, node_dim]``: the 3 input channels, then one node set per non-shortcut conv in
  network order, then the classes. Columns: ResNet family ``[bn.scale, bn.bias, bn.mean,
  bn.var, ds_bn.scale, ds_bn.bias, ds_bn.mean, ds_bn.var]`` (class nodes: fc bias in column 1),
  VGG ``[bn.scale, bn.bias, bn.mean, bn.var, conv.bias]`` (class nodes: bias in column 4).
* edges: a tuple of per-kind arrays ``[E_k, d_k]`` (``(9,)`` for single-kind graphs,
  ``(49, 9, 1)`` for ResNet-50-style multi-kind ones), concatenated in that order along
  ``senders``/``receivers`` ``[E] int32``. A conv/dense edge goes from its output channel
  (sender) to its input channel (receiver); its feature is the kernel slice ``W[o, i]``
  flattened row-major. Identity shortcuts: single-kind graphs add a dense block of (out, in)
  edges, 1 at the centre for diagonal pairs; multi-kind graphs add only the diagonal, reversed
  (sender = block input), feature 1.0.

The one difference from the reference's graph: **within a layer, edges are input-major** (all
output channels of input channel 0, then of 1, ...; edge (o, i) at row ``i * O + o`` of its
block), where the reference is out-major. Node order, layer order, kinds, directions and
features are the reference's; :func:`graph_to_reference_arrays` returns the reference's exact
arrays and order (:func:`reference_edge_order` is the permutation) and
:func:`graph_from_reference_arrays` reads them back. Why: an HWIO kernel ``[kh, kw, I, O]`` is
``kh * kw`` contiguous ``[I, O]`` planes, so input-major rows are the kernel itself for 1x1
convs and the classifier, and one 2-D transpose for the others; the out-major order needed a full
axis permutation of every kernel, both ways, which dominated the conversion (ResNet-50
``from_graph`` 41-43 -> 14-15 ms in ``benchmarks/graph_conversion.py``, interleaved). The metanetwork's aggregations are
order-free; its dense-block path (``metanetwork.blocks``) reads each block as ``[I, O, h]``.

Padding (one compilation per architecture): :func:`graph_layout` with ``keep`` (the kept
channel indices of a network embedded at full width, e.g. a masked data model) and ``pad_to``
(a budget, normally the full-width layout's sizes) gives index arrays of fixed shapes that are
passed to jitted code as arguments. Padding nodes follow the real ones; padding edges of each
kind follow that kind's real edges and connect the last (padding) node to itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from metaprune_jax.nets.arch import CLASSES, INPUT, Arch


# ---------------------------------------------------------------------------------------------
# Flat variable vector
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class GraphLayout:
  """Index arrays turning a flat variable vector into a graph and back (numpy, int32).

  Attributes:
    node_gather: ``[N, node_dim]`` flat indices of node features.
    node_scatter: same shape; flat index to write back, or ``-1`` (never written).
    edge_gather: per kind ``[E_k, d_k]``.
    edge_scatter: per kind, ``-1`` where not written back.
    senders, receivers: ``[E]`` node ids, kinds concatenated in ``edge_kinds`` order.
    edge_kinds: feature dim of each kind.
    num_real_nodes: real (unpadded) nodes; padding nodes follow.
    num_real_edges: per kind, real edges (padding edges follow within each kind's block).
    node_sets: ``((name, space, start, count), ...)`` of the real node sets.
    edge_blocks: ``((name, kind_index, start_in_kind, count, dst_set, src_set), ...)``.
    flat_size: length of the flat vector (variables + 2 constants).
  """

  node_gather: np.ndarray
  node_scatter: np.ndarray
  edge_gather: tuple
  edge_scatter: tuple
  senders: np.ndarray
  receivers: np.ndarray
  edge_kinds: tuple
  num_real_nodes: int
  num_real_edges: tuple
  node_sets: tuple
  edge_blocks: tuple
  flat_size: int

  @property
  def num_nodes(self) -> int:
    return int(self.node_gather.shape[0])

  @property
  def num_edges(self) -> tuple:
    return tuple(int(g.shape[0]) for g in self.edge_gather)

  def arrays(self) -> dict:
    """The index arrays as a pytree (pass it to jitted code as an argument)."""
    return {"node_gather": self.node_gather, "node_scatter": self.node_scatter,
            "edge_gather": self.edge_gather, "edge_scatter": self.edge_scatter,
            "senders": self.senders, "receivers": self.receivers}


def edge_kinds(arch: Arch) -> tuple:
  """Edge feature dims of ``arch``'s graph, in graph order: ``(9,)`` or e.g. ``(49, 9, 1)``."""
  if arch.edge_style == "single":
    return (9,)
  areas = {l.kernel * l.kernel for l in arch.layers if l.kind == "conv"} | {1}
  return tuple(sorted(areas, reverse=True))


def node_dim(arch: Arch) -> int:
  return {"resnet": 8, "vgg": 5, "full": 9}[arch.node_style]


def _trace(arch: Arch):
  """Walks ``arch.ops`` once: node sets (with their BN / ds-BN / bias sources) and edge
  blocks in network order. Pure Python over layers (tens to hundreds), never over channels."""
  layers = arch.layer_map
  node_sets = [dict(name=INPUT, space=INPUT, bn=None, ds_bn=None, bias=None)]
  info = {"x": ("ns", 0)}
  blocks = []  # (kind: conv|dense|identity, layer, src_ns, dst_ns)
  for op in arch.ops:
    src = info[op.inputs[0]]
    if op.op == "conv":
      l = layers[op.layer]
      if src[0] != "ns":
        raise ValueError(f"{arch.name}: conv {l.ref} reads an unjoined shortcut tensor")
      if l.shortcut:
        info[op.output] = ("sc", l.name, None, src[1])
      else:
        node_sets.append(dict(name=l.name, space=l.out_space, bn=None, ds_bn=None,
                              bias=l.name if l.bias else None))
        dst = len(node_sets) - 1
        blocks.append(("conv", l.name, src[1], dst))
        info[op.output] = ("ns", dst, l.name)
    elif op.op == "bn":
      l = layers[op.layer]
      if src[0] == "sc":
        info[op.output] = ("sc", src[1], l.name, src[3])
      else:
        ns = node_sets[src[1]]
        if len(src) < 3 or ns["bn"] is not None:
          raise ValueError(f"{arch.name}: BatchNorm {l.ref} does not directly follow a conv")
        ns["bn"] = l.name
        info[op.output] = ("ns", src[1])
    elif op.op == "add":
      other = info[op.inputs[1]]
      if src[0] != "ns":
        raise ValueError(f"{arch.name}: add -> {op.output}: the first operand must be the main "
                         "branch")
      dst = src[1]
      if other[0] == "sc":
        blocks.append(("conv", other[1], other[3], dst))
        if other[2] is not None:
          node_sets[dst]["ds_bn"] = other[2]
      else:
        blocks.append(("identity", None, other[1], dst))
      info[op.output] = ("ns", dst)
    elif op.op == "dense":
      l = layers[op.layer]
      node_sets.append(dict(name=CLASSES if l.out_space == CLASSES else l.name,
                            space=l.out_space, bn=None, ds_bn=None, bias=l.name if l.bias else None))
      dst = len(node_sets) - 1
      blocks.append(("dense", l.name, src[1], dst))
      info[op.output] = ("ns", dst)
    else:
      info[op.output] = ("ns", src[1]) if src[0] == "ns" else src
  return node_sets, blocks


def _leaf_index(arch: Arch) -> dict:
  spec = flat_spec(arch)
  return {(layer, leaf): off + np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
          for _, layer, leaf, off, shape in spec.entries}


def graph_layout(arch: Arch, keep: Mapping[str, Sequence[int]] | None = None,
                 pad_to: "GraphLayout | tuple | None" = None) -> GraphLayout:
  """Builds the gather/scatter indices of ``arch``'s graph.

  Args:
    arch: the architecture whose flat vector is indexed (full width when embedding).
    keep: optional ``{space: kept channel indices}``: the graph of the sub-network made of the
      kept channels (a masked network embedded in ``arch``). Default: all channels.
    pad_to: optional budget, a layout or ``(num_nodes, (num_edges per kind))``: pad to it.

  Returns:
    A :class:`GraphLayout`. Not jittable (numpy); cache it per architecture and widths.
  """
  if keep is None and pad_to is None:
    return _cached_layout(arch)
  return _build_layout(arch, keep, pad_to)


@functools.lru_cache(maxsize=64)
def _cached_layout(arch: Arch) -> GraphLayout:
  return _build_layout(arch, None, None)


def _build_layout(arch, keep, pad_to) -> GraphLayout:
  spec = flat_spec(arch)
  zero, one, nowrite = spec.zero, spec.one, -1
  idx = _leaf_index(arch)
  widths = arch.width_map
  kept = {s: np.arange(w) for s, w in widths.items()}
  for s, k in (keep or {}).items():
    if s not in kept:
      raise ValueError(f"{arch.name}: keep names unknown space {s!r}")
    k = np.asarray(k, np.int64)
    if k.ndim != 1 or len(k) == 0 or k.min() < 0 or k.max() >= widths[s] or \
       len(np.unique(k)) != len(k):
      raise ValueError(f"{arch.name}: keep[{s!r}] must be distinct indices in [0, {widths[s]})")
    kept[s] = np.sort(k)
  node_sets, blocks = _trace(arch)
  kinds = edge_kinds(arch)
  dn = node_dim(arch)

  # ---- nodes
  starts, rows_g, rows_s, set_meta = [], [], [], []
  n = 0
  layers = arch.layer_map
  for ns in node_sets:
    kc = kept[ns["space"]]
    c = len(kc)
    g = np.empty((c, dn), np.int64)
    if arch.node_style == "resnet":
      g[:] = [one, zero, zero, one, one, zero, zero, one]
    elif arch.node_style == "full":  # traced networks with conv biases and shortcut BNs
      g[:] = [one, zero, zero, one, one, zero, zero, one, zero]
    else:
      g[:] = [one, zero, zero, one, zero]
    s = np.full((c, dn), nowrite, np.int64)

    def put(col, key):
      g[:, col] = idx[key][kc]
      s[:, col] = idx[key][kc]
    if ns["bn"] is not None:
      b = ns["bn"]
      for col, key in enumerate([(b, "scale"), (b, "bias"), (b, "mean"), (b, "var")]):
        put(col, key)
    if ns["ds_bn"] is not None:
      if arch.node_style == "vgg":
        raise ValueError(f"{arch.name}: VGG-style node features have no downsample columns")
      b = ns["ds_bn"]
      for col, key in enumerate([(b, "scale"), (b, "bias"), (b, "mean"), (b, "var")]):
        put(4 + col, key)
    if ns["bias"] is not None:
      is_class = layers[ns["bias"]].kind == "dense"
      col = {"resnet": 1 if is_class else None, "vgg": 4, "full": 8}[arch.node_style]
      if col is None:
        raise ValueError(f"{arch.name}: ResNet-style node features have no conv-bias column "
                         f"({layers[ns['bias']].ref})")
      put(col, (ns["bias"], "bias"))
    starts.append(n)
    set_meta.append((ns["name"], ns["space"], n, c))
    rows_g.append(g)
    rows_s.append(s)
    n += c
  node_g, node_s = np.concatenate(rows_g), np.concatenate(rows_s)

  # ---- edges
  per_kind = {k: dict(g=[], s=[], snd=[], rcv=[], n=0) for k in kinds}
  block_meta = []
  for kind, lname, src, dst in blocks:
    s_space, d_space = node_sets[src]["space"], node_sets[dst]["space"]
    ki, ko = kept[s_space], kept[d_space]
    in_nodes = starts[src] + np.arange(len(ki))
    out_nodes = starts[dst] + np.arange(len(ko))
    if kind in ("conv", "dense"):
      l = layers[lname]
      w = idx[(lname, "kernel")]
      if kind == "conv":  # HWIO -> [i, o, kh, kw] (input-major rows, module docstring)
        w = w[:, :, ki][:, :, :, ko].transpose(2, 3, 0, 1)
        area = l.kernel * l.kernel
      else:  # [in, out], already input-major
        w = w[ki][:, ko]
        area = 1
      feat = w.reshape(len(ki) * len(ko), area)
      if arch.edge_style == "single":
        if area == 9:
          g = feat
        elif area == 1:
          g = np.full((feat.shape[0], 9), zero, np.int64)
          g[:, 4] = feat[:, 0]
        else:
          raise ValueError(f"{arch.name}: single-kind graphs hold 3x3 or 1x1 kernels, "
                           f"{l.ref} is {l.kernel}x{l.kernel}")
        k = 9
      else:
        g, k = feat, area
      s = g.copy()
      s[g == zero] = nowrite
      snd, rcv = np.tile(out_nodes, len(ki)), np.repeat(in_nodes, len(ko))
      name = l.name
    else:  # identity shortcut: same space, so kept positions pair up
      if s_space != d_space:
        raise ValueError(f"{arch.name}: identity shortcut between spaces {s_space}, {d_space}")
      c = len(ki)
      if arch.edge_style == "single":
        g = np.full((c * c, 9), zero, np.int64)
        g[np.arange(c) * c + np.arange(c), 4] = one
        snd, rcv = np.tile(out_nodes, c), np.repeat(in_nodes, c)
        k = 9
      else:
        g = np.full((c, 1), one, np.int64)
        snd, rcv = in_nodes, out_nodes
        k = 1
      s = np.full_like(g, nowrite)
      name = f"identity:{node_sets[dst]['name']}"
    pk = per_kind[k]
    block_meta.append((name, kinds.index(k), pk["n"], g.shape[0], dst, src))
    pk["g"].append(g)
    pk["s"].append(s)
    pk["snd"].append(snd)
    pk["rcv"].append(rcv)
    pk["n"] += g.shape[0]

  # ---- padding
  num_real_nodes = n
  num_real_edges = tuple(per_kind[k]["n"] for k in kinds)
  if pad_to is not None:
    if isinstance(pad_to, GraphLayout):
      pad_nodes, pad_edges = pad_to.num_nodes, pad_to.num_edges
    else:
      pad_nodes, pad_edges = int(pad_to[0]), tuple(int(e) for e in pad_to[1])
    if pad_nodes < n + 1 or len(pad_edges) != len(kinds) or \
       any(pe < re for pe, re in zip(pad_edges, num_real_edges)):
      raise ValueError(f"{arch.name}: padding budget ({pad_nodes} nodes, {pad_edges} edges) "
                       f"smaller than the graph ({n}+1 nodes, {num_real_edges} edges)")
    extra = pad_nodes - n
    node_g = np.concatenate([node_g, np.full((extra, dn), zero, np.int64)])
    node_s = np.concatenate([node_s, np.full((extra, dn), nowrite, np.int64)])
    last = pad_nodes - 1
    for k, pe in zip(kinds, pad_edges):
      pk = per_kind[k]
      m = pe - pk["n"]
      pk["g"].append(np.full((m, k), zero, np.int64))
      pk["s"].append(np.full((m, k), nowrite, np.int64))
      pk["snd"].append(np.full(m, last, np.int64))
      pk["rcv"].append(np.full(m, last, np.int64))

  def cat(parts, shape):
    return np.concatenate(parts) if parts else np.zeros(shape, np.int64)
  edge_g = tuple(cat(per_kind[k]["g"], (0, k)).astype(np.int32) for k in kinds)
  edge_s = tuple(cat(per_kind[k]["s"], (0, k)).astype(np.int32) for k in kinds)
  senders = np.concatenate([cat(per_kind[k]["snd"], (0,)) for k in kinds]).astype(np.int32)
  receivers = np.concatenate([cat(per_kind[k]["rcv"], (0,)) for k in kinds]).astype(np.int32)
  if spec.size + 2 >= np.iinfo(np.int32).max:
    raise ValueError(f"{arch.name}: too many parameters for int32 graph indices")
  layout = GraphLayout(node_g.astype(np.int32), node_s.astype(np.int32), edge_g, edge_s,
                       senders, receivers, kinds, num_real_nodes, num_real_edges,
                       tuple(set_meta), tuple(block_meta), spec.size + 2)
  if keep is None:
    _check_bijection(arch, layout)
  return layout


def _check_bijection(arch: Arch, layout: GraphLayout):
  """Every variable element is written back exactly once (else the graph loses something)."""
  w = np.concatenate([layout.node_scatter.ravel()] + [s.ravel() for s in layout.edge_scatter])
  w = w[w >= 0]
  counts = np.bincount(w, minlength=layout.flat_size - 2)
  if len(counts) > layout.flat_size - 2 or counts.min() != 1 or counts.max() != 1:
    spec = flat_spec(arch)
    for _, layer, leaf, off, shape in spec.entries:
      c = counts[off:off + int(np.prod(shape))]
      if c.min() != 1 or c.max() != 1:
        raise ValueError(f"{arch.name}: {layer}/{leaf} is not represented exactly once in the "
                         "graph; this architecture cannot be converted")


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------
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


class _DeviceLayout(NamedTuple):
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
def _device_layout(arch: Arch) -> _DeviceLayout:
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
    return _DeviceLayout(
        put(node_gather.astype(np.int32)), tuple(tuple(b) for b in plan),
        tuple((coll, layer, leaf) for coll, layer, leaf, _, _ in vector_leaves),
        tuple(put(i) for i in vector_index), tuple(sorted(kernel_rows.items())),
        put(layout.senders), put(layout.receivers),
        put(np.array([layout.num_nodes], np.int32)),
        put(np.array([layout.senders.shape[0]], np.int32)))


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
  dl = _device_layout(arch)
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
    receivers [E] int32, n_node [1], n_edge [1])`` (see the module docstring).
  """
  check_variables(arch, variables)
  dl = _device_layout(arch)
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
  dl = _device_layout(arch)
  for field, want in (("senders", dl.senders), ("receivers", dl.receivers)):
    got = getattr(graph, field)
    if got is want or got is None:
      continue
    try:
      got = np.asarray(got)
    except jax.errors.TracerArrayConversionError:
      return
    if not np.array_equal(got, np.asarray(want)):
      ref = _reference_edge_index(arch)
      hint = (" it is in the reference's edge order: convert it with "
              "graph_from_reference_arrays" if got.shape == ref[0].shape and np.array_equal(
                  got, ref[0 if field == "senders" else 1]) else "")
      raise ValueError(f"{arch.name}: graph {field} are not this architecture's at widths "
                       f"{dict(arch.widths)};{hint or ' another network or edge order'}")


@functools.lru_cache(maxsize=64)
def reference_edge_order(arch: Arch) -> tuple:
  """Per edge kind, the positions of the reference's edges in ``arch``'s graph (numpy int64).

  ``graph.edges[k][reference_edge_order(arch)[k]]`` is kind k's edges in the reference's order
  (docs/design.md 3: out-major, in-minor within a layer); our graph holds each layer input-major.
  Multi-kind identity edges (one per channel) are in the same order in both.
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
def _reference_edge_index(arch: Arch) -> np.ndarray:
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
  want = _reference_edge_index(arch)
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
  dl = _device_layout(arch)
  return jraph.GraphsTuple(nodes=jnp.asarray(nodes), edges=tuple(jnp.asarray(e) for e in edges),
                           senders=dl.senders, receivers=dl.receivers, n_node=dl.n_node,
                           n_edge=dl.n_edge, globals=None)
