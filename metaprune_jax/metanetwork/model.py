"""The metanetwork model: a bidirectional PNA-style GNN over a network's graph (docs/design.md 4).

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

The functional API over this module (``init_metanet``, ``apply_metanet``, padding, ``transform``)
is :mod:`metaprune_jax.metanetwork.metanet`; the dense-block path with the same maths is
:mod:`metaprune_jax.metanetwork.blocks`.
"""

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.metanetwork import blocks as metanet_blocks
from metaprune_jax.metanetwork.config import matmul_precision

_LN_EPS = 1e-5


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

  ``MetaNet(**config).apply({'params': params}, nodes, edges, senders, receivers)`` maps
  ``nodes [N, node_dim]`` and per-kind ``edges [E_k, edge_dims[k]]`` to outputs of the same
  shapes (see :meth:`__call__`); it checks nothing: :func:`apply_metanet` validates the graph
  (``validate_graph``) before calling it.

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
  importance_input: bool = False

  @nn.compact
  def __call__(self, nodes, edges, senders, receivers):
    """Runs the metanetwork.

    Args:
      nodes: [N, node_dim] float32 (``[N, node_dim + 1]`` with ``importance_input``: the last
        column is an input only).
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
    nodes_out = nodes[:, :self.node_dim] + self.node_res_ratio * _Decoder(h, self.node_dim, self.precision, name="node_dec")(node_h)
    edges_out, start = [], 0
    for k, e in enumerate(edges):
      dec = _Decoder(h, self.edge_dims[k], self.precision, name=f"edge_dec_{k}")
      edges_out.append(e + self.edge_res_ratio * dec(edge_h[start:start + e.shape[0]]))
      start += e.shape[0]
    return nodes_out, tuple(edges_out)
