"""The metanetwork's CPU edge kernels (metaprune_jax/cpu_kernels.py, csrc/grid_cpu.cc) against
the XLA maths they replace (metanet_blocks._grid and its custom VJP)."""

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

from metaprune_jax import cnn
from metaprune_jax import cpu_kernels
from metaprune_jax import graph as graph_lib
from metaprune_jax import metanet
from metaprune_jax import metanet_blocks
from metaprune_jax import zoo


def _group(b, s, r, h, seed=0, ties=True):
  """A random grid group (E, six node factors, validity) with many tied messages."""
  rng = np.random.default_rng(seed)
  e = rng.standard_normal((b, s, r, h)).astype(np.float32)
  if ties:
    e = np.round(e * 2.0) / 2.0  # few distinct values: many exact ties at every node
  f = [rng.standard_normal((b, n, h)).astype(np.float32) for n in (s, r, s, r, s, r)]
  if ties:  # a1 with few distinct values too, so that products a1 * E tie
    f[0], f[1] = np.round(f[0] * 2.0) / 2.0, np.round(f[1] * 2.0) / 2.0
  vs, vr = rng.random((b, s)) < 0.7, rng.random((b, r)) < 0.7
  vs[:, 0] = vr[:, 0] = True
  f[0], f[1] = f[0] * vs[..., None], f[1] * vr[..., None]  # a1 is zeroed at invalid nodes
  return jnp.asarray(e), tuple(jnp.asarray(x) for x in f), vs, vr


def _xla(e, f, vs, vr, masked):
  return metanet_blocks._grid(e, *f, jnp.asarray(vs)[..., None], jnp.asarray(vr)[..., None],
                              masked)


def _kernel(e, f, vs, vr, masked):
  ones = lambda v: jnp.asarray(v, jnp.float32) if masked else jnp.ones(v.shape, jnp.float32)
  return metanet_blocks._grid_ffi(e, *f, ones(vs), ones(vr))


def _close(got, want, rtol=2e-6):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(float(np.abs(want).max()), 1e-30))


@absltest.skipUnless(cpu_kernels.available(), "the CPU kernels could not be built here")
class GridKernelTest(parameterized.TestCase):

  @parameterized.product(shape=[(3, 16, 24, 8), (1, 150, 70, 12), (2, 130, 9, 5)],
                         masked=[False, True])
  def test_forward_and_vjp_equal_the_xla_maths(self, shape, masked):
    # 150 and 130 rows of S: three chunks of 64 (combined in chunk order); h = 5, 12: widths
    # that are no multiple of a vector
    e, f, vs, vr = _group(*shape)
    want = jax.jit(_xla, static_argnums=4)(e, f, vs, vr, masked)
    got = jax.jit(_kernel, static_argnums=4)(e, f, vs, vr, masked)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      _close(a, b)
    # max and min are exact: one product per message, no sums
    for k in (2, 3):
      np.testing.assert_array_equal(got[0][k], want[0][k])
      np.testing.assert_array_equal(got[1][k], want[1][k])

    cot = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32),
        want)

    def vjp(fn, e, f):
      return jax.vjp(lambda e, *f: fn(e, f, vs, vr, masked), e, *f)[1](cot)
    want_g = jax.jit(lambda e, f: vjp(_xla, e, f))(e, f)
    got_g = jax.jit(lambda e, f: vjp(_kernel, e, f))(e, f)
    for a, b in zip(got_g, want_g):
      _close(a, b, rtol=5e-6)

  def test_tie_counts_and_the_forward_without_them(self):
    e, f, vs, vr = _group(2, 70, 6, 4, seed=5)
    vsf, vrf = jnp.asarray(vs, jnp.float32), jnp.asarray(vr, jnp.float32)
    st1, st2, en = jax.jit(cpu_kernels.grid_forward)(e, *f, vsf, vrf)
    p1 = np.asarray(f[0])[:, :, None, :] * np.asarray(e)  # [B, S, R, h] messages over S
    p2 = np.asarray(f[1])[:, None, :, :] * np.asarray(e)  # over R
    for p, st, axis, v in ((p1, st1, 1, vs[:, :, None, None]), (p2, st2, 2, vr[:, None, :, None])):
      mx = np.where(v, p, -np.inf).max(axis, keepdims=True)
      mn = np.where(v, p, np.inf).min(axis, keepdims=True)
      np.testing.assert_array_equal(st[:, 2], np.squeeze(mx, axis))
      np.testing.assert_array_equal(st[:, 4], ((p == mx) & v).sum(axis))
      np.testing.assert_array_equal(st[:, 5], ((p == mn) & v).sum(axis))
    self.assertGreater(float(np.asarray(st1[:, 4]).max()), 1.0)  # the group has ties
    no = jax.jit(lambda *a: cpu_kernels.grid_forward(*a, counts=False))(e, *f, vsf, vrf)
    np.testing.assert_array_equal(no[0][:, :4], st1[:, :4])
    np.testing.assert_array_equal(no[1][:, :4], st2[:, :4])
    np.testing.assert_array_equal(no[2], en)

  def test_ties_split_the_max_and_min_gradients_evenly(self):
    # Every message of a node equal: the max's (and min's) cotangent is shared by all of them.
    e = jnp.ones((1, 5, 3, 2), jnp.float32)
    f = tuple(jnp.ones((1, n, 2), jnp.float32) for n in (5, 3, 5, 3, 5, 3))
    vs, vr = np.ones((1, 5), bool), np.ones((1, 3), bool)
    out = _kernel(e, f, vs, vr, False)
    zero = jax.tree_util.tree_map(jnp.zeros_like, out)
    cot = ((zero[0][0], zero[0][1], jnp.ones_like(out[0][2]), zero[0][3]), zero[1], zero[2])
    de = jax.vjp(lambda e: _kernel(e, f, vs, vr, False), e)[1](cot)[0]
    np.testing.assert_array_equal(de, np.full(e.shape, 1.0 / 5.0, np.float32))

  def test_every_block_gets_the_same_bits_whatever_the_batch(self):
    # Meta-training vmaps and shards lanes of groups: a block's results must not depend on
    # the blocks around it (chunking depends on the block's shape only).
    e, f, vs, vr = _group(4, 140, 20, 8, seed=3)
    whole = jax.jit(_kernel, static_argnums=4)(e, f, vs, vr, True)
    lanes = jax.jit(jax.vmap(lambda e, f, vs, vr: _kernel(e, f, vs, vr, True)))(
        e.reshape((2, 2) + e.shape[1:]), tuple(x.reshape((2, 2) + x.shape[1:]) for x in f),
        vs.reshape(2, 2, -1), vr.reshape(2, 2, -1))
    for b in range(4):
      one = jax.jit(_kernel, static_argnums=4)(e[b:b + 1], tuple(x[b:b + 1] for x in f),
                                               vs[b:b + 1], vr[b:b + 1], True)
      for a, w, v in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(whole),
                         jax.tree_util.tree_leaves(lanes)):
        np.testing.assert_array_equal(a[0], w[b])
        np.testing.assert_array_equal(a[0], v.reshape((4,) + v.shape[2:])[b])

  def test_metanetwork_on_kernels_equals_xla_path(self):
    # The whole block path, forward and gradient: kernels == XLA's fusions.
    arch = zoo.get_arch("resnet20", 10)
    config = metanet.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1)
    spec = metanet._spec(config)
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
      _close(a, b, rtol=2e-5)


class SelectionTest(absltest.TestCase):

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
      z = np.zeros((1, 2, 2, 2), np.float32)
      f = np.zeros((1, 2, 2), np.float32)
      cpu_kernels.grid_forward(z.astype(np.float64), f, f, f, f, f, f, f[..., 0], f[..., 0])

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
