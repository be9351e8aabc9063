"""Tracing the operations of issue #28: flax's default padding='SAME' (asymmetric with a stride),
elementwise activations other than ReLU, and average pooling over windows.

The networks are written here in plain flax.linen; the helpers come from trace_test.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph
from metaprune_jax.nets import activations, cnn, macs
from metaprune_jax.nets.arch import Arch, pad_pairs
from metaprune_jax.nets.trace import from_flax, to_flax_variables
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.prune import pruning
from tests.trace_test import _same, _setup, _snapshot


class SameBlock(nn.Module):
  out: int
  stride: int
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    f = getattr(nn, self.act)
    y = nn.Conv(self.out, (3, 3), self.stride, use_bias=False, name="conv1")(x)  # 'SAME'
    y = f(nn.BatchNorm(use_running_average=True, name="bn1")(y))
    y = nn.Conv(self.out, (3, 3), use_bias=False, name="conv2")(y)
    y = nn.BatchNorm(use_running_average=True, name="bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.out:
      x = nn.Conv(self.out, (1, 1), self.stride, use_bias=False, name="proj")(x)
      x = nn.BatchNorm(use_running_average=True, name="proj_bn")(x)
    return f(y + x)


class SameResNet(nn.Module):
  """flax defaults throughout: padding='SAME', stride-2 convs on even maps pad (0, 1)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(
        nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)))
    x = SameBlock(8, 1, name="b0")(x)
    x = SameBlock(12, 2, name="b1")(x)
    x = SameBlock(16, 2, name="b2")(x)
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


class Activations(nn.Module):
  """gelu (both forms), silu, tanh, leaky_relu(0.2), elu and relu6, a residual join."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Conv(8, (3, 3), padding=1, name="c1")(x))
    y = nn.silu(nn.BatchNorm(use_running_average=True, name="bn2")(
        nn.Conv(8, (3, 3), padding=1, use_bias=False, name="c2")(x)))
    y = jnp.tanh(nn.Conv(8, (3, 3), padding=1, name="c3")(y))
    x = nn.leaky_relu(x + y, 0.2)
    x = nn.elu(nn.Conv(12, (3, 3), 2, padding=1, name="c4")(x))
    x = nn.gelu(nn.Conv(12, (1, 1), name="c5")(x), approximate=False)
    x = nn.relu6(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(4, name="head")(x)


class AvgNet(nn.Module):
  """Average pooling mid-network (2x2/2, and 3x3/2 'SAME': padding (0, 1)), then a max pool."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(
        nn.Conv(8, (3, 3), padding=1, use_bias=False, name="c1")(x)))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(12, (3, 3), padding=1, name="c2")(x))
    x = nn.avg_pool(x, (3, 3), (2, 2), padding="SAME")
    x = nn.max_pool(nn.Conv(16, (3, 3), padding=1, name="c3")(x), (2, 2), (2, 2))
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


class FlatVGG(nn.Module):
  """VGG/AlexNet-style head: a spatial map flattened into a hidden dense layer (torchvision's
  classifier), then the classifier."""
  c1: int = 8
  c2: int = 12
  hidden: int = 20

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(self.c1, (3, 3), padding=1, name="c1")(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Conv(self.c2, (3, 3), padding=1, name="c2")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(5, name="head")(x)


class FlatHead(nn.Module):
  """LeNet-style: the classifier reads the flattened map itself."""

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(6, (3, 3), padding=1, name="c1")(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Conv(10, (3, 3), padding=1, name="c2")(x))
    return nn.Dense(5, name="head")(x.reshape((x.shape[0], -1)))


NETS = {"same_resnet": SameResNet, "activations": Activations, "avgpool": AvgNet,
        "flat_vgg": FlatVGG, "flat_head": FlatHead}


@pytest.mark.parametrize("net", sorted(NETS))
def test_traced_outputs_json_graph_and_weights_back(net):
  m = NETS[net]()
  x, v = _setup(m, hw=16)
  before = _snapshot(v)
  arch, ours = from_flax(m, v, x)
  assert _same(v, before)
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5, rtol=1e-5)
  assert Arch.from_json(arch.to_json()) == arch
  back = graph.from_graph(arch, graph.to_graph(arch, ours))
  assert _same(back, {"params": ours["params"], "batch_stats": ours["batch_stats"]})
  tree = to_flax_variables(arch, ours, like=v)
  np.testing.assert_allclose(m.apply(tree, x), m.apply(v, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("net", sorted(NETS))
def test_masked_equals_materialized(net):
  m = NETS[net]()
  x, v = _setup(m, hw=16)
  arch, ours = from_flax(m, v, x)
  res = pruning.prune_to_target(arch, ours, 1.5, (1, 3, 16, 16))
  masked = masks_lib.mask_variables(arch, ours, res.masks)
  y_masked = cnn.apply_model(arch, masked, x, masks=res.masks)
  small, sv = masks_lib.materialize(arch, masked, res.masks)
  assert small.widths != arch.widths
  np.testing.assert_allclose(cnn.apply_model(small, sv, x), y_masked, atol=1e-5, rtol=1e-5)
  full, _ = macs.count_macs(arch, (1, 3, 16, 16))
  cut, _ = macs.count_macs(small, (1, 3, 16, 16))
  assert full / cut >= 1.5


def test_same_padding_description():
  m = SameResNet()
  x, v = _setup(m, hw=16)
  arch, _ = from_flax(m, v, x)
  lm = arch.layer_map
  assert lm["stem"].padding == 1 and lm["b0_conv1"].padding == 1
  assert lm["b1_conv1"].padding == ((0, 1), (0, 1)) and lm["b1_proj"].padding == 0
  assert lm["b2_conv2"].padding == 1 and lm["b2_conv1"].stride == 2
  assert '"padding": [[0, 1], [0, 1]]' in arch.to_json()


def test_activation_ops():
  m = Activations()
  x, v = _setup(m, hw=16)
  arch, _ = from_flax(m, v, x)
  acts = [(o.op, o.fn, o.alpha, o.counted) for o in arch.ops if o.op in ("act", "relu")]
  assert acts == [("act", "gelu_tanh", 0.0, False), ("act", "silu", 0.0, False),
                  ("act", "tanh", 0.0, False), ("act", "leaky_relu", 0.2, True),
                  ("act", "elu", 1.0, True), ("act", "gelu", 0.0, False),
                  ("act", "relu6", 0.0, True)]
  kinds = [o.op for o in arch.ops]
  assert kinds.index("add") == kinds.index("act", kinds.index("add") - 1) + 1  # tanh, add, leaky
  arch2, _ = from_flax(m, v, x, count_relu=False)
  assert not any(o.counted for o in arch2.ops)


def test_avgpool_ops_and_macs_closed_form():
  m = AvgNet()
  x, v = _setup(m, hw=16)
  arch, _ = from_flax(m, v, x)
  pools = [(o.op, o.window, o.stride, o.padding) for o in arch.ops if "pool" in o.op]
  assert pools == [("avgpool", 2, 2, 0), ("avgpool", 3, 2, ((0, 1), (0, 1))),
                   ("maxpool", 2, 2, 0)]
  conv = lambda k, ci, co, hw, b: k * k * ci * co * hw * hw + (co * hw * hw if b else 0)
  # 16: c1 bn relu | avg -> 8: c2 relu | avg 3/2 'SAME' -> 4: c3 | max -> 2 | gap, head
  expect = (conv(3, 3, 8, 16, False) + 2 * 8 * 256 + 8 * 256 + 8 * 256
            + conv(3, 8, 12, 8, True) + 12 * 64 + 12 * 64
            + conv(3, 12, 16, 4, True) + 16 * 16 + 16 * 4 + 16 * 5 + 5)
  params = 3 * 3 * 3 * 8 + 16 + 3 * 3 * 8 * 12 + 12 + 3 * 3 * 12 * 16 + 16 + 16 * 5 + 5
  assert macs.count_macs(arch, (1, 3, 16, 16)) == (expect, params)


def test_macs_follow_asymmetric_padding():
  m = SameResNet()
  x, v = _setup(m, hw=16)
  arch, _ = from_flax(m, v, x)
  # b1_conv1: 3x3/2 with (0, 1) on a 16x16 map -> 8x8 (symmetric 0 would give 7x7)
  mt, _ = macs.count_terms(arch, (1, 3, 16, 16))
  total = macs.count_macs(arch, (1, 3, 16, 16))[0]
  l = arch.layer("b1_conv1")
  sym = Arch.from_json(arch.to_json().replace('"padding": [[0, 1], [0, 1]]', '"padding": 0'))
  assert sym.layer("b1_conv1").padding == 0
  assert total - macs.count_macs(sym, (1, 3, 16, 16))[0] >= 9 * 8 * 12 * (64 - 49)
  assert l.padding == ((0, 1), (0, 1)) and mt.coef.size > 0


def test_activation_registry_identifies_itself():
  x = activations.probe_points()
  for name, act in activations.REGISTRY.items():
    alpha = {"leaky_relu": 0.2, "elu": 0.7, "celu": 0.5}.get(name, 0.0)
    y = np.asarray(act.fn(jnp.asarray(x), alpha))
    got = activations.identify(x, y)
    expect = "elu" if name == "celu" and alpha == 1.0 else name
    assert got == (expect, alpha), (name, got)
    assert float(act.fn(jnp.float32(0.0), alpha)) == 0.0  # pruned channels stay zero
  assert activations.identify(x, np.asarray(jax.nn.sigmoid(x))) is None
  assert activations.identify(x, x ** 3) is None


@pytest.mark.parametrize("padding, strides", [(((0, 1), (0, 1)), (2, 2)),
                                              (((1, 2), (0, 1)), (1, 1)),
                                              (((2, 0), (1, 1)), (2, 2))])
def test_conv2d_asymmetric_padding_matches_lax(padding, strides):
  """xla_hints.conv2d (the CPU-tuned path with its hand-written backward, and the C++ kernel
  that takes symmetric padding only) equals lax.conv_general_dilated, values and gradients."""
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (2, 9, 10, 4))
  w = jax.random.normal(kw, (3, 3, 4, 6))
  dn = ("NHWC", "HWIO", "NHWC")

  def ref(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

  def ours(x, w):
    return xla_hints.conv2d(x, w, strides, padding)
  np.testing.assert_allclose(ours(x, w), ref(x, w), atol=1e-5, rtol=1e-5)
  # private: conv2d picks the CPU path by backend and mode; the test checks that path itself
  # (forward and custom gradient) on any backend
  np.testing.assert_allclose(xla_hints._conv2d_cpu(x, w, strides, padding), ref(x, w),  # pylint: disable=protected-access
                             atol=1e-5, rtol=1e-5)
  cpu = functools.partial(xla_hints._conv2d_cpu, strides=strides, padding=padding)  # pylint: disable=protected-access
  gr = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
  gc = jax.grad(lambda x, w: jnp.sum(jnp.sin(cpu(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(gc, gr):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  assert pad_pairs(padding) == padding


def test_flattened_dense_is_a_conv_covering_the_map():
  m = FlatVGG()
  x, v = _setup(m, hw=16)  # c2 reads 8x8 maps: fc1 reads 8*8*12 features
  arch, ours = from_flax(m, v, x, count_relu=False)
  fc1 = arch.layer("fc1")
  assert (fc1.kind, fc1.kernel, fc1.stride, fc1.padding, fc1.bias) == ("conv", 8, 1, 0, True)
  assert ours["params"]["fc1"]["kernel"].shape == (8, 8, 12, 20)
  np.testing.assert_array_equal(ours["params"]["fc1"]["kernel"].reshape(-1, 20),
                                v["params"]["fc1"]["kernel"])
  assert [o.op for o in arch.ops][-4:] == ["conv", "flatten", "relu", "dense"]
  # MACs as Torch-Pruning counts the PyTorch twin (conv, maxpool, Linear; flatten and
  # functional relus 0): closed form per image
  want = (9 * 3 * 8 * 256 + 8 * 256 + 8 * 256 + 9 * 8 * 12 * 64 + 12 * 64
          + 768 * 20 + 20 + 20 * 5 + 5)
  assert macs.count_macs(arch, (1, 3, 16, 16))[0] == want
  # pruned: the user's own module at the new widths computes what the pruned Arch computes
  res = pruning.prune_to_target(arch, ours, 2.5, (1, 3, 16, 16))
  small, sv = masks_lib.materialize(arch, masks_lib.mask_variables(arch, ours, res.masks),
                                    res.masks)
  c2, hidden = small.width(small.layer("c2").out_space), small.width(fc1.out_space)
  assert c2 < 12 and hidden < 20  # the flattened channels and the hidden layer both pruned
  small_m = FlatVGG(c1=small.width(small.layer("c1").out_space), c2=c2, hidden=hidden)
  tree = to_flax_variables(small, sv, like=small_m.init(jax.random.key(0), x))
  assert tree["params"]["fc1"]["kernel"].shape == (64 * c2, hidden)
  np.testing.assert_allclose(small_m.apply(tree, x), cnn.apply_model(small, sv, x), atol=1e-5,
                             rtol=1e-5)


class ReluAfterFlatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, name="a")(x).reshape((x.shape[0], -1))
    return nn.Dense(3, name="head")(nn.Dense(6, name="fc")(nn.relu(x)))


class NonSquareFlatten(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, name="a")(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3, name="head")(nn.Dense(6, name="fc")(x))


@pytest.mark.parametrize("cls, shape, words", [
    (ReluAfterFlatten, (2, 8, 8, 3), "only a dense layer may read a flattened map"),
    (NonSquareFlatten, (2, 8, 6, 3), "only square maps flatten"),
])
def test_flatten_refusals_named(cls, shape, words):
  m = cls()
  x = jnp.ones(shape)
  v = m.init(jax.random.key(0), x)
  with pytest.raises(Exception) as e:
    from_flax(m, v, x)
  assert type(e.value).__name__ == "TraceError"
  assert words in str(e.value)


def test_classifier_reading_a_flattened_map():
  m = FlatHead()
  x, v = _setup(m, hw=16)
  arch, _ = from_flax(m, v, x)
  assert arch.classifier == "head"
  assert (arch.layer("head").kind, arch.layer("head").kernel) == ("conv", 8)
  assert [o.op for o in arch.ops][-2:] == ["conv", "flatten"]


def test_tracing_keeps_the_processs_compiled_functions():
  # private: `_cache_size` counts a jitted function's compilations (no public counter); tracing
  # switches the XLA:CPU settings off for its jaxpr without clearing jax's caches
  f = jax.jit(lambda a: a * 2.0)
  f(jnp.ones(3))
  before = f._cache_size()  # pylint: disable=protected-access
  m = AvgNet()
  x, v = _setup(m, hw=16)
  from_flax(m, v, x)
  assert f._cache_size() == before == 1  # pylint: disable=protected-access
