"""The metanetwork's CPU edge kernels (metaprune_jax/backends/cpu_kernels.py, csrc/grid_cpu.cc) against
a direct JAX statement of what they compute: every message of a node gathered into one padded
row, reduced with jnp's sum/max/min (whose gradients split max/min ties evenly, as the kernels
and torch's scatter_reduce do), and the XLA path of metanet_blocks."""

import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.backends import cpu_kernels
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import blocks as metanet_blocks
from metaprune_jax.metanetwork import metanet
from metaprune_jax.nets import cnn
from metaprune_jax.nets import zoo

# Groups of a test layer: (B, S, R) and each block's first S and R node. Blocks overlap as in
# real graphs: nodes 0-69 are the S rows of group 0's three blocks and of group 1's first, so
# they combine 4 blocks (two 64-row chunks each in group 0); group 1's R rows fall on group 0's
# R rows; group 2 is a single block whose S and R rows overlap (a node both sends and receives).
_GROUPS = (((3, 70, 9), (0, 0, 0), (70, 79, 88)),
           ((2, 5, 20), (0, 40), (70, 97)),
           ((1, 12, 12), (100,), (104,)))
_N = 117


def _case(h, seed=0, ties=True, masked=True, groups=_GROUPS, n=_N):
  """Random node tables, validity and edge tensors for ``groups`` (many exact ties)."""
  rng = np.random.default_rng(seed)
  q = (lambda x: np.round(x * 2.0) / 2.0) if ties else (lambda x: x)
  v = (rng.random(n) < 0.7) if masked else np.ones(n, bool)
  v[0] = True
  a1 = q(rng.standard_normal((n, h))).astype(np.float32) * v[:, None]  # zero at invalid nodes
  a3, a4 = (rng.standard_normal((n, h)).astype(np.float32) for _ in range(2))
  es = tuple(q(rng.standard_normal((b, s, r, h))).astype(np.float32) for (b, s, r), _, _ in groups)
  return (jnp.asarray(a1), jnp.asarray(a3), jnp.asarray(a4), jnp.asarray(v, jnp.float32),
          tuple(map(jnp.asarray, es)))


def _geom(groups=_GROUPS):
  return tuple(tuple(g[1]) for g in groups), tuple(tuple(g[2]) for g in groups)


def _messages(groups, n):
  """Per pass, [n, K] padded indices into the flattened (group, b, s, r) messages and their
  sender node (-1: padding): pass 1 gathers at R nodes over S, pass 2 at S nodes over R."""
  rows1, rows2 = [[] for _ in range(n)], [[] for _ in range(n)]
  base = 0
  for (b, s, r), so, ro in groups:
    for bb in range(b):
      for ss in range(s):
        for rr in range(r):
          m = base + (bb * s + ss) * r + rr
          rows1[ro[bb] + rr].append((m, so[bb] + ss))
          rows2[so[bb] + ss].append((m, ro[bb] + rr))
    base += b * s * r

  def pad(rows):
    k = max(1, max(len(x) for x in rows))
    idx = np.zeros((n, k), np.int32)
    src = np.full((n, k), -1, np.int32)
    for i, x in enumerate(rows):
      for j, (m, o) in enumerate(x):
        idx[i, j], src[i, j] = m, o
    return idx, src
  return pad(rows1), pad(rows2)


def _flat_messages(a1, a3, a4, es, groups=_GROUPS):
  """Every group's messages, flattened in (group, b, s, r) order: p1 = a1[S node] * E and
  p2 = a1[R node] * E, [M, h] each; and the updated edges per group."""
  p1, p2, ens = [], [], []
  for ((b, s, r), so, ro), e in zip(groups, es):
    si = (np.asarray(so)[:, None] + np.arange(s)).astype(np.int32)  # [B, S]
    ri = (np.asarray(ro)[:, None] + np.arange(r)).astype(np.int32)  # [B, R]
    p1.append((a1[si][:, :, None] * e).reshape(-1, e.shape[-1]))
    p2.append((a1[ri][:, None] * e).reshape(-1, e.shape[-1]))
    ens.append(e * (1.0 + a3[si][:, :, None] * a4[ri][:, None]
                    + a3[ri][:, None] * a4[si][:, :, None]))
  return jnp.concatenate(p1), jnp.concatenate(p2), tuple(ens)


def _reference(a1, a3, a4, v, es, groups=_GROUPS):
  """What the kernels compute, stated directly (see the module docstring)."""
  (i1, o1), (i2, o2) = _messages(groups, a1.shape[0])
  p1, p2, ens = _flat_messages(a1, a3, a4, es, groups)

  def stats(p, idx, src):
    x = p[idx]  # [n, K, h]
    real = (src >= 0)[..., None]
    ok = real & (v[np.maximum(src, 0)] > 0)[..., None]
    x0 = jnp.where(real, x, 0.0)
    return (jnp.sum(x0, 1), jnp.sum(x0 * x0, 1), jnp.max(jnp.where(ok, x, -jnp.inf), 1),
            jnp.min(jnp.where(ok, x, jnp.inf), 1))
  return stats(p1, i1, o1), stats(p2, i2, o2), ens


def _kernel(a1, a3, a4, v, es, groups=_GROUPS):
  # private: the FFI call of one layer, tested against its XLA twin on hand-made geometries
  return metanet_blocks._layer_ffi(_geom(groups), a1, a3, a4, v, es)


def _loss(fn):
  """A scalar of every output, with weights that differ per element."""
  def loss(a1, a3, a4, es):
    t1, t2, ens = fn(a1, a3, a4, es)
    tot = 0.0
    for k, x in enumerate(t1 + t2):
      fin = jnp.where(jnp.isfinite(x), x, 0.0)
      tot += jnp.sum(jnp.sin(fin * (1.0 + 0.1 * k)))
    return tot + sum(jnp.sum(jnp.cos(e)) for e in ens)
  return loss


def _close(got, want, rtol=2e-6):
  got, want = np.asarray(got), np.asarray(want)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite)
  np.testing.assert_array_equal(got[~finite], want[~finite])
  scale = max(float(np.abs(want[finite]).max()) if finite.any() else 0.0, 1e-30)
  np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=rtol * scale)


@absltest.skipUnless(cpu_kernels.available(), "the CPU kernels could not be built here")
class LayerKernelTest(parameterized.TestCase):

  # h = 16 and 32 take the kernels' vectorised tiles, 12 and 5 their row loop
  @parameterized.product(h=[16, 32, 12, 5], masked=[False, True])
  def test_forward_and_vjp_equal_the_direct_statement(self, h, masked):
    a1, a3, a4, v, es = _case(h, seed=h, masked=masked)
    got = jax.jit(_kernel)(a1, a3, a4, v, es)
    want = _reference(a1, a3, a4, v, es)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      _close(g, w)
    # max and min are exact (no rounding)
    for t in (0, 1):
      for k in (2, 3):
        np.testing.assert_array_equal(got[t][k], want[t][k])
    grads = lambda fn: jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2, 3)))(a1, a3, a4, es)
    g_k = grads(lambda a1, a3, a4, es: _kernel(a1, a3, a4, v, es))
    g_r = grads(lambda a1, a3, a4, es: _reference(a1, a3, a4, v, es))
    for g, w in zip(jax.tree_util.tree_leaves(g_k), jax.tree_util.tree_leaves(g_r)):
      _close(g, w, rtol=5e-6)

  def test_tie_counts_and_the_forward_without_them(self):
    a1, a3, a4, v, es = _case(16, seed=3)
    t1, t2, ens = jax.jit(lambda *a: cpu_kernels.layer_forward(*a, *_geom(), counts=True))(
        a1, a3, a4, v, es)
    want = _reference(a1, a3, a4, v, es)
    (i1, o1), (i2, o2) = _messages(_GROUPS, _N)
    p1, p2, _ = _flat_messages(a1, a3, a4, es)
    for t, w, p, idx, src in ((t1, want[0], p1, i1, o1), (t2, want[1], p2, i2, o2)):
      x = np.asarray(p)[idx]  # [n, K, h]
      ok = ((src >= 0) & (np.asarray(v)[np.maximum(src, 0)] > 0))[..., None]
      for slot, stat in ((4, w[2]), (5, w[3])):
        count = np.sum((x == np.asarray(stat)[:, None]) & ok, axis=1)
        np.testing.assert_array_equal(np.asarray(t[slot]), count.astype(np.float32))
      self.assertGreater(int(np.asarray(t[4]).max()), 1)  # the case has ties
    n1, n2, nens = jax.jit(lambda *a: cpu_kernels.layer_forward(*a, *_geom(), counts=False))(
        a1, a3, a4, v, es)
    np.testing.assert_array_equal(np.asarray(n1[:4]), np.asarray(t1[:4]))
    np.testing.assert_array_equal(np.asarray(n2[:4]), np.asarray(t2[:4]))
    np.testing.assert_array_equal(np.asarray(n1[4:]), 0.0)
    for a, b in zip(nens, ens):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_ties_split_the_max_and_min_gradients_evenly(self):
    # one node (R row 0) receiving 4 messages from S nodes 0-3, of which 3 tie at the max
    groups = (((1, 4, 1), (0,), (4,)),)
    a1 = jnp.ones((5, 16), jnp.float32)
    e = jnp.asarray(np.broadcast_to(np.array([2.0, 2.0, -1.0, 2.0], np.float32)[None, :, None, None],
                                    (1, 4, 1, 16)).copy())
    z = jnp.zeros((5, 16), jnp.float32)
    v = jnp.ones((5,), jnp.float32)
    gmax = jax.grad(lambda e: jnp.sum(_kernel(a1, z, z, v, (e,), groups)[0][2][4]))(e)
    np.testing.assert_allclose(np.asarray(gmax)[0, :, 0, 0], [1 / 3, 1 / 3, 0.0, 1 / 3], rtol=1e-6)
    gmin = jax.grad(lambda e: jnp.sum(_kernel(a1, z, z, v, (e,), groups)[0][3][4]))(e)
    np.testing.assert_allclose(np.asarray(gmin)[0, :, 0, 0], [0.0, 0.0, 1.0, 0.0])

  def test_every_node_gets_the_same_bits_whatever_the_lanes(self):
    # Vmapped lanes (meta-training's form) change how items are spread over the threads; each
    # lane must still get exactly the bits of its own call.
    cases = [_case(16, seed=s) for s in range(3)]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *cases)
    fwd = lambda a1, a3, a4, v, es: cpu_kernels.layer_forward(a1, a3, a4, v, es, *_geom())
    lanes = jax.jit(jax.vmap(fwd))(*stacked)
    for i, c in enumerate(cases):
      one = jax.jit(fwd)(*c)
      for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(lanes)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])

  def test_bad_offsets_are_named(self):
    a1, a3, a4, v, es = _case(5)
    with self.assertRaisesRegex(ValueError, "3 blocks need as many S and R offsets, got 2"):
      cpu_kernels.layer_forward(a1, a3, a4, v, es, ((0, 0),) + _geom()[0][1:], _geom()[1])
    bad = ((0, 0, 0), (0, 40), (110,)), _geom()[1]  # group 2's S rows past the last node
    with self.assertRaisesRegex(Exception, "outside the node tables"):
      jax.block_until_ready(cpu_kernels.layer_forward(a1, a3, a4, v, es, *bad))

  # hidden 16: the kernels' vectorised tiles; 8: their row loop. At hidden 16 both float32
  # paths are ~4e-4 (relative) from a float64 evaluation of this network, under the suite's
  # XLA flags (the std of nearly constant messages amplifies rounding), and 2.5e-5 apart.
  @parameterized.parameters((8, 2e-5), (16, 1e-3))
  def test_metanetwork_on_kernels_equals_xla_path(self, hidden, rtol):
    # The whole block path, forward and gradient: kernels == XLA's fusions.
    arch = zoo.get_arch("resnet20", 10)
    config = metanet.make_metanet_config(2, hidden, 8, (9,), 0.1, 0.1)
    spec = metanet._spec(config)  # private: metanet_blocks.forward takes the hashable spec
    graph = graph_lib.to_graph(arch, cnn.init_variables(arch, jax.random.PRNGKey(0)))
    params = metanet.init_metanet(config, jax.random.PRNGKey(1))
    plan = metanet.block_plan(arch)
    rng = np.random.default_rng(0)
    valid = graph_lib.node_valid(arch, {s: (rng.random(arch.width(s)) < 0.6).astype(np.float32)
                                        for s in arch.prunable_spaces})

    def run(impl, node_valid):
      def loss(p):
        out = metanet_blocks.forward(spec, p, graph.nodes, graph.edges, plan, node_valid,
                                     graph.senders, graph.receivers, grid_impl=impl)
        return sum(jnp.sum(jnp.sin(3.0 * x)) for x in (out[0], *out[1])), out
      return jax.jit(jax.grad(loss, has_aux=True))(params)

    # masked (the meta-training form); unmasked, the block-path tests of metanet_test compare
    # the kernels (the default here) with the scatter path
    want, got = run("xla", valid), run("cpu_kernel", valid)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      _close(a, b, rtol=rtol)


class SelectionTest(absltest.TestCase):
  """private _use_kernels: the kernels-or-XLA decision, whose errors surface only deep inside a
  traced forward through the public API."""

  def test_bad_grid_impl_is_named(self):
    with self.assertRaisesRegex(ValueError, "grid_impl must be"):
      metanet_blocks._use_kernels("triton", jnp.zeros((1,), jnp.float32))

  def test_kernels_asked_for_where_they_cannot_run(self):
    with mock.patch.object(cpu_kernels, "use_for", return_value=False):
      with self.assertRaisesRegex(RuntimeError, "cpu_kernel"):
        metanet_blocks._use_kernels("cpu_kernel", jnp.zeros((1,), jnp.float32))
      self.assertFalse(metanet_blocks._use_kernels(None, jnp.zeros((1,), jnp.float32)))

  def test_float64_edges_take_the_xla_path(self):
    self.assertFalse(cpu_kernels.use_for(np.zeros((1,), np.float32), np.zeros((1,), np.float64)))
    with self.assertRaisesRegex(TypeError, "float32 operands only.*float64"):
      z = np.zeros((1, 2, 2, 2), np.float64)
      f = np.zeros((4, 2), np.float32)
      cpu_kernels.layer_forward(f, f, f, f[:, 0], (z,), ((0,),), ((2,),))

  def test_missing_compiler_is_named(self):
    with self.assertRaisesRegex(RuntimeError, "no C\\+\\+ compiler 'no-such-c\\+\\+'"):
      cpu_kernels.build(compiler="no-such-c++")

  def test_switched_off_or_unbuildable_kernels_fall_back_to_xla(self):
    # A fresh process each (availability is decided once per process): the switch, and a
    # compiler that fails, with a cache folder of its own so that no earlier build is found.
    code = ("import logging, sys; from metaprune_jax import cpu_kernels;"
            "print(cpu_kernels.available())")
    with tempfile.TemporaryDirectory() as cache:
      for env in ({"METAPRUNE_JAX_CPU_KERNELS": "0"},
                  {"CXX": "false", "METAPRUNE_JAX_KERNEL_CACHE": cache}):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, **env}, check=True, timeout=300)
        self.assertEqual(proc.stdout.strip(), "False", proc.stderr)
        if "CXX" in env:
          self.assertIn("CPU edge kernels unavailable", proc.stderr)
          self.assertEqual(os.listdir(cache), [os.listdir(cache)[0]])  # no .so left behind
          self.assertEqual(os.listdir(os.path.join(cache, os.listdir(cache)[0])), [])


if __name__ == "__main__":
  absltest.main()
