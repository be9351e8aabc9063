"""The metanetwork: a bidirectional PNA-style GNN over a network's graph (docs/design.md section 4).

Implements the metanetwork of *Meta Pruning via Graph Metanetworks* exactly as the reference
(``nn/GNN.py``: ``MyGNN`` and ``MyGNN_resnet50``) computes it, as a Flax (linen) module over a
``jraph.GraphsTuple``:

```
node_h = NodeEnc(x);  edge_h = concat_k EdgeEnc_k(e_k)
inv    = [+1]*(h//2) + [-1]*((h+1)//2)
for l in 1..L:                          # one conv_l, used twice
  n1, e1 = conv_l(LN(node_h), senders -> receivers, edge_h)
  n2, e2 = conv_l(LN(node_h), receivers -> senders, inv * edge_h)
  node_h += n1 + n2;  edge_h += e1 + inv * e2
node_out = x + node_res_ratio * NodeDec(node_h);  edge_out_k = e_k + edge_res_ratio * EdgeDec_k
```

``conv(x, s -> r, a)``: ``A_j = SiLU(Dense_j(x))``; message ``A_2[r] * A_1[s] * a`` aggregated at
``r`` with mean/std/max/min (PyG semantics: std floor, zeros for nodes without incoming edges),
node update ``Dense(4h -> h)``; edge update ``A_3[s] * A_4[r] * a``.

Implementation notes (exact rewrites, not approximations):

* ``A_2[r]`` is constant within a segment, so it is factored out of the aggregation: the
  segment reductions run on ``p = A_1[s] * a`` and the results are scaled by ``A_2`` per node
  (max and min swap where ``A_2 < 0``; scaling by a scalar is monotone, so this is exact).
* ``inv`` is +-1, so ``inv * e2 = A_3[r] * A_4[s] * edge_h`` exactly.
* Edges are kept sorted by receiver through all layers (one permutation in, one out), so the
  first pass reduces sorted segments.
* The L layers are one ``nn.scan`` over a rematerialised layer body (params ``convs/*`` have a
  leading layer axis): a small program, fast compiles, and one layer of residuals in memory
  for the backward pass. Segment statistics have a custom VJP (XLA's scatter-max derivative is
  slow on CPU).

Initialisation follows PyTorch's default ``nn.Linear`` init (kernel and bias uniform in
``+-1/sqrt(fan_in)``), as the reference does, so fresh metanetworks behave alike (docs/design.md 4).

Padding: ``pad_graph`` appends padding nodes and per-kind padding edges between padding nodes
only, so real outputs never depend on padding; graphs padded to one budget share one compile.
"""

import collections
import functools
import re
from typing import Any, Mapping, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np

from metaprune_jax.metanetwork import blocks as metanet_blocks

_LN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------

_DEFAULTS = {
    # task: (num_layers, hidden, node_dim, edge_dims, node_res_ratio, edge_res_ratio)
    "resnet56": (8, 64, 8, (9,), 0.01, 0.01),
    "resnet110": (8, 64, 8, (9,), 0.01, 0.01),
    "vgg19": (8, 32, 5, (9,), 0.05, 0.05),
    "resnet50": (6, 16, 8, (49, 9, 1), 0.0005, 0.0005),
    "digits": (2, 16, 8, (9,), 0.01, 0.01),
}


# jax.lax.Precision's names (its enum values and their aliases)
PRECISIONS = ("default", "high", "highest", "fastest", "bfloat16", "tensorfloat32", "float32")


def matmul_precision(name: str) -> jax.lax.Precision:
  """The ``jax.lax.Precision`` named ``name`` (``config.metanet.precision``).

  ``'highest'`` (float32 products on every backend) where parity with the reference is checked;
  ``'default'`` lets the backend choose (on the CPU the same float32 products; on TPUs and on
  GPUs with TF32, bfloat16/TF32 passes, several times faster).

  Raises:
    ValueError: a name XLA does not know (the message names it and lists the known ones).
  """
  if not isinstance(name, str) or name.lower() not in PRECISIONS:
    raise ValueError(f"unknown metanetwork matmul precision {name!r}; XLA knows {PRECISIONS}")
  return jax.lax.Precision(name.lower())


def make_metanet_config(num_layers, hidden, node_dim, edge_dims, node_res_ratio,
                        edge_res_ratio, precision: str = "default") -> ml_collections.ConfigDict:
  """Builds a metanetwork config block.

  Args:
    num_layers: number of message-passing layers L.
    hidden: hidden width h.
    node_dim: node feature width (8 for ResNets, 5 for VGG).
    edge_dims: per-kind edge feature widths, in the graph's kind order, e.g. ``(9,)`` or
      ``(49, 9, 1)``.
    node_res_ratio: scale of the node decoder's output added to the input node features.
    edge_res_ratio: same for the edges.
    precision: the metanetwork's matmul precision (:func:`matmul_precision`): ``'highest'``
      where parity with the reference is checked, ``'default'`` (the backend's) otherwise.

  Returns:
    An ``ml_collections.ConfigDict`` with those fields.

  Raises:
    ValueError: an unknown precision name.
  """
  matmul_precision(precision)
  return ml_collections.ConfigDict({
      "num_layers": int(num_layers),
      "hidden": int(hidden),
      "node_dim": int(node_dim),
      "edge_dims": tuple(int(d) for d in edge_dims),
      "node_res_ratio": float(node_res_ratio),
      "edge_res_ratio": float(edge_res_ratio),
      "precision": str(precision).lower(),
  })


def default_metanet_config(task: str) -> ml_collections.ConfigDict:
  """The paper's metanetwork config for a task.

  Args:
    task: one of 'resnet56', 'resnet110', 'vgg19', 'resnet50', 'digits' (a small CPU config).

  Returns:
    The config (see ``make_metanet_config``).

  Raises:
    ValueError: for an unknown task.
  """
  if task not in _DEFAULTS:
    raise ValueError(f"No default metanetwork config for task {task!r}; known: "
                     f"{sorted(_DEFAULTS)}")
  return make_metanet_config(*_DEFAULTS[task])


class _Spec(NamedTuple):
  """Hashable, static view of a metanetwork config (a jit static argument)."""
  num_layers: int
  hidden: int
  node_dim: int
  edge_dims: Tuple[int, ...]
  node_res_ratio: float
  edge_res_ratio: float
  precision: str = "default"


def _spec(config) -> _Spec:
  precision = str(config.get("precision", "default")).lower()
  matmul_precision(precision)
  return _Spec(int(config.num_layers), int(config.hidden), int(config.node_dim),
               tuple(int(d) for d in config.edge_dims), float(config.node_res_ratio),
               float(config.edge_res_ratio), precision)


# --------------------------------------------------------------------------------------------
# Module.
# --------------------------------------------------------------------------------------------


def _torch_uniform(fan_in):
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class _Linear(nn.Module):
  """Dense layer with PyTorch's default init. Params: kernel [in, out], bias [out]."""
  features: int
  precision: str = "default"

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _torch_uniform(fan_in), (fan_in, self.features))
    bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
    return jnp.dot(x, kernel, precision=matmul_precision(self.precision)) + bias


def _layer_norm(x):
  """LayerNorm over the last axis, no scale/offset, eps 1e-5 (biased variance, as torch)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(var + _LN_EPS)


class _Decoder(nn.Module):
  """LN -> Dense(h, h) -> SiLU -> Dense(h, out)."""
  hidden: int
  out: int
  precision: str = "default"

  @nn.compact
  def __call__(self, x):
    x = _Linear(self.hidden, self.precision, name="dense1")(_layer_norm(x))
    return _Linear(self.out, self.precision, name="dense2")(nn.silu(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _segment_stats(p, seg, num_segments, sorted_):
  """Segment sum, sum of squares, max and min of ``p`` [E, h] at ``seg`` [E] (each [N, h]).

  Max/min are -inf/+inf at empty segments. The custom VJP (sum, 2p, and an even split among
  ties for max/min, as torch's ``scatter_reduce``) avoids XLA's slow scatter-max derivative.
  """
  return _segment_stats_fwd(p, seg, num_segments, sorted_)[0]


def _segment_stats_fwd(p, seg, num_segments, sorted_):
  kw = dict(num_segments=num_segments, indices_are_sorted=sorted_)
  s1 = jax.ops.segment_sum(p, seg, **kw)
  s2 = jax.ops.segment_sum(p * p, seg, **kw)
  mx = jax.ops.segment_max(p, seg, **kw)
  mn = jax.ops.segment_min(p, seg, **kw)
  return (s1, s2, mx, mn), (p, seg, mx, mn)


def _segment_stats_bwd(num_segments, sorted_, res, cot):
  p, seg, mx, mn = res
  g1, g2, gmx, gmn = cot
  kw = dict(num_segments=num_segments, indices_are_sorted=sorted_)
  take = functools.partial(jnp.take, axis=0, mode="clip")
  is_max = (p == take(mx, seg)).astype(p.dtype)
  is_min = (p == take(mn, seg)).astype(p.dtype)
  gmx = gmx / jnp.maximum(jax.ops.segment_sum(is_max, seg, **kw), 1.0)
  gmn = gmn / jnp.maximum(jax.ops.segment_sum(is_min, seg, **kw), 1.0)
  dp = (take(g1, seg) + 2.0 * p * take(g2, seg) + is_max * take(gmx, seg)
        + is_min * take(gmn, seg))
  return dp, None


_segment_stats.defvjp(_segment_stats_fwd, _segment_stats_bwd)


def _aggregate(p, scale, seg, count, sorted_):
  """PyG mean/std/max/min of messages ``scale[seg] * p`` at ``seg``, concatenated.

  Args:
    p: [E, h] float32 messages without the per-target factor.
    scale: [N, h] float32 per-target factor of the message.
    seg: [E] int32 target node of each message.
    count: [N, 1] float32 number of messages per node (layer-independent, computed once).
    sorted_: whether ``seg`` is sorted.

  Returns:
    [N, 4h] float32: mean, std, max, min; all zero at nodes without messages.
  """
  s1, s2, pmax, pmin = _segment_stats(p, seg, count.shape[0], sorted_)
  return metanet_blocks._finish(s1, s2, pmax, pmin, scale, count)  # pylint: disable=protected-access


class _Conv(nn.Module):
  """One metanetwork layer: the shared PNA conv applied forward and on reversed edges.

  Scanned over layers (``nn.scan``): carry ``(node_h [N, h], edge_h [E, h])`` with edges in
  receiver-sorted order; the other arguments are broadcast.
  """
  hidden: int
  precision: str = "default"

  @nn.compact
  def __call__(self, carry, senders, receivers, inv, count_r, count_s):
    node_h, edge_h = carry
    x = _layer_norm(node_h)
    a1 = nn.silu(_Linear(self.hidden, self.precision, name="lin1")(x))
    a2 = nn.silu(_Linear(self.hidden, self.precision, name="lin2")(x))
    a3 = nn.silu(_Linear(self.hidden, self.precision, name="lin3")(x))
    a4 = nn.silu(_Linear(self.hidden, self.precision, name="lin4")(x))
    downlin = _Linear(self.hidden, self.precision, name="downlin")
    take = functools.partial(jnp.take, axis=0, mode="clip")
    # Pass 1: s -> r, aggregated at receivers (sorted).
    agg1 = _aggregate(take(a1, senders) * edge_h, a2, receivers, count_r, True)
    # Pass 2: r -> s on inv * edge_h; inv is folded into the per-target factor.
    agg2 = _aggregate(take(a1, receivers) * edge_h, a2 * inv, senders, count_s, False)
    node_h = node_h + downlin(agg1) + downlin(agg2)
    e1 = take(a3, senders) * take(a4, receivers) * edge_h
    e2 = take(a3, receivers) * take(a4, senders) * edge_h
    edge_h = edge_h + e1 + e2
    return (node_h, edge_h), None


class MetaNet(nn.Module):
  """The reference metanetwork (``MyGNN`` / ``MyGNN_resnet50``) as a linen module.

  Attributes:
    num_layers, hidden, node_dim, edge_dims, node_res_ratio, edge_res_ratio, precision: see
      ``make_metanet_config``.
  """
  num_layers: int
  hidden: int
  node_dim: int
  edge_dims: Tuple[int, ...]
  node_res_ratio: float
  edge_res_ratio: float
  precision: str = "default"

  @nn.compact
  def __call__(self, nodes, edges, senders, receivers):
    """Runs the metanetwork.

    Args:
      nodes: [N, node_dim] float32.
      edges: tuple of per-kind [E_k, edge_dims[k]] float32, in kind order.
      senders: [E] int32, E = sum E_k, kind blocks contiguous in kind order.
      receivers: [E] int32.

    Returns:
      (nodes_out [N, node_dim], tuple of edges_out_k [E_k, edge_dims[k]]).
    """
    h = self.hidden
    inv = jnp.asarray([1.0] * (h // 2) + [-1.0] * ((h + 1) // 2), jnp.float32)
    node_h = _Linear(h, self.precision, name="node_enc")(nodes)
    edge_h = jnp.concatenate(
        [_Linear(h, self.precision, name=f"edge_enc_{k}")(e) for k, e in enumerate(edges)], axis=0)
    # Keep edges sorted by receiver through all layers (stable sort, exact inverse below).
    order = jnp.argsort(receivers, stable=True)
    s_sorted = jnp.take(senders, order)
    r_sorted = jnp.take(receivers, order)
    edge_h = jnp.take(edge_h, order, axis=0)
    n = nodes.shape[0]
    ones = jnp.ones(receivers.shape, jnp.float32)
    count_r = jax.ops.segment_sum(ones, r_sorted, n, indices_are_sorted=True)[:, None]
    count_s = jax.ops.segment_sum(ones, s_sorted, n)[:, None]
    # One scanned (and rematerialised) layer body: small HLO, one layer of residuals in memory.
    convs = nn.scan(nn.remat(_Conv), variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=self.num_layers)
    (node_h, edge_h), _ = convs(h, self.precision, name="convs")((node_h, edge_h), s_sorted, r_sorted, inv,
                                                count_r, count_s)
    num_edges = order.shape[0]
    unsort = jnp.zeros((num_edges,), jnp.int32).at[order].set(
        jnp.arange(num_edges, dtype=jnp.int32), unique_indices=True)
    edge_h = jnp.take(edge_h, unsort, axis=0)
    nodes_out = nodes + self.node_res_ratio * _Decoder(h, self.node_dim, self.precision, name="node_dec")(node_h)
    edges_out, start = [], 0
    for k, e in enumerate(edges):
      dec = _Decoder(h, self.edge_dims[k], self.precision, name=f"edge_dec_{k}")
      edges_out.append(e + self.edge_res_ratio * dec(edge_h[start:start + e.shape[0]]))
      start += e.shape[0]
    return nodes_out, tuple(edges_out)


def _module(spec: _Spec) -> MetaNet:
  return MetaNet(*spec)


# --------------------------------------------------------------------------------------------
# Public functional API.
# --------------------------------------------------------------------------------------------


def init_metanet(config, rng) -> Any:
  """Initialises metanetwork params (PyTorch-default-like uniform init).

  Args:
    config: metanetwork config (``make_metanet_config``).
    rng: PRNG key.

  Returns:
    The params pytree (``{'node_enc': ..., 'edge_enc_k': ..., 'convs': {'lin1'..'lin4',
    'downlin'}, 'node_dec': {'dense1', 'dense2'}, 'edge_dec_k': ...}``); the ``convs`` leaves
    carry a leading layer axis [L, ...] (the layers are one ``nn.scan``).
  """
  spec = _spec(config)
  nodes = jnp.zeros((2, spec.node_dim), jnp.float32)
  edges = tuple(jnp.zeros((1, d), jnp.float32) for d in spec.edge_dims)
  idx = jnp.zeros((len(spec.edge_dims),), jnp.int32)
  return _module(spec).init(rng, nodes, edges, idx, idx)["params"]


def _forward(spec: _Spec, params, graph, plan=None, node_valid=None):
  """The metanetwork on ``graph``. Traceable.

  Args:
    spec: static config.
    params: metanetwork params.
    graph: ``GraphsTuple`` (see ``apply_metanet``).
    plan: optional ``metanet_blocks.BlockPlan`` of the graph's (unpadded) layout: selects the
      dense-block fast path (``block_plan``); None: the generic scatter path (any graph).
    node_valid: optional [N] validity mask (fast path only): masked channels of a full-width
      graph; their nodes and edges take no part and output 0 (``metanetwork.blocks``).
  """
  if plan is not None:
    nodes, edges = metanet_blocks.forward(spec, params, graph.nodes, tuple(graph.edges), plan,
                                          node_valid, graph.senders, graph.receivers)
    return graph._replace(nodes=nodes, edges=edges)
  if node_valid is not None:
    raise ValueError("node_valid needs a block plan (the dense-block path)")
  nodes, edges = _module(spec).apply({"params": params}, graph.nodes, tuple(graph.edges),
                                     graph.senders, graph.receivers)
  return graph._replace(nodes=nodes, edges=edges)


# One compilation per (spec, padded graph shapes[, plan]).
_forward_jit = jax.jit(_forward, static_argnums=(0, 3))


def block_plan(arch):
  """The dense-block plan of ``arch``'s full graph (cached; a jit static argument)."""
  return _block_plan(arch)


@functools.lru_cache(maxsize=64)
def _block_plan(arch):
  from metaprune_jax.graphs import graph as graph_lib  # pylint: disable=g-import-not-at-top
  return metanet_blocks.block_plan_from_layout(graph_lib.graph_layout(arch))


def validate_graph(config, graph, check_finite: bool = True) -> None:
  """Checks that a graph fits the metanetwork. Not jittable (reads concrete arrays).

  Args:
    config: metanetwork config.
    graph: ``jraph.GraphsTuple`` (edges a tuple of per-kind arrays, see ``apply_metanet``).
    check_finite: also check that node/edge features are finite (skipped for traced arrays).

  Raises:
    ValueError: wrong node width, an edge kind without an encoder, inconsistent edge counts,
      or NaN/Inf features.
  """
  spec = _spec(config)
  edges = graph.edges
  if not isinstance(edges, (tuple, list)):
    edges = (edges,)
  if graph.nodes.ndim != 2 or graph.nodes.shape[1] != spec.node_dim:
    raise ValueError(f"graph.nodes has shape {tuple(graph.nodes.shape)}; the metanetwork "
                     f"expects [num_nodes, {spec.node_dim}]")
  dims = tuple(int(e.shape[-1]) if e.ndim == 2 else -1 for e in edges)
  if dims != spec.edge_dims:
    unknown = [d for d in dims if d not in spec.edge_dims]
    what = (f"edge kind(s) of width {unknown} have no encoder" if unknown else
            "edge kinds are in the wrong order or number")
    raise ValueError(f"graph edge kinds {dims} do not fit the metanetwork's edge_dims "
                     f"{spec.edge_dims}: {what}")
  num_edges = sum(int(e.shape[0]) for e in edges)
  if graph.senders.shape != (num_edges,) or graph.receivers.shape != (num_edges,):
    raise ValueError(f"senders {tuple(graph.senders.shape)} / receivers "
                     f"{tuple(graph.receivers.shape)} must both be [{num_edges}] (sum of the "
                     "per-kind edge counts)")
  if check_finite:
    named = [("nodes", graph.nodes)] + [(f"edges[{k}]", e) for k, e in enumerate(edges)]
    for name, arr in named:
      if isinstance(arr, jax.core.Tracer):
        continue
      bad = ~np.isfinite(np.asarray(arr))
      if bad.any():
        rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
        raise ValueError(f"graph.{name} has {int(bad.sum())} non-finite (NaN/Inf) values, "
                         f"first rows {rows}; the input network has NaN/Inf parameters")


def apply_metanet(config, params, graph, check_finite: bool = True, plan=None):
  """Applies the metanetwork to a graph (jitted; one compile per config and graph shapes).

  Args:
    config: metanetwork config.
    params: params from ``init_metanet`` / ``import_reference_metanet``.
    graph: ``jraph.GraphsTuple`` with ``nodes`` [N, node_dim] float32, ``edges`` a tuple of
      per-kind [E_k, edge_dims[k]] float32 (kind order = config.edge_dims), ``senders`` /
      ``receivers`` [E] int32 (E = sum E_k, kind blocks contiguous in order; senders = the
      layer's output channel), ``n_node``/``n_edge`` [G] int32. May be padded (``pad_graph``).
    check_finite: raise on NaN/Inf input features (checked outside jit; skipped for tracers).
    plan: optional ``block_plan(arch)`` of the graph's architecture (graphs made by
      ``graph.to_graph(arch, ...)``, unpadded): the dense-block fast path, same outputs.

  Returns:
    A ``GraphsTuple`` of the same structure with the predicted nodes and edges.

  Raises:
    ValueError: see ``validate_graph``.
  """
  validate_graph(config, graph, check_finite)
  graph = graph._replace(edges=tuple(graph.edges) if isinstance(graph.edges, (tuple, list))
                         else (graph.edges,),
                         senders=jnp.asarray(graph.senders, jnp.int32),
                         receivers=jnp.asarray(graph.receivers, jnp.int32))
  if plan is not None and (int(graph.nodes.shape[0]) != plan.num_nodes or tuple(
      int(e.shape[0]) for e in graph.edges) != plan.num_edges):
    raise ValueError(f"graph ({graph.nodes.shape[0]} nodes, edges "
                     f"{tuple(int(e.shape[0]) for e in graph.edges)}) does not fit the block plan "
                     f"({plan.num_nodes} nodes, edges {plan.num_edges})")
  return _forward_jit(_spec(config), params, graph, plan)


# --------------------------------------------------------------------------------------------
# Padding.
# --------------------------------------------------------------------------------------------


def pad_graph(graph, num_nodes: int, num_edges_per_kind: Sequence[int]):
  """Pads a graph to a fixed budget (jraph.pad_with_graphs style, per edge kind). Not jittable.

  Padding nodes are appended (zero features); padding edges of kind k (zero features) are
  appended to kind k's block and connect the last node (a padding node) to itself, so no real
  node ever sees them. A trailing padding graph holds all padding nodes and edges.

  Args:
    graph: ``GraphsTuple`` as in ``apply_metanet``.
    num_nodes: node budget; must exceed the graph's node count (one padding node at least).
    num_edges_per_kind: per-kind edge budgets, each >= that kind's edge count.

  Returns:
    The padded ``GraphsTuple`` (numpy arrays).

  Raises:
    ValueError: if a budget is too small.
  """
  edges = tuple(graph.edges) if isinstance(graph.edges, (tuple, list)) else (graph.edges,)
  n = int(graph.nodes.shape[0])
  if num_nodes <= n:
    raise ValueError(f"num_nodes={num_nodes} must exceed the graph's {n} nodes")
  if len(num_edges_per_kind) != len(edges):
    raise ValueError(f"{len(num_edges_per_kind)} edge budgets for {len(edges)} edge kinds")
  senders = np.asarray(graph.senders)
  receivers = np.asarray(graph.receivers)
  pad_node = num_nodes - 1
  new_edges, new_s, new_r, start = [], [], [], 0
  for k, (e, budget) in enumerate(zip(edges, num_edges_per_kind)):
    e = np.asarray(e)
    ek = e.shape[0]
    if budget < ek:
      raise ValueError(f"edge budget {budget} for kind {k} is below its {ek} edges")
    new_edges.append(np.concatenate([e, np.zeros((budget - ek, e.shape[1]), e.dtype)]))
    fill = np.full((budget - ek,), pad_node, np.int32)
    new_s.append(np.concatenate([senders[start:start + ek].astype(np.int32), fill]))
    new_r.append(np.concatenate([receivers[start:start + ek].astype(np.int32), fill]))
    start += ek
  nodes = np.asarray(graph.nodes)
  nodes = np.concatenate([nodes, np.zeros((num_nodes - n, nodes.shape[1]), nodes.dtype)])
  n_node = np.concatenate([np.asarray(graph.n_node, np.int32), [num_nodes - n]]).astype(np.int32)
  n_edge = np.concatenate([np.asarray(graph.n_edge, np.int32),
                           [sum(num_edges_per_kind) - start]]).astype(np.int32)
  return jraph.GraphsTuple(nodes=nodes, edges=tuple(new_edges), senders=np.concatenate(new_s),
                           receivers=np.concatenate(new_r), n_node=n_node, n_edge=n_edge,
                           globals=graph.globals)


def unpad_graph(graph, ref):
  """Cuts a padded graph's features back to an unpadded reference graph. Jittable.

  Args:
    graph: padded ``GraphsTuple`` (output of ``apply_metanet`` on ``pad_graph(ref, ...)``).
    ref: the unpadded graph (gives the sizes and the topology of the result).

  Returns:
    A ``GraphsTuple`` with ref's topology and graph's features at the real nodes/edges.
  """
  ref_edges = tuple(ref.edges) if isinstance(ref.edges, (tuple, list)) else (ref.edges,)
  edges = tuple(e[:r.shape[0]] for e, r in zip(graph.edges, ref_edges))
  return ref._replace(nodes=graph.nodes[:ref.nodes.shape[0]], edges=edges)


# --------------------------------------------------------------------------------------------
# Reference checkpoints.
# --------------------------------------------------------------------------------------------


def _get(sd, key, shape):
  if key not in sd:
    raise ValueError(f"reference metanetwork state dict lacks {key!r} (expected shape {shape})")
  arr = np.asarray(sd[key], np.float32)
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"reference key {key!r} has shape {tuple(arr.shape)}, expected "
                     f"{tuple(shape)} for this metanetwork config")
  return arr


def _edge_suffixes(spec: _Spec):
  if len(spec.edge_dims) == 1:
    return [""]
  return [f"_{d}" for d in spec.edge_dims]


def _reference_layout(spec: _Spec):
  """Ordered (reference key, torch shape, params path or None) of the reference state dict."""
  h, out = spec.hidden, []
  out.append(("edgeInverter", (h,), None))
  out.append(("nodeEnc.weight", (h, spec.node_dim), ("node_enc", "kernel")))
  out.append(("nodeEnc.bias", (h,), ("node_enc", "bias")))
  for l in range(spec.num_layers):
    for j in range(1, 5):
      out.append((f"convs.{l}.lin{j}.0.weight", (h, h), ("convs", l, f"lin{j}", "kernel")))
      out.append((f"convs.{l}.lin{j}.0.bias", (h,), ("convs", l, f"lin{j}", "bias")))
    out.append((f"convs.{l}.downlin.weight", (h, 4 * h), ("convs", l, "downlin", "kernel")))
    out.append((f"convs.{l}.downlin.bias", (h,), ("convs", l, "downlin", "bias")))
  for l in range(spec.num_layers):
    out.append((f"mlps.{l}.0.weight", (h, h), None))
    out.append((f"mlps.{l}.0.bias", (h,), None))
  sfx = _edge_suffixes(spec)
  for k, d in enumerate(spec.edge_dims):
    out.append((f"edgeEnc{sfx[k]}.weight", (h, d), (f"edge_enc_{k}", "kernel")))
    out.append((f"edgeEnc{sfx[k]}.bias", (h,), (f"edge_enc_{k}", "bias")))
  for k, d in enumerate(spec.edge_dims):
    for i, name, shape in ((1, "dense1", (h, h)), (3, "dense2", (d, h))):
      out.append((f"edgeDec{sfx[k]}.{i}.weight", shape, (f"edge_dec_{k}", name, "kernel")))
      out.append((f"edgeDec{sfx[k]}.{i}.bias", shape[:1], (f"edge_dec_{k}", name, "bias")))
  for i, name, shape in ((1, "dense1", (h, h)), (3, "dense2", (spec.node_dim, h))):
    out.append((f"nodeDec.{i}.weight", shape, ("node_dec", name, "kernel")))
    out.append((f"nodeDec.{i}.bias", shape[:1], ("node_dec", name, "bias")))
  return out


def import_reference_metanet(state_dict: Mapping[str, Any], node_res_ratio: float,
                             edge_res_ratio: float):
  """Loads a reference (PyTorch) metanetwork state dict.

  Layers, hidden width, node width and edge kinds are inferred from the shapes: the single-kind
  ``MyGNN`` (``edgeEnc``) or the multi-kind ``MyGNN_resnet50`` (``edgeEnc_<dim>``, kinds in the
  state dict's order). ``mlps.*`` and ``edgeInverter`` are ignored.

  Args:
    state_dict: mapping of reference key -> array (numpy or torch-like with ``__array__``).
    node_res_ratio: node residual ratio (not stored in the checkpoint).
    edge_res_ratio: edge residual ratio.

  Returns:
    (config, params); the config's matmul precision is ``'highest'`` (parity with the
    reference).

  Raises:
    ValueError: naming the key and expected shape when something does not fit.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  if "nodeEnc.weight" not in sd:
    raise ValueError("reference metanetwork state dict lacks 'nodeEnc.weight'")
  hidden, node_dim = sd["nodeEnc.weight"].shape
  layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"convs\.(\d+)\.", k)] if m})
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"reference state dict has conv layers {layers}; expected convs.0..L-1")
  if "edgeEnc.weight" in sd:
    edge_dims = (int(sd["edgeEnc.weight"].shape[1]),)
  else:
    suffixes = [m.group(1) for k in sd for m in [re.fullmatch(r"edgeEnc_(\d+)\.weight", k)] if m]
    if not suffixes:
      raise ValueError("reference state dict has neither 'edgeEnc.weight' nor "
                       "'edgeEnc_<dim>.weight' keys")
    edge_dims = tuple(int(sd[f"edgeEnc_{s}.weight"].shape[1]) for s in suffixes)
    for s, d in zip(suffixes, edge_dims):
      if int(s) != d:
        raise ValueError(f"reference key 'edgeEnc_{s}.weight' has input width {d}, expected {s}")
  # HIGHEST: a reference metanetwork is imported to reproduce the reference's numbers
  config = make_metanet_config(len(layers), hidden, node_dim, edge_dims, node_res_ratio,
                               edge_res_ratio, precision="highest")
  params = {}
  for key, shape, path in _reference_layout(_spec(config)):
    if path is None:
      continue
    arr = _get(sd, key, shape)
    if path[-1] == "kernel":
      arr = arr.T
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
  # Per-layer conv weights are stacked on a leading layer axis (the scanned layer).
  convs = params.pop("convs")
  layers = [convs[l] for l in range(len(convs))]
  params["convs"] = jax.tree_util.tree_map(lambda *a: np.stack(a), *layers)
  return config, jax.tree_util.tree_map(jnp.asarray, params)


def _leaf(params, path):
  """The numpy array at a layout path; ``('convs', l, ...)`` indexes the stacked layer axis."""
  if path[0] == "convs":
    return np.asarray(params["convs"][path[2]][path[3]], np.float32)[path[1]]
  node = params
  for p in path:
    node = node[p]
  return np.asarray(node, np.float32)


def export_reference_metanet(config, params) -> "collections.OrderedDict[str, np.ndarray]":
  """Writes params as the reference state dict (exact inverse of ``import_reference_metanet``).

  ``mlps.*`` (unused by the reference's forward) are written as zeros; ``edgeInverter`` as the
  reference buffer. Also reads gradients that have the structure of params.

  Args:
    config: metanetwork config.
    params: params pytree.

  Returns:
    Ordered dict reference key -> float32 numpy array (torch layout: Linear weight [out, in]).
  """
  spec = _spec(config)
  h = spec.hidden
  out = collections.OrderedDict()
  for key, shape, path in _reference_layout(spec):
    if path is None:
      if key == "edgeInverter":
        out[key] = np.asarray([1.0] * (h // 2) + [-1.0] * ((h + 1) // 2), np.float32)
      else:
        out[key] = np.zeros(shape, np.float32)
      continue
    arr = _leaf(params, path)
    out[key] = arr.T if path[-1] == "kernel" else arr
  return out


# --------------------------------------------------------------------------------------------
# Network -> network.
# --------------------------------------------------------------------------------------------


def scramble_classifier(arch, variables):
  """Applies the reference's classifier scramble (docs/design.md 3.2) to ``variables``. Jittable.

  The reference decodes the single-kind graph's C*W classifier edges as if laid out [W, C], so
  its torch weight becomes ``out[c, w] = flat[w*C + c]`` with ``flat`` the original [C, W]
  weight in out-major order. With a flax kernel ``K`` [W, C] (= torch weight transposed) the
  result is ``K.T.reshape(W, C)``.

  Args:
    arch: the architecture (single-kind graph style).
    variables: ``{'params', 'batch_stats'}``; only the classifier kernel changes.

  Returns:
    New variables (shallow copies along the changed path).

  Raises:
    ValueError: for multi-kind graphs (the reference decodes those correctly).
  """
  if getattr(arch, "edge_style", "single") != "single":
    raise ValueError(f"{arch.name}: the classifier scramble exists only for single-kind graphs "
                     "(resnet56/110, VGG); the reference decodes multi-kind graphs correctly")
  name = arch.classifier
  kernel = variables["params"][name]["kernel"]
  w, c = kernel.shape
  params = dict(variables["params"])
  params[name] = dict(params[name], kernel=jnp.reshape(jnp.transpose(kernel), (w, c)))
  return dict(variables, params=params)


def transform(config, params, arch, variables, reference_compat: bool = False):
  """The network the metanetwork makes of ``variables`` (same architecture and widths).

  ``to_graph`` -> ``apply_metanet`` -> ``from_graph``; BatchNorm running statistics are taken
  from the input (docs/design.md 3.1: the reference discards the predicted ones). Differentiable
  with respect to ``params`` (call it under ``jax.grad``; the graph arrays stay concrete).

  Args:
    config: metanetwork config (its node_dim/edge_dims must fit ``arch``'s graph).
    params: metanetwork params.
    arch: the network's architecture at its widths.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    reference_compat: reproduce the reference's classifier scramble (single-kind graphs only),
      as needed to match its ``logits_after_metanet``.

  Returns:
    ``{'params', 'batch_stats'}`` of the same shapes.

  Raises:
    ValueError: NaN/Inf in the network, or a graph that does not fit the metanetwork.
  """
  from metaprune_jax.graphs import graph as graph_lib  # pylint: disable=g-import-not-at-top

  graph = graph_lib.to_graph(arch, variables)
  out = apply_metanet(config, params, graph, plan=block_plan(arch))
  new = graph_lib.from_graph(arch, out)
  new = {"params": new["params"], "batch_stats": variables["batch_stats"]}
  if reference_compat and getattr(arch, "edge_style", "single") == "single":
    new = scramble_classifier(arch, new)
  return new
