"""The metanetwork's functional API (docs/design.md section 4).

``init_metanet`` and ``apply_metanet`` (jitted, one compile per config and graph shapes; the
scatter path over any graph, or with ``plan=block_plan(arch)`` the dense-block path of
:mod:`metaprune_jax.metanetwork.blocks`), ``validate_graph``, ``pad_graph``/``unpad_graph``,
and network -> network: ``transform`` (``to_graph`` -> metanetwork -> ``from_graph``) and
``scramble_classifier``.

The rest of the metanetwork lives in one module per concern, re-exported here so
``metanet.X`` names all of it: :mod:`~metaprune_jax.metanetwork.config` (configs, matmul
precision), :mod:`~metaprune_jax.metanetwork.model` (the Flax module ``MetaNet`` and its maths)
and :mod:`~metaprune_jax.metanetwork.reference` (reference checkpoints, both ways).

Padding: ``pad_graph`` appends padding nodes and per-kind padding edges between padding nodes
only, so real outputs never depend on padding; graphs padded to one budget share one compile.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from metaprune_jax.metanetwork import blocks as metanet_blocks
from metaprune_jax.metanetwork.config import (PRECISIONS, _Spec, _spec, default_metanet_config,
                                              make_metanet_config, matmul_precision)
from metaprune_jax.metanetwork.model import MetaNet
from metaprune_jax.metanetwork.reference import export_reference_metanet, import_reference_metanet

__all__ = [
    # functional API (this module)
    "init_metanet", "apply_metanet", "validate_graph", "block_plan", "pad_graph", "unpad_graph",
    "transform", "scramble_classifier",
    # re-exported: config, model, reference checkpoints
    "PRECISIONS", "matmul_precision", "make_metanet_config", "default_metanet_config", "MetaNet",
    "import_reference_metanet", "export_reference_metanet",
]


# --------------------------------------------------------------------------------------------
# Public functional API.
# --------------------------------------------------------------------------------------------


def _module(spec: _Spec) -> MetaNet:
  return MetaNet(*spec)


def init_metanet(config, rng) -> Any:
  """Initialises metanetwork params (PyTorch-default-like uniform init).

  Args:
    config: metanetwork config (``make_metanet_config``).
    rng: PRNG key.

  Returns:
    The params pytree (``{'node_enc': ..., 'edge_enc_k': ..., 'convs': {'lin1'..'lin4',
    'downlin'}, 'node_dec': {'dense1', 'dense2'}, 'edge_dec_k': ...}``); the ``convs`` leaves
    carry a leading layer axis [L, ...] (the layers are one ``nn.scan``).

  Raises:
    ValueError: an unknown matmul precision in ``config``.
    AttributeError, KeyError: ``config`` lacks a field of ``make_metanet_config``.
  """
  spec = _spec(config)
  nodes = jnp.zeros((2, spec.node_dim + int(spec.importance_input)), jnp.float32)
  edges = tuple(jnp.zeros((1, d), jnp.float32) for d in spec.edge_dims)
  idx = jnp.zeros((len(spec.edge_dims),), jnp.int32)
  return _module(spec).init(rng, nodes, edges, idx, idx)["params"]


def _forward(spec: _Spec, params, graph, plan=None, node_valid=None, importance=None):
  """The metanetwork on ``graph``. Traceable.

  Args:
    spec: static config.
    params: metanetwork params.
    graph: ``GraphsTuple`` (see ``apply_metanet``).
    plan: optional ``metanet_blocks.BlockPlan`` of the graph's (unpadded) layout: selects the
      dense-block fast path (``block_plan``); None: the generic scatter path (any graph).
    node_valid: optional [N] validity mask (fast path only): masked channels of a full-width
      graph; their nodes and edges take no part and output 0 (``metanetwork.blocks``).
    importance: [N] (:func:`node_importance`), read when ``spec.importance_input``.
  """
  nodes_in = graph.nodes
  if spec.importance_input:
    if importance is None:
      raise ValueError("this metanetwork reads node importances (importance_input=True): pass "
                       "node_importance (metanet.node_importance) or use transform()")
    nodes_in = jnp.concatenate([nodes_in, importance[:, None].astype(nodes_in.dtype)], axis=1)
  if plan is not None:
    nodes, edges = metanet_blocks.forward(spec, params, nodes_in, tuple(graph.edges), plan,
                                          node_valid, graph.senders, graph.receivers)
    return graph._replace(nodes=nodes, edges=edges)
  if node_valid is not None:
    raise ValueError("node_valid needs a block plan (the dense-block path)")
  nodes, edges = _module(spec).apply({"params": params}, nodes_in, tuple(graph.edges),
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


def node_importance(arch, params, masks=None, num_nodes: int | None = None) -> jax.Array:
  """Each node's normalised group importance, the metanetwork's extra input with
  ``importance_input``: ``raw / max(raw)`` over its channel's group (group-L2, as pruning
  ranks channels; kept channels only when ``masks`` are given), 1 for input and class nodes,
  0 for masked channels and padding nodes. Traceable (``arch`` static); no gradient flows.

  Args:
    arch: the graph's architecture (the full-width one for a masked network).
    params: its params.
    masks: optional ``{space: [width]}`` channel masks (a masked full-width network).
    num_nodes: the graph's node count when padded (default: the real nodes).

  Returns:
    ``[num_nodes]`` float32, in the graph's node order.
  """
  from metaprune_jax.graphs import graph as graph_lib  # pylint: disable=g-import-not-at-top
  from metaprune_jax.prune import groups as groups_lib  # pylint: disable=g-import-not-at-top
  layout = graph_lib.graph_layout(arch)
  groups = {g.space: g for g in groups_lib.pruning_groups(arch, ignore_classes=False)}
  pieces, seen = [], 0
  for _, space, start, count in layout.node_sets:
    if start != seen:
      raise AssertionError(f"node sets are not contiguous at {start}")
    seen = start + count
    g = groups.get(space)
    if g is None:
      pieces.append(jnp.ones((count,), jnp.float32))
      continue
    raw = groups_lib.raw_group_importance(arch, params, g)
    keep = None if masks is None or space not in masks else masks[space] > 0
    if keep is None:
      imp = raw / jnp.maximum(jnp.max(raw), 1e-30)
    else:
      imp = jnp.where(keep, raw / jnp.maximum(jnp.max(jnp.where(keep, raw, 0.0)), 1e-30), 0.0)
    pieces.append(imp.astype(jnp.float32))
  out = jnp.concatenate(pieces)
  total = layout.num_real_nodes if num_nodes is None else int(num_nodes)
  out = jnp.pad(out, (0, total - out.shape[0]))
  return jax.lax.stop_gradient(out)


def apply_metanet(config, params, graph, check_finite: bool = True, plan=None,
                  node_importance=None):
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
    node_importance: ``[N]`` (:func:`node_importance`); needed by a metanetwork with
      ``importance_input`` (``transform`` computes it), ignored otherwise.

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
  spec = _spec(config)
  if spec.importance_input:
    if node_importance is None:
      raise ValueError("this metanetwork reads node importances (importance_input=True): pass "
                       "node_importance=metanet.node_importance(arch, params) or use transform()")
    node_importance = jnp.asarray(node_importance, jnp.float32)
    if node_importance.shape != (graph.nodes.shape[0],):
      raise ValueError(f"node_importance has shape {node_importance.shape}, the graph "
                       f"{graph.nodes.shape[0]} nodes")
  else:
    node_importance = None
  return _forward_jit(spec, params, graph, plan, None, node_importance)


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
# Network -> network.
# --------------------------------------------------------------------------------------------


def scramble_applies(arch) -> bool:
  """Whether the reference scrambles ``arch``'s classifier: single-kind graphs only (docs/design.md
  3.2; it decodes multi-kind graphs correctly)."""
  return getattr(arch, "edge_style", "single") == "single"


def scramble_classifier(arch, variables, masks=None):
  """Applies the reference's classifier scramble (docs/design.md 3.2) to ``variables``. Jittable.

  The reference decodes the single-kind graph's C*W classifier edges as if laid out [W, C], so
  its torch weight becomes ``out[c, w] = flat[w*C + c]`` with ``flat`` the original [C, W]
  weight in out-major order. With a flax kernel ``K`` [W, C] (= torch weight transposed) the
  result is ``K.T.reshape(W, C)``.

  Args:
    arch: the architecture (single-kind graph style).
    variables: ``{'params', 'batch_stats'}``; only the classifier kernel changes.
    masks: optional ``{space: [width]}`` channel masks of a masked full-width network (as in
      meta-training): the scramble is then the one the network materialised at the kept
      widths would get (it depends on the kept count ``w``, which may be traced), applied to
      the kept rows of the classifier kernel; pruned rows are left as they are. Without masks,
      or when the classifier's input space has none, all ``W`` rows are kept.

  Returns:
    New variables (shallow copies along the changed path).

  Raises:
    ValueError: for multi-kind graphs (the reference decodes those correctly).
  """
  if not scramble_applies(arch):
    raise ValueError(f"{arch.name}: the classifier scramble exists only for single-kind graphs "
                     "(resnet56/110, VGG); the reference decodes multi-kind graphs correctly")
  name = arch.classifier
  kernel = variables["params"][name]["kernel"]
  w, c = kernel.shape
  in_space = next(l.in_space for l in arch.layers if l.name == name)
  if masks is None or in_space not in masks:
    new_kernel = jnp.reshape(jnp.transpose(kernel), (w, c))
  else:
    # kept row i (its rank among the kept rows) of the materialised [n, C] kernel Ks becomes
    # Ks.T.reshape(n, C)[i, c] = Ks[k % n, k // n] with k = i*C + c; kept row r of Ks is full
    # row pos[r]
    keep = masks[in_space] > 0.5
    n = jnp.maximum(jnp.sum(keep.astype(jnp.int32)), 1)
    rank = jnp.cumsum(keep.astype(jnp.int32)) - 1                      # [W]
    pos = jnp.nonzero(keep, size=w, fill_value=0)[0]                    # [W]: kept rows first
    k = rank[:, None] * c + jnp.arange(c)[None, :]                      # [W, C]
    src = kernel[pos[k % n], k // n]                                    # [W, C]
    new_kernel = jnp.where(keep[:, None], src, kernel)
  params = dict(variables["params"])
  params[name] = dict(params[name], kernel=new_kernel)
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
  imp = (node_importance(arch, variables["params"]) if _spec(config).importance_input
         else None)
  out = apply_metanet(config, params, graph, plan=block_plan(arch), node_importance=imp)
  new = graph_lib.from_graph(arch, out)
  new = {"params": new["params"], "batch_stats": variables["batch_stats"]}
  if reference_compat and scramble_applies(arch):
    new = scramble_classifier(arch, new)
  return new
