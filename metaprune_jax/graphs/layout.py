"""The graph layout: where each node and edge feature of a network's graph comes from.

All index arithmetic is done once per (architecture, widths, kept channels) in numpy and
cached as a :class:`GraphLayout`: every node and edge feature is a *gather* from the flat
variable vector (:mod:`metaprune_jax.graphs.flat`: all of the network's variables plus a
constant 0 and 1 slot), and the way back is the matching *scatter*. Every variable element
appears in exactly one writable graph slot (checked, :func:`_check_bijection`); constant slots
(defaults, identity edges, the zero padding of 1x1 kernels) are gathered but never written back.

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
features are the reference's; :mod:`metaprune_jax.graphs.reference_order` converts
(``reference_edge_order`` is the permutation, ``graph_to_reference_arrays`` and
``graph_from_reference_arrays`` the reference's exact arrays, both ways). Why: an HWIO kernel ``[kh, kw, I, O]`` is
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
from typing import Mapping, Sequence

import numpy as np

from metaprune_jax.graphs.flat import flat_spec
from metaprune_jax.nets.arch import CLASSES, INPUT, Arch


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
  """Node feature width of ``arch``'s graph: 8 (ResNet style), 5 (VGG), 9 (``'full'``)."""
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

  Raises:
    ValueError: ``keep`` naming an unknown space or holding indices that are not distinct and in
      ``[0, width)``, a padding budget smaller than the graph (it needs one padding node at
      least), or layers the arch's node/edge style cannot hold (e.g. a 5x5 conv in a
      single-kind graph).
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

