"""Dense-block fast path of the metanetwork (same maths as ``model.MetaNet``, no scatters).

Why one module of ~650 lines: the block plan, the per-group edge maths with its custom VJPs, the
CPU-kernel dispatch and :func:`forward` are one algorithm with one set of invariants. Each
backward rule restates its forward's maths and changes with it, the kernel path must agree with
the XLA path value for value (and tie for tie, below), the plan's static index arrays fix the
tensor shapes every function assumes, and :func:`forward` is the only entry point. Split, these
would trade private helpers across files that must still be read and changed together.

A network's graph is a concatenation of edge *blocks* (docs/design.md 3): every conv/dense layer
and every single-kind identity shortcut is a full bipartite grid of (output channel ->
input channel) edges in input-major order (``graphs.layout``'s docstring), so its ``[I * O, h]``
edge tensor is ``[I, O, h]`` = [receivers, senders, h] and the PNA aggregation at the input
channels (pass 1) is a reduction over axis 1, at the output channels (pass 2) over axis 0. Multi-kind identity shortcuts are diagonal (one edge per
channel, reversed): each of their edges is the only message of its block at either end.

:class:`BlockPlan` (static, per architecture) groups blocks of equal shape and kind into
stacked ``[B, S, R, h]`` tensors (S = senders, R = receivers of a block); per-block partial
statistics (sum, sum of squares, max, min, count) are combined per node by small static
gathers (node sets are contiguous ranges, a node receives from at most a few blocks).

Masked networks: with ``node_valid`` ``[N]`` (1 = real channel, 0 = pruned), an edge is valid
iff both ends are; aggregations see valid edges only (mean over valid messages, max/min over
valid ones, zero for a node without valid messages), so valid nodes and edges compute exactly
what the graph of the materialised (pruned) network computes; outputs at invalid nodes and
edges are set to 0. The graph keeps the full-width shapes whatever the mask, so one
compilation serves every pruned data model of an architecture.

The per-group edge work of a layer (both passes' statistics and the edge update) is one
custom-VJP function whose backward recomputes the messages from the saved edge tensor (max/min
gradients are split evenly among ties, as ``torch.scatter_reduce`` and the scatter path do).
The forward computes a large group's statistics a cache-sized chunk of blocks at a time
(:func:`_map_blocks`), which changes no bit of the results; the edge update and the backward
run on the whole group (a block loop's stacked full-size output cost more than it saved).

On the CPU a layer's grid-group edge work runs in custom kernels instead (:func:`_layer_ffi`,
``cpu_kernels``: one call per layer, one pass over the edges forward and one backward, each
node's statistics combined across its blocks inside the kernel; ``forward``'s ``grid_impl``
chooses), and the layers are unrolled rather than scanned. The same maths, with one difference
at exact ties: the kernels split a max/min gradient evenly among all of a node's tied messages
(as torch's ``scatter_reduce`` and the scatter path do), the XLA path among a block's tied
messages and then evenly among tied blocks. ResNet-56 (hidden 64), 2-core Intel VM, 2026-12-03
(``benchmarks/metanet.py``): forward 0.28-0.33 s on XLA's fusions, 0.19-0.21 s with one kernel
per group (the day's first version), 0.12-0.14 s with one per layer; forward+backward 1.04-1.21,
0.63-0.72 and 0.39-0.55 s. GPUs and TPUs run the XLA maths.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.backends import cpu_kernels
from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph as graph_lib

_LN_EPS = 1e-5
_STD_EPS = 1e-5


class BlockGroup(NamedTuple):
  """Blocks of one edge kind and shape, stacked. Static.

  ``diag``: one edge per channel (multi-kind identity), edge j = (senders[j] -> receivers[j]);
  else a full grid, receiver-major: edge (s, r) at offset ``r * s_size + s`` of the block.
  """
  kind: int
  diag: bool
  s_size: int
  r_size: int
  starts: Tuple[int, ...]   # first edge of each block within its kind
  s_start: Tuple[int, ...]  # first sender node of each block
  r_start: Tuple[int, ...]  # first receiver node of each block


class BlockPlan(NamedTuple):
  """The block structure of one (unpadded) graph layout. Hashable (a jit static argument)."""
  num_nodes: int
  num_edges: Tuple[int, ...]
  groups: Tuple[BlockGroup, ...]
  order: Tuple[Tuple[Tuple[int, int], ...], ...]  # per kind: (group, block) in edge order


def block_plan_from_layout(layout) -> BlockPlan:
  """The :class:`BlockPlan` of an unpadded :class:`graphs.layout.GraphLayout` (checked per edge).

  Raises:
    ValueError: padded layouts, or blocks whose senders/receivers are not a grid/diagonal.
  """
  if layout.num_real_nodes != layout.num_nodes or tuple(layout.num_real_edges) != tuple(
      layout.num_edges):
    raise ValueError("block plans are built from unpadded (full-width) layouts")
  node_start = [s for _, _, s, _ in layout.node_sets]
  node_count = [c for _, _, _, c in layout.node_sets]
  kind_off = np.concatenate([[0], np.cumsum(layout.num_edges)])
  snd, rcv = np.asarray(layout.senders), np.asarray(layout.receivers)
  keys, members, blocks = [], {}, []
  for name, ki, start, count, dst, src in layout.edge_blocks:
    o, i = node_count[dst], node_count[src]
    g0 = int(kind_off[ki]) + start
    s, r = snd[g0:g0 + count], rcv[g0:g0 + count]
    if count == o * i and np.array_equal(s, np.tile(node_start[dst] + np.arange(o), i)) and \
       np.array_equal(r, np.repeat(node_start[src] + np.arange(i), o)):
      key = (ki, False, o, i)
      blk = (start, node_start[dst], node_start[src])
    elif o == i and count == o and np.array_equal(s, node_start[src] + np.arange(o)) and \
        np.array_equal(r, node_start[dst] + np.arange(o)):
      key = (ki, True, o, o)
      blk = (start, node_start[src], node_start[dst])
    else:
      raise ValueError(f"edge block {name} is neither a full grid nor a reversed diagonal")
    if key not in members:
      keys.append(key)
      members[key] = []
    members[key].append(blk)
    blocks.append((ki, key, len(members[key]) - 1))
  groups = tuple(BlockGroup(k[0], k[1], k[2], k[3], tuple(b[0] for b in members[k]),
                            tuple(b[1] for b in members[k]), tuple(b[2] for b in members[k]))
                 for k in keys)
  gid = {k: j for j, k in enumerate(keys)}
  order = []
  for ki in range(len(layout.edge_kinds)):
    order.append(tuple((gid[key], b) for k, key, b in blocks if k == ki))
  return BlockPlan(layout.num_nodes, tuple(layout.num_edges), groups, tuple(order))


# --------------------------------------------------------------------------------------------
# Static index arrays of a plan.
# --------------------------------------------------------------------------------------------


class _Index(NamedTuple):
  s_idx: tuple      # per group [B, S] int32 sender node ids
  r_idx: tuple      # per group [B, R] receiver node ids
  gather1: np.ndarray  # [N, K1] rows of the pass-1 partials (receiver side); sentinel = last
  gather2: np.ndarray  # [N, K2] rows of the pass-2 partials (sender side)


def _gather_rows(num_nodes, row_nodes):
  """[N, K] row ids per node (padded with the sentinel row ``len(row_nodes)``)."""
  row_nodes = np.asarray(row_nodes, np.int64)
  counts = np.bincount(row_nodes, minlength=num_nodes)
  k = max(int(counts.max()) if counts.size else 0, 1)
  out = np.full((num_nodes, k), row_nodes.size, np.int32)
  order = np.argsort(row_nodes, kind="stable")
  slot = np.arange(row_nodes.size) - np.repeat(np.cumsum(counts) - counts, counts)
  out[row_nodes[order], slot] = order
  return out


@functools.lru_cache(maxsize=32)
def _index(plan: BlockPlan) -> _Index:
  s_idx, r_idx, rows1, rows2 = [], [], [], []
  for g in plan.groups:
    s = (np.asarray(g.s_start)[:, None] + np.arange(g.s_size)[None]).astype(np.int32)
    r = (np.asarray(g.r_start)[:, None] + np.arange(g.r_size)[None]).astype(np.int32)
    s_idx.append(s)
    r_idx.append(r)
    rows1.append(r.ravel())
    rows2.append(s.ravel())
  n = plan.num_nodes
  cat = lambda x: np.concatenate(x) if x else np.zeros((0,), np.int32)
  return _Index(tuple(s_idx), tuple(r_idx), _gather_rows(n, cat(rows1)),
                _gather_rows(n, cat(rows2)))


@functools.lru_cache(maxsize=32)
def _diag_gathers(plan: BlockPlan):
  """``_Index.gather1``/``gather2`` over the diagonal groups' partial rows only (the kernel
  path combines the grid groups in its kernel)."""
  idx = _index(plan)
  rows1 = [r.ravel() for g, r in zip(plan.groups, idx.r_idx) if g.diag]
  rows2 = [s.ravel() for g, s in zip(plan.groups, idx.s_idx) if g.diag]
  cat = lambda x: np.concatenate(x) if x else np.zeros((0,), np.int32)
  return (_gather_rows(plan.num_nodes, cat(rows1)), _gather_rows(plan.num_nodes, cat(rows2)))


# --------------------------------------------------------------------------------------------
# Per-group edge work of one layer (custom VJP).
# --------------------------------------------------------------------------------------------


def _sum(x, axis: int):
  """``jnp.sum(x, axis)`` of a ``[B, ...]`` group tensor (``axis`` > 0).

  A single-block group (B == 1) is summed without its unit axis: XLA:CPU's sums over
  ``[1, S, R, h]`` ran 20-50x slower than the same sums over ``[S, R, h]`` (2-core Intel VM,
  2026-12-03: 23.5 against 0.5 ms for ``[1, 157, 160, 32]``, 5.8 against 0.13 ms for
  ``[1, 64, 64, 64]``; max and min, and B >= 2, were unaffected). The same sum; XLA may order
  its additions differently.
  """
  if x.shape[0] == 1:
    return jnp.sum(x[0], axis - 1)[None]
  return jnp.sum(x, axis)


def _grid_fwd_math(E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr):
  """Full-grid group: statistics of both passes (the edge update is :func:`_grid_update`).

  E [B, S, R, h]; a*s [B, S, h]; a*r [B, R, h] (a1 already zeroed at invalid nodes);
  vs [B, S, 1] / vr [B, R, 1] bool validity or None. Here S and R name E's two node axes
  (messages S -> R reduced over axis 1, R -> S over axis 2); ``forward`` passes the graph's
  receiver-major blocks with the receivers as S.

  """
  # messages s -> r (reduced over S, axis 1) and r -> s (over R, axis 2)
  p1, p2 = a1s[:, :, None, :] * E, a1r[:, None, :, :] * E
  inf = jnp.asarray(jnp.inf, E.dtype)
  if vs is None:
    mx1, mn1 = jnp.max(p1, 1), jnp.min(p1, 1)
    mx2, mn2 = jnp.max(p2, 2), jnp.min(p2, 2)
  else:
    # Invalid messages are excluded by adding -inf (max) / +inf (min) at their node, a small
    # [B, n, 1, 1] bias (p + 0 == p exactly: the same bits as a select). A select with the
    # broadcast boolean kept the reductions out of XLA:CPU's fast library fusions: masked
    # ResNet-56 forward 0.41 -> 0.335 s (interleaved, 2-core Intel VM, 2026-12-02).
    b1 = jnp.where(vs, 0.0, -inf)[:, :, None, :]
    b2 = jnp.where(vr, 0.0, -inf)[:, None, :, :]
    mx1, mn1 = jnp.max(p1 + b1, 1), jnp.min(p1 - b1, 1)
    mx2, mn2 = jnp.max(p2 + b2, 2), jnp.min(p2 - b2, 2)
  st1 = (_sum(p1, 1), _sum(p1 * p1, 1), mx1, mn1)
  st2 = (_sum(p2, 2), _sum(p2 * p2, 2), mx2, mn2)
  return st1, st2


def _grid_update(E, a3s, a3r, a4s, a4r):
  fac = 1.0 + a3s[:, :, None, :] * a4r[:, None, :, :] + a3r[:, None, :, :] * a4s[:, :, None, :]
  return E * fac


# Blocks per step of the block loop (:func:`_map_blocks`): about this many bytes of one
# [c, S, R, h] operand, so that a step's temporaries stay in the CPU's caches.
_CHUNK_BYTES = 5 * 2**20


def _block_chunk(shape, itemsize=4) -> int:
  """Blocks per loop step for a ``[B, S, R, h]`` group: the largest divisor c >= 2 of B whose
  chunk holds at most ``_CHUNK_BYTES``; B itself (no loop) when the whole group fits or no such
  divisor exists."""
  b, per_block = shape[0], int(np.prod(shape[1:])) * itemsize
  limit = max(1, _CHUNK_BYTES // max(per_block, 1))
  if b <= limit:
    return b
  c = max(d for d in range(1, limit + 1) if b % d == 0)
  # One block per step made XLA:CPU's backward ~4x slower (measured): keep such groups whole.
  return b if c == 1 else c


def _map_blocks(fn, args):
  """``fn(*args)`` computed over chunks of the leading (block) axis, one chunk at a time.

  Every block of a group is independent (B is a batch axis of all the per-group maths), so the
  results are the same, bit for bit; but XLA runs each chunk's whole fused chain while its
  [c, S, R, h] temporaries are in the cache, instead of streaming each full-group temporary
  through memory once per op. Measured on the 2-core CPU (interleaved runs in one process,
  huge pages on), ResNet-56's metanetwork (hidden 64; 25-block groups of 64x64 and 32x32
  blocks): forward 0.174 -> 0.114 s, forward+backward 0.81 -> 0.77 s; with node masks (the
  meta-training form) 0.26 -> 0.245 s and 0.95 -> 0.90 s. (Those figures were for the whole
  grid work in the loop. Since 2026-12-02 only the statistics, whose outputs are small, run in
  it: the loop's stacked full-size outputs (the updated edges, the backward's dE) cost a
  zero-fill and a copy each. Interleaved on the slower Intel VM: forward 0.30 -> 0.27 s,
  forward+backward 1.25 -> 1.08 s.) ``None`` arguments (no masks) pass through.
  """
  shape = args[0].shape
  c = _block_chunk(shape, args[0].dtype.itemsize)
  if c == shape[0]:
    return fn(*args)
  n = shape[0] // c
  split = lambda x: None if x is None else x.reshape((n, c) + x.shape[1:])
  out = jax.lax.map(lambda t: fn(*t), tuple(split(x) for x in args))
  return jax.tree_util.tree_map(lambda y: y.reshape((n * c,) + y.shape[2:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _grid(E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, masked):
  if not masked:
    vs = vr = None
  st1, st2 = _map_blocks(_grid_fwd_math, (E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr))
  return st1, st2, _grid_update(E, a3s, a3r, a4s, a4r)


def _grid_fwd(E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, masked):
  out = _grid(E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, masked)
  st1, st2, _ = out
  return out, (E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, st1[2], st1[3], st2[2], st2[3])


def _grid_bwd(masked, res, cot):
  E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, mx1, mn1, mx2, mn2 = res
  (gs1, gq1, gmx1, gmn1), (gs2, gq2, gmx2, gmn2), gE = cot
  if not masked:
    vs = vr = None
  # The whole group at once: no block loop here (measured interleaved on the 2-core Intel VM,
  # ResNet-56: forward+backward 1.17 -> 1.08 s, masked 1.34 -> 1.22 s; the loop's stacked dE
  # output cost a zero-fill and a copy, and its inputs a slice copy per step).
  grads = _grid_bwd_math(masked, E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, mx1, mn1, mx2, mn2,
                         gs1, gq1, gmx1, gmn1, gs2, gq2, gmx2, gmn2, gE)
  zv = lambda v: None if v is None else np.zeros(v.shape, jax.dtypes.float0)
  return (*grads, zv(res[7]), zv(res[8]))


def _count_base(n: int) -> float:
  """A power of two above ``n``: ``count_max + base * count_min`` packs two tie counts of at
  most ``n`` each into one float32 sum, exactly (all partial sums are integers below 2**24)."""
  base = 2.0 ** int(np.ceil(np.log2(n + 1)))
  if (n + 1) * base >= 2 ** 24:
    raise ValueError(f"blocks with {n} edges per node are too large to pack tie counts")
  return base


def _grid_bwd_math(masked, E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr, mx1, mn1, mx2, mn2,
                   gs1, gq1, gmx1, gmn1, gs2, gq2, gmx2, gmn2, gE):
  """Cotangents of E and the six node factors (a whole group; see :func:`_grid_bwd`).

  Written for XLA:CPU's fusion (measured on ResNet-56's 64x64 blocks, one 25-block group:
  ~77 -> ~61 ms of CPU time, forward+backward of the metanetwork ~10% faster):
  * the messages are recomputed inside each consumer, never stored (XLA:CPU drops
    ``optimization_barrier`` before fusion, so barriers here forced nothing);
  * the max and min tie counts of a pass are one reduction of one packed operand
    (``1 * is_max + base * is_min``, split exactly afterwards); written with selects only, so
    that the operand is computed once in a loop fusion rather than inside the reduction.
  """
  f = E.dtype
  s_size, r_size = E.shape[1], E.shape[2]
  a1s_, a3s_, a4s_ = a1s[:, :, None, :], a3s[:, :, None, :], a4s[:, :, None, :]
  a1r_, a3r_, a4r_ = a1r[:, None, :, :], a3r[:, None, :, :], a4r[:, None, :, :]
  p1, p2 = a1s_ * E, a1r_ * E
  is_mx1, is_mn1 = p1 == mx1[:, None], p1 == mn1[:, None]
  is_mx2, is_mn2 = p2 == mx2[:, :, None], p2 == mn2[:, :, None]
  if masked:
    v1, v2 = vs[:, :, None, :], vr[:, None, :, :]
    is_mx1, is_mn1 = is_mx1 & v1, is_mn1 & v1
    is_mx2, is_mn2 = is_mx2 & v2, is_mn2 & v2

  def tie_counts(is_mx, is_mn, axis, n):
    base = _count_base(n)
    packed = jnp.where(is_mx, jnp.where(is_mn, 1.0 + base, 1.0), jnp.where(is_mn, base, 0.0))
    total = _sum(packed.astype(f), axis)
    n_mn = jnp.floor(total / base)
    return total - base * n_mn, n_mn

  n_mx1, n_mn1 = tie_counts(is_mx1, is_mn1, 1, s_size)
  n_mx2, n_mn2 = tie_counts(is_mx2, is_mn2, 2, r_size)
  # Even split among ties (counts >= 1 wherever the statistic has a valid message).
  wmx1 = gmx1 / jnp.maximum(n_mx1, 1.0)
  wmn1 = gmn1 / jnp.maximum(n_mn1, 1.0)
  wmx2 = gmx2 / jnp.maximum(n_mx2, 1.0)
  wmn2 = gmn2 / jnp.maximum(n_mn2, 1.0)
  dp1 = (gs1[:, None] + 2.0 * p1 * gq1[:, None] + is_mx1.astype(f) * wmx1[:, None]
         + is_mn1.astype(f) * wmn1[:, None])
  dp2 = (gs2[:, :, None] + 2.0 * p2 * gq2[:, :, None] + is_mx2.astype(f) * wmx2[:, :, None]
         + is_mn2.astype(f) * wmn2[:, :, None])
  fac = 1.0 + a3s_ * a4r_ + a3r_ * a4s_
  dE = gE * fac + a1s_ * dp1 + a1r_ * dp2
  t = gE * E
  da1s, da3s, da4s = _sum(E * dp1, 2), _sum(t * a4r_, 2), _sum(t * a3r_, 2)
  da1r, da3r, da4r = _sum(E * dp2, 1), _sum(t * a4s_, 1), _sum(t * a3s_, 1)
  return dE, da1s, da1r, da3s, da3r, da4s, da4r


_grid.defvjp(_grid_fwd, _grid_bwd)


# The same maths as :func:`_grid` and :func:`_combine` in XLA:CPU custom kernels
# (``cpu_kernels``), for every grid group of a layer in one call: one pass over each E per layer
# forward, one over E and its cotangent backward, each node's statistics combined across its
# blocks inside the kernel (no per-block gathers, slices, concatenations or reductions in XLA).
# The forward also counts the max/min ties at each node, for the backward's even split.


def _stat_slots(t):
  """The sum, sum of squares, max and min slots of a kernel's [..., 6, N, h] statistics."""
  return tuple(t[..., k, :, :] for k in range(4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_ffi(geom, a1, a3, a4, v, es):
  # not differentiated (inference): no tie counts
  t1, t2, ens = cpu_kernels.layer_forward(a1, a3, a4, v, es, *geom, counts=False)
  return _stat_slots(t1), _stat_slots(t2), ens


def _layer_ffi_fwd(geom, a1, a3, a4, v, es):
  t1, t2, ens = cpu_kernels.layer_forward(a1, a3, a4, v, es, *geom, counts=True)
  res = (a1, a3, a4, v, es, t1[..., 2:, :, :], t2[..., 2:, :, :])
  return (_stat_slots(t1), _stat_slots(t2), ens), res


def _layer_ffi_bwd(geom, res, cot):
  a1, a3, a4, v, es, m1, m2 = res
  g1, g2, gens = cot

  def node_terms(g, m):  # m: [..., 4, N, h] = max, min, max ties, min ties
    gs, gq, gmx, gmn = g
    return jnp.stack([gs, gq, m[..., 0, :, :], m[..., 1, :, :],
                      gmx / jnp.maximum(m[..., 2, :, :], 1.0),
                      gmn / jnp.maximum(m[..., 3, :, :], 1.0)], axis=-3)
  da, des = cpu_kernels.layer_backward(a1, a3, a4, v, node_terms(g1, m1), node_terms(g2, m2),
                                       es, gens, *geom)
  return (da[..., 0, :, :], da[..., 1, :, :], da[..., 2, :, :], jnp.zeros_like(v), des)


_layer_ffi.defvjp(_layer_ffi_fwd, _layer_ffi_bwd)


def _use_kernels(grid_impl: Optional[str], *arrays) -> bool:
  if grid_impl not in (None, "auto", "xla", "cpu_kernel"):
    raise ValueError(f"grid_impl must be 'auto', 'xla' or 'cpu_kernel', not {grid_impl!r}")
  if grid_impl == "xla":
    return False
  ok = cpu_kernels.use_for(*arrays)
  if grid_impl == "cpu_kernel" and not ok:
    raise RuntimeError("grid_impl='cpu_kernel' needs the CPU backend, float32 edges and the "
                       "built kernels (see metaprune_jax.backends.cpu_kernels)")
  return ok


def _diag(E, a1s, a1r, a3s, a3r, a4s, a4r, vs, vr):
  """Diagonal group (E [B, C, h], edge j: s_j -> r_j): one message per end and block."""
  p1 = a1s * E
  p2 = a1r * E
  inf = jnp.asarray(jnp.inf, E.dtype)

  def st(p, v):
    if v is None:
      return p, p * p, p, p
    return p, p * p, jnp.where(v, p, -inf), jnp.where(v, p, inf)
  return st(p1, vs), st(p2, vr), E * (1.0 + a3s * a4r + a3r * a4s)


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------


def _lin(p, x, precision):
  return jnp.dot(x, p["kernel"], precision=precision) + p["bias"]


def _layer_norm(x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(var + _LN_EPS)


def _decoder(p, x, precision, split_ln: bool = False):
  """LN -> Dense -> SiLU -> Dense. ``split_ln``: the LayerNorm is computed on its own (an exact
  identity, ``xla_hints.materialize``) instead of inside XLA:CPU's YNNPACK fusion of the first
  Dense, where ResNet-56's [140720, 64] edge decoder took 38 ms of thread time against 11 ms
  for the Dense alone (forward 14% faster, A/B in one process, 2-core Intel VM, 2026-12-03)."""
  x = _layer_norm(x)
  if split_ln:
    x = xla_hints.materialize(x)
  return _lin(p["dense2"], jax.nn.silu(_lin(p["dense1"], x, precision)), precision)


def _finish(s1, s2, pmax, pmin, scale, count):
  """PyG mean/std/max/min from combined statistics (as ``model._aggregate``)."""
  has = count > 0
  denom = jnp.maximum(count, 1.0)
  mean = scale * (s1 / denom)
  mean_sq = (scale * scale) * (s2 / denom)
  var = mean_sq - mean * mean
  std = jnp.sqrt(jnp.maximum(var, _STD_EPS))
  std = jnp.where(std <= np.sqrt(_STD_EPS).astype(np.float32), 0.0, std)
  pmax = jnp.where(has, pmax, 0.0)
  pmin = jnp.where(has, pmin, 0.0)
  pos = scale >= 0
  mmax = jnp.where(pos, scale * pmax, scale * pmin)
  mmin = jnp.where(pos, scale * pmin, scale * pmax)
  return jnp.concatenate([mean, std, mmax, mmin], axis=-1)


def _combine(parts, gather, h):
  """Per-node sum, sum of squares, max, min of per-block partial rows."""
  out = []
  for j, (neutral, red) in enumerate(((0.0, jnp.sum), (0.0, jnp.sum), (-jnp.inf, jnp.max),
                                      (jnp.inf, jnp.min))):
    rows = jnp.concatenate([p[j].reshape(-1, h) for p in parts]
                           + [jnp.full((1, h), neutral, jnp.float32)])
    # materialised: fused into the gather, the concatenation was re-evaluated per element
    rows = xla_hints.materialize(rows)
    out.append(red(jnp.take(rows, gather, axis=0, mode="clip"), axis=1))
  return out


def _counts(plan, idx, node_valid):
  """[N, 1] number of valid messages per node, pass 1 (receivers) and pass 2 (senders)."""
  c1, c2 = [], []
  for g, s, r in zip(plan.groups, idx.s_idx, idx.r_idx):
    if node_valid is None:
      ms = jnp.ones(s.shape, jnp.float32)
      mr = jnp.ones(r.shape, jnp.float32)
    else:
      ms, mr = node_valid[s], node_valid[r]
    if g.diag:
      c1.append(ms.ravel())
      c2.append(mr.ravel())
    else:
      c1.append(jnp.broadcast_to(jnp.sum(ms, 1, keepdims=True), r.shape).ravel())
      c2.append(jnp.broadcast_to(jnp.sum(mr, 1, keepdims=True), s.shape).ravel())

  def comb(parts, gather):
    rows = jnp.concatenate(parts + [jnp.zeros((1,), jnp.float32)])
    return jnp.sum(jnp.take(rows, gather, axis=0), axis=1)[:, None]
  return comb(c1, idx.gather1), comb(c2, idx.gather2)


def forward(spec, params, nodes, edges, plan: BlockPlan, node_valid: Optional[jax.Array] = None,
            senders=None, receivers=None, grid_impl: Optional[str] = None):
  """The metanetwork on a graph with the block structure ``plan``. Traceable.

  Args:
    spec: ``config._Spec``.
    params: metanetwork params (as ``metanet.init_metanet``).
    nodes: [N, node_dim] (``[N, node_dim + 1]`` with ``spec.importance_input``: the last
      column is an input only); edges: per-kind [E_k, d_k], laid out as ``plan`` says.
    plan: the graph's :class:`BlockPlan`.
    node_valid: optional [N] float (1 valid, 0 masked): see the module docstring.
    senders, receivers: [E] (needed with ``node_valid``, to zero invalid edges' outputs).
    grid_impl: how the grid groups' edge work runs: ``'xla'`` (XLA's fusions, every backend),
      ``'cpu_kernel'`` (``cpu_kernels``; an error where they cannot run) or ``None``/``'auto'``
      (the kernels where ``cpu_kernels.use_for`` says so, else XLA).

  Returns:
    (nodes_out [N, node_dim], tuple of edges_out_k).
  """
  h = spec.hidden
  idx = _index(plan)
  masked = node_valid is not None
  if masked:
    node_valid = node_valid.astype(jnp.float32)
  inv = jnp.asarray([1.0] * (h // 2) + [-1.0] * ((h + 1) // 2), jnp.float32)
  prec = jax.lax.Precision(spec.precision)  # config.metanet.precision (checked by metanet)
  node_h = _lin(params["node_enc"], nodes, prec)
  # every block of every group, cut out of its kind's edge array by one split per kind
  pieces = [(g.kind, st, g.s_size if g.diag else g.s_size * g.r_size)
            for g in plan.groups for st in g.starts]
  flat = iter(graph_lib.split_rows(edges, pieces))
  es = []
  for g in plan.groups:
    d = edges[g.kind].shape[1]
    shape = (g.s_size, d) if g.diag else (g.r_size, g.s_size, d)
    parts = [next(flat).reshape(shape) for _ in g.starts]
    es.append(_lin(params[f"edge_enc_{g.kind}"], jnp.stack(parts), prec))
  count1, count2 = _counts(plan, idx, node_valid)
  # the edge states' dtype follows the edges' and the params' (all float32 for the kernels)
  kernels = _use_kernels(grid_impl, nodes, *edges, *jax.tree_util.tree_leaves(params))

  def validity(i):  # XLA's: [B, n, 1] bool, or None unmasked
    return (node_valid[i] > 0)[..., None] if masked else None
  vs_all = [validity(s) for s in idx.s_idx]
  vr_all = [validity(r) for r in idx.r_idx]
  grid_ids = [j for j, g in enumerate(plan.groups) if not g.diag]
  diag_ids = [j for j, g in enumerate(plan.groups) if g.diag]
  if kernels:
    # A grid group's E is [B, R, S, h] (receiver-major): the kernels' S rows are its receivers.
    geom = (tuple(plan.groups[j].r_start for j in grid_ids),
            tuple(plan.groups[j].s_start for j in grid_ids))
    v_all = node_valid if masked else jnp.ones((plan.num_nodes,), jnp.float32)
    diag_gather1, diag_gather2 = _diag_gathers(plan)

  def diag_parts(ids, a1m, a3, a4, es):
    parts1, parts2, new_es = [], [], {}
    for j in ids:
      s, r = idx.s_idx[j], idx.r_idx[j]
      st1, st2, new_es[j] = _diag(es[j], a1m[s], a1m[r], a3[s], a3[r], a4[s], a4[r],
                                  vs_all[j], vr_all[j])
      parts1.append(st1)
      parts2.append(st2)
    return parts1, parts2, new_es

  def layer(carry, lp):
    node_h, es = carry
    x = _layer_norm(node_h)
    a1, a2, a3, a4 = (jax.nn.silu(_lin(lp[f"lin{j}"], x, prec)) for j in range(1, 5))
    a1m = a1 * node_valid[:, None] if masked else a1
    if kernels:
      t_send, t_recv, grid_new = _layer_ffi(geom, a1m, a3, a4, v_all,
                                            tuple(es[j] for j in grid_ids))
      new_es = dict(zip(grid_ids, grid_new))
      st1, st2 = t_recv, t_send  # pass 1 at the receivers, pass 2 at the senders
      if diag_ids:
        parts1, parts2, diag_new = diag_parts(diag_ids, a1m, a3, a4, es)
        new_es.update(diag_new)
        merge = lambda t, d: (t[0] + d[0], t[1] + d[1], jnp.maximum(t[2], d[2]),
                              jnp.minimum(t[3], d[3]))
        st1 = merge(st1, _combine(parts1, diag_gather1, h))
        st2 = merge(st2, _combine(parts2, diag_gather2, h))
      s1, q1, mx1, mn1 = st1
      s2, q2, mx2, mn2 = st2
      new_es = tuple(new_es[j] for j in range(len(plan.groups)))
    else:
      parts1, parts2, new_es = [], [], []
      for j, (g, E, s, r, vs, vr) in enumerate(zip(plan.groups, es, idx.s_idx, idx.r_idx,
                                                    vs_all, vr_all)):
        # The small per-block node factors (gathers). No optimization_barrier: XLA:CPU drops
        # barriers before fusion; without them the compiled forward was the same up to
        # bitcasts, and the backward had six fewer small [5, 5, 64, 64] copies (ResNet-56).
        # A grid group's E is [B, R, S, h] (receiver-major): the grid maths' first node axis
        # is the receivers', so its first pass (over axis 1) is our pass 2 and vice versa.
        if g.diag:
          st1, st2, En = _diag(E, a1m[s], a1m[r], a3[s], a3[r], a4[s], a4[r], vs, vr)
        else:
          st2, st1, En = _grid(E, a1m[r], a1m[s], a3[r], a3[s], a4[r], a4[s], vr, vs, masked)
        parts1.append(st1)
        parts2.append(st2)
        new_es.append(En)
      s1, q1, mx1, mn1 = _combine(parts1, idx.gather1, h)
      s2, q2, mx2, mn2 = _combine(parts2, idx.gather2, h)
    agg1 = _finish(s1, q1, mx1, mn1, a2, count1)
    agg2 = _finish(s2, q2, mx2, mn2, a2 * inv, count2)
    node_h = node_h + _lin(lp["downlin"], agg1, prec) + _lin(lp["downlin"], agg2, prec)
    return (node_h, tuple(new_es)), None

  if kernels:
    # Layers unrolled: a scan stacks every layer's edge tensors for the backward (a zero-filled
    # [L, B, S, R, h] buffer, a copy in per layer and a copy out in the backward, since a
    # custom call reads whole buffers): ~0.11 s of ResNet-56's 0.7 s forward+backward. With the
    # kernels a layer is a small program, so unrolling cost ~6 s of compile time there.
    carry = (node_h, tuple(es))
    for l in range(jax.tree_util.tree_leaves(params["convs"])[0].shape[0]):
      carry, _ = layer(carry, jax.tree_util.tree_map(lambda x, l=l: x[l], params["convs"]))
    node_h, es = carry
  else:
    # One scanned layer: a small program, and one layer's temporaries in memory at a time.
    (node_h, es), _ = jax.lax.scan(layer, (node_h, tuple(es)), params["convs"])
  nodes_out = nodes[:, :spec.node_dim] + spec.node_res_ratio * _decoder(params["node_dec"], node_h, prec)
  if masked:
    nodes_out = jnp.where(node_valid[:, None] > 0, nodes_out, 0.0)
  edges_out = []
  dec = [_decoder(params[f"edge_dec_{g.kind}"], E, prec, split_ln=kernels)
         for g, E in zip(plan.groups, es)]
  for k, e in enumerate(edges):
    d = e.shape[1]
    pieces = [dec[gi][b].reshape(-1, d) for gi, b in plan.order[k]]
    out = e + spec.edge_res_ratio * (jnp.concatenate(pieces) if pieces else jnp.zeros_like(e))
    edges_out.append(out)
  if masked:
    valid = (node_valid[senders] * node_valid[receivers]) > 0
    start, outs = 0, []
    for out in edges_out:
      n = out.shape[0]
      outs.append(jnp.where(valid[start:start + n, None], out, 0.0))
      start += n
    edges_out = outs
  return nodes_out, tuple(edges_out)
