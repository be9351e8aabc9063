"""The XLA:CPU settings (metaprune_jax/backends/xla_hints.py) against plain JAX, forced on the CPU.

``METAPRUNE_JAX_BACKEND_TUNING=none`` (here ``xla_hints.backend_tuning('none')``) gives the
program a GPU or TPU runs: ``lax.conv_general_dilated`` with its own gradient, no division
barriers, no compiler options, no C++ edge kernels. It must compute what the CPU path computes
(train step, metanetwork, meta-training gradients) and compile once per architecture.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import metaprune_jax as mp  # pylint: disable=g-import-not-at-top
from metaprune_jax.backends import cpu_kernels
from metaprune_jax.backends import host_memory
from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.metanetwork import metatrain
from metaprune_jax.runtime import steps
from metaprune_jax.runtime.state import create_state


def _close(a, b, rtol=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))) + 1e-7)


def _tree_close(a, b, rtol=2e-5):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    _close(x, y, rtol)


def _arch_and_vars():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0), (8, 8))
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: jnp.abs(a + 0.1 * jax.random.normal(jax.random.PRNGKey(1), a.shape)),
      v["batch_stats"])}
  return arch, v


def _random_masks(arch, seed):
  rng = np.random.default_rng(seed)
  keep = {s: np.sort(rng.choice(arch.width(s), rng.integers(2, arch.width(s) + 1),
                                replace=False)) for s in arch.prunable_spaces}
  return mp.masks.masks_from_keep(arch, keep)


def test_modes_and_bad_values(monkeypatch):
  assert xla_hints.cpu_tuning("cpu") and not xla_hints.cpu_tuning("gpu")
  with xla_hints.backend_tuning("none"):
    assert xla_hints.tuning_mode() == "none"
    assert not xla_hints.cpu_tuning("cpu")
    assert xla_hints.conv_compiler_options() == {}
    assert not cpu_kernels.use_for(jnp.zeros((1,), jnp.float32))
    x = jnp.ones((2, 3))
    assert "div" not in str(jax.make_jaxpr(xla_hints.materialize)(x))
    assert "custom_vjp" not in str(jax.make_jaxpr(
        lambda x, w: mp.cnn.conv2d(x, w, (1, 1), ((1, 1), (1, 1))))(
            jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))))
  with xla_hints.backend_tuning("cpu"):
    assert xla_hints.cpu_tuning("gpu")  # the traced settings on any backend
  assert "div" in str(jax.make_jaxpr(xla_hints.materialize)(jnp.ones((2, 3))))
  monkeypatch.setenv(xla_hints.TUNING_ENV, "none")
  assert not xla_hints.cpu_tuning("cpu")
  monkeypatch.setenv(xla_hints.TUNING_ENV, "gpu")
  with pytest.raises(ValueError, match="METAPRUNE_JAX_BACKEND_TUNING='gpu'"):
    xla_hints.cpu_tuning()
  with pytest.raises(ValueError, match="unknown backend tuning mode 'fast'"):
    with xla_hints.backend_tuning("fast"):
      pass


def test_huge_pages_follow_the_switch():
  assert host_memory.accelerator_likely({"JAX_PLATFORMS": "cuda,cpu"})
  assert not host_memory.accelerator_likely({"JAX_PLATFORMS": "cpu"})
  assert not host_memory.accelerator_likely({}, files=("/no/such/device",))
  assert host_memory.accelerator_likely({}, files=(os.devnull,))
  # private: the environment -> decision rule inside restart_with_huge_pages, which the public
  # function only applies by re-executing the process
  want = host_memory._cpu_settings_wanted  # pylint: disable=protected-access
  assert want({"JAX_PLATFORMS": "cpu"})
  assert not want({"JAX_PLATFORMS": "cpu", host_memory.TUNING_ENV: "none"})
  assert not want({"JAX_PLATFORMS": "tpu"})
  assert want({"JAX_PLATFORMS": "tpu", host_memory.TUNING_ENV: "cpu"})


def _train_step_results(arch, v, masks_list):
  tx = optax.sgd(0.1, momentum=0.9)
  step = jax.jit(functools.partial(steps.train_step, arch=arch, tx=tx),
                 compiler_options=xla_hints.conv_compiler_options())
  x = jax.random.normal(jax.random.PRNGKey(2), (8, 8, 8, 3))
  batch = {"image": x, "label": jnp.arange(8, dtype=jnp.int32) % 10}
  outs = []
  for masks in masks_list:
    state = create_state(arch, v, tx, jax.random.PRNGKey(3), masks)
    new, metrics = step(state, batch)
    outs.append((metrics["loss"], new.params, new.batch_stats))
  return outs, step._cache_size()  # jax's private counter: compilations of the jitted step


def test_train_step_plain_jax_equals_cpu_path_and_compiles_once():
  arch, v = _arch_and_vars()
  masks_list = [_random_masks(arch, 0), _random_masks(arch, 1)]
  cpu, n_cpu = _train_step_results(arch, v, masks_list)
  with xla_hints.backend_tuning("none"):
    plain, n_plain = _train_step_results(arch, v, masks_list)
  assert n_cpu == 1 and n_plain == 1  # one compilation for every mask of the architecture
  for (l1, p1, s1), (l2, p2, s2) in zip(cpu, plain):
    _close(l2, l1)
    _tree_close(p2, p1)
    _tree_close(s2, s1)


def test_conv_gradient_plain_jax_equals_cpu_path():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))

  def grads():
    f = lambda x, w: jnp.sum(jnp.sin(mp.cnn.conv2d(x, w, (2, 2), ((1, 1), (1, 1)))))
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  cpu = grads()
  with xla_hints.backend_tuning("none"):
    plain = grads()
  _tree_close(plain, cpu, 1e-5)


def test_metanetwork_plain_jax_equals_cpu_path():
  arch, v = _arch_and_vars()
  graph = graph_lib.to_graph(arch, v)
  mc = metanet_lib.make_metanet_config(2, 16, graph.nodes.shape[1],
                                       tuple(e.shape[1] for e in graph.edges), 0.1, 0.1)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(4))
  plan = metanet_lib.block_plan(arch)

  def run():
    out = metanet_lib.apply_metanet(mc, phi, graph, plan=plan)
    loss = lambda p: sum(jnp.sum(jnp.sin(e)) for e in metanet_lib.apply_metanet(
        mc, p, graph, check_finite=False, plan=plan).edges)
    return out, jax.jit(jax.grad(loss))(phi)
  (out_cpu, g_cpu) = run()
  with xla_hints.backend_tuning("none"):
    (out_plain, g_plain) = run()
  _close(out_plain.nodes, out_cpu.nodes)
  _tree_close(out_plain.edges, out_cpu.edges)
  _tree_close(g_plain, g_cpu, 1e-4)


def test_meta_training_grads_plain_jax_equal_cpu_path_and_compile_once():
  from meta_test import _tiny_models  # pylint: disable=g-import-not-at-top
  full, models = _tiny_models(2)
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
  # private: the padded-slot core meta-training jits (see meta_test), here counted for
  # compilations under each backend mode; the public meta_train_grads hides both
  spec = metatrain._spec(mc)  # pylint: disable=protected-access
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 6, 8, 8, 3))
  y = (jnp.arange(6) % 10)[None]

  def run():
    f = jax.jit(lambda phi, slot, x, y: metatrain._model_loss_grads(  # pylint: disable=protected-access
        spec, full, phi, slot, x, y, 16.0, 10.0, "max")[-1])
    gs = [f(phi, metatrain.make_slot(full, sv, keep), x, y) for _, sv, keep in models]
    return gs, f._cache_size()
  cpu, n_cpu = run()
  with xla_hints.backend_tuning("none"):
    plain, n_plain = run()
  assert n_cpu == 1 and n_plain == 1
  for a, b in zip(plain, cpu):
    _tree_close(a, b, 1e-4)


def test_precision_is_a_config_value():
  with pytest.raises(ValueError, match="unknown metanetwork matmul precision 'float64'"):
    metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1, precision="float64")
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1)
  assert mc.precision == "default"
  mc.precision = "nonsense"
  with pytest.raises(ValueError, match="'nonsense'"):
    metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
  arch, v = _arch_and_vars()
  graph = graph_lib.to_graph(arch, v)
  outs = []
  for p in ("highest", "default"):
    mc = metanet_lib.make_metanet_config(2, 16, 8, (9,), 0.1, 0.1, precision=p)
    phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(4))
    outs.append(metanet_lib.apply_metanet(mc, phi, graph, plan=metanet_lib.block_plan(arch)))
  # XLA:CPU computes float32 products at either precision
  _close(outs[1].nodes, outs[0].nodes, 1e-6)


def test_run_config_precision_reaches_the_metanetwork():
  """`config.metanet.precision` of a run config is the precision meta_train/prune build with."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from metaprune_jax.modes import meta as meta_modes  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("_cfg", os.path.join(root, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  arch = mp.get_arch(config.arch, 10)
  assert meta_modes.metanet_config_for(config, arch).precision == "default"
  config.metanet.precision = "HIGHEST"
  assert meta_modes.metanet_config_for(config, arch).precision == "highest"
  config.metanet.precision = "float64"
  with pytest.raises(ValueError, match="'float64'"):
    meta_modes.metanet_config_for(config, arch)


@pytest.mark.skipif(not cpu_kernels.conv_available(), reason="the CPU kernels cannot be built")
@pytest.mark.parametrize("shape,stride,pad", [((2, 9, 9, 5, 7), 1, 1), ((2, 10, 10, 3, 16), 2, 1),
                                              ((1, 8, 8, 16, 40), 1, 1), ((1, 6, 6, 20, 9), 1, 1), ((2, 8, 8, 6, 16), 2, 0),
                                              ((3, 5, 7, 4, 64), 1, 2), ((2, 9, 9, 15, 1), 1, 1),
                                              ((2, 9, 8, 20, 2), 2, 1), ((1, 6, 6, 3, 2), 1, 0),
                                              # 3-8 outputs, stride 1: the pixel-vectorised path
                                              # (several 16-pixel tiles and a tail; 1x1)
                                              ((2, 33, 20, 15, 7), 1, 1), ((1, 17, 17, 9, 3), 1, 1),
                                              ((2, 12, 12, 5, 8), 1, 0), ((2, 10, 10, 15, 5), 2, 1),
                                              ((2, 9, 9, 40, 6), 1, 1),
                                              # 8-pixel rows: two rows per 16-lane tile (an odd
                                              # row count leaves a lone last row)
                                              ((2, 8, 8, 24, 16), 1, 1), ((1, 7, 8, 5, 11), 1, 1),
                                              ((2, 4, 4, 24, 6), 1, 1),
                                              # odd widths above 16: the pixel path in blocks
                                              ((2, 16, 16, 32, 23), 1, 1), ((1, 8, 8, 40, 51), 1, 1),
                                              # input rows transposed 16 pixels x 16 channels at
                                              # a time: partial blocks of both
                                              ((1, 5, 40, 33, 7), 1, 1), ((2, 6, 21, 17, 16), 1, 1),
                                              # 1-2 outputs: 4 tiles at a time (a task's last
                                              # group short: repeated tiles not written)
                                              ((1, 5, 16, 4, 1), 1, 1), ((3, 7, 24, 12, 2), 1, 1),
                                              # and of 8-pixel row pairs (a lone last row)
                                              ((1, 7, 8, 9, 2), 1, 1), ((2, 8, 8, 6, 5), 1, 1)])
@pytest.mark.parametrize("pixel_path", [True, False])
def test_conv_kernel_equals_xla(shape, stride, pad, pixel_path, monkeypatch):
  monkeypatch.setattr(cpu_kernels, "CONV_PIXEL_PATH", pixel_path)
  b, h, w_, c, o = shape
  k = 3 if pad else 1
  x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w_, c))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c, o))
  bias = jax.random.normal(jax.random.PRNGKey(2), (o,))
  padding = ((pad, pad), (pad, pad))
  want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = jax.jit(lambda x, w: cpu_kernels.conv_nhwc(x, w, (stride, stride), padding))(x, w)
  _close(got, want, 1e-5)
  res = jax.random.normal(jax.random.PRNGKey(3), want.shape)
  got = jax.jit(lambda x, w, bias, res: cpu_kernels.conv_nhwc(
      x, w, (stride, stride), padding, bias, res, relu=True))(x, w, bias, res)
  _close(got, jnp.maximum(want + bias + res, 0.0), 1e-5)
  # inference (not differentiated) takes the kernel for narrow layers; the gradient XLA's conv
  f = jax.jit(lambda x, w: mp.cnn.conv2d(x, w, (stride, stride), padding))
  pixel = o <= cpu_kernels.CONV_PIXEL_MAX_OUT or (cpu_kernels.CONV_PIXEL_ODD and o % 16 != 0)
  kernel = c <= cpu_kernels.CONV_MAX_IN or (pixel_path and pixel and stride == 1 and w_ >= 8)
  assert ("custom_call" in f.lower(x, w).as_text()) == kernel
  _close(f(x, w), want, 1e-5)
  with xla_hints.backend_tuning("none"):
    assert "custom_call" not in jax.jit(lambda x, w: mp.cnn.conv2d(
        x, w, (stride, stride), padding)).lower(x, w).as_text()


@pytest.mark.skipif(not cpu_kernels.conv_available(), reason="the CPU kernels cannot be built")
def test_folded_network_epilogues_fuse_and_compute_the_plain_path():
  """Inference of a folded, unmasked network runs conv -> bias [-> add] -> relu as one kernel
  call with its epilogue; its outputs and (custom-VJP) gradients are the plain path's."""
  from metaprune_jax.nets import cnn, inference
  arch = mp.get_arch("resnet20", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0), (16, 16))
  v = jax.tree_util.tree_map(
      lambda a: a * (1 + 0.2 * jax.random.normal(jax.random.PRNGKey(3), a.shape)), v)
  res = mp.prune_to_target(arch, v, 2.0, input_shape=(1, 3, 16, 16))
  fa, fv = inference.fold_batchnorm(*mp.materialize(arch, v, res.masks))
  plan = cnn._epilogues(fa)  # private: which convs the interpreter fuses
  relus_after_conv = sum(1 for i, op in enumerate(fa.ops[:-1])
                         if op.op == "conv" and fa.ops[i + 1].op in ("relu", "add"))
  assert len(plan) >= relus_after_conv - 2 > 0  # all but the classifier's and shortcuts'
  assert sum(r is not None for _, r in plan.values()) >= 3  # residual joins too
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  f = jax.jit(lambda vv, x: mp.apply_model(fa, vv, x))
  assert "custom_call" in f.lower(fv, x).as_text()
  with xla_hints.backend_tuning("none"):
    g = jax.jit(lambda vv, x: mp.apply_model(fa, vv, x))
    want = g(fv, x)
    assert "custom_call" not in g.lower(fv, x).as_text()
    g_want = jax.grad(lambda vv: jnp.sum(mp.apply_model(fa, vv, x) ** 2))(fv)
  _close(f(fv, x), want, 1e-5)
  g_got = jax.grad(lambda vv: jnp.sum(mp.apply_model(fa, vv, x) ** 2))(fv)
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
    _close(a, b, 1e-4)
