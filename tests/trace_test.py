"""Tests of metaprune_jax.nets.trace: the Arch of a user's flax.linen CNN, derived by tracing.

The networks are written here, in plain flax.linen, not taken from the package.
"""

from __future__ import annotations

import copy
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprune_jax.nets import cnn
from metaprune_jax.nets import macs
from metaprune_jax.nets.arch import Arch
from metaprune_jax.nets.trace import TraceError, from_flax, to_flax_variables
from metaprune_jax.prune import groups
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.prune import pruning

KEY = jax.random.key(0)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
  """A basic residual block; a 1x1 projection shortcut when the shape changes."""

  inner: int
  out: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.inner, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
    y = nn.BatchNorm(use_running_average=True, name="bn1")(y)
    y = nn.relu(y)
    y = nn.Conv(self.out, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = nn.BatchNorm(use_running_average=True, name="bn2")(y)
    if x.shape[-1] != self.out or self.stride != 1:
      x = nn.Conv(self.out, (1, 1), self.stride, padding=0, use_bias=False, name="proj")(x)
      x = nn.BatchNorm(use_running_average=True, name="proj_bn")(x)
    return nn.relu(x + y)  # shortcut first: the tracer must find the main branch itself


class ResNet(nn.Module):
  """Stem + residual blocks ((inner, out, stride), ...) + global average pool + dense."""

  stem: int = 8
  blocks: Sequence[tuple] = ((8, 8, 1), (16, 16, 2), (16, 16, 1))
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.stem, (3, 3), padding=1, use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="stem_bn")(x))
    for i, (inner, out, stride) in enumerate(self.blocks):
      x = Block(inner, out, stride, name=f"block{i}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class VGGish(nn.Module):
  """Biased convs + BN, a bias-free conv + BN, max pooling, avg_pool over the whole map,
  a flatten, a hidden dense layer."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1, name="c1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="n1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Conv(12, (3, 3), padding=1, use_bias=False, name="c2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="n2")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (3, 3), padding=1, name="c3")(x))  # conv + bias, no BN
    x = nn.avg_pool(x, (4, 4))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(24, name="fc1")(x))
    return nn.Dense(5, name="fc2")(x)


class TorchBN(nn.Module):
  """A PyTorch-style BatchNorm: own names, epsilon 1e-3, a division by the std."""

  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    w = self.param("weight", nn.initializers.ones, (c,))
    b = self.param("bias", nn.initializers.zeros, (c,))
    m = self.variable("batch_stats", "running_mean", jnp.zeros, (c,))
    v = self.variable("batch_stats", "running_var", jnp.ones, (c,))
    return (x - m.value) / jnp.sqrt(v.value + self.eps) * w + b


class Mixed(nn.Module):
  """Kernel sizes 7, 5, 3 and 1, a padded max pool, a PyTorch-style BN."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (7, 7), 2, padding=3, use_bias=False, name="stem")(x)
    x = nn.relu(TorchBN(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    y = nn.Conv(6, (5, 5), padding=2, use_bias=False, name="c5")(x)
    y = nn.relu(TorchBN(eps=1e-5, name="bn5")(y))
    y = nn.Conv(8, (1, 1), use_bias=False, name="c1")(y)
    y = TorchBN(name="bn1")(y)
    x = nn.relu(y + x)
    x = nn.Conv(10, (3, 3), 2, padding=1, name="c3")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(4, name="fc")(x)


def _randomize(variables, key=KEY):
  """Random values everywhere (positive variances), so nothing coincides by init."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for i, (path, a) in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    name = str(path[-1])
    if "var" in name:
      out.append(jax.random.uniform(k, a.shape, a.dtype, 0.5, 2.0))
    else:
      out.append(0.3 * jax.random.normal(k, a.shape, a.dtype))
  return jax.tree_util.tree_unflatten(tree, out)


def _setup(module, hw=16, c=3):
  x = jax.random.normal(jax.random.key(1), (2, hw, hw, c))
  v = _randomize(module.init(KEY, x))
  return x, v


NETS = {"resnet": ResNet, "vggish": VGGish, "mixed": Mixed}


def _snapshot(tree):
  return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def _same(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(la, lb))


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", sorted(NETS))
def test_traced_outputs_equal_module(net):
  m = NETS[net]()
  x, v = _setup(m, hw=32 if net == "mixed" else 16)
  before = _snapshot(v)
  arch, ours = from_flax(m, v, x)
  assert _same(v, before)  # nothing modified
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5, rtol=1e-5)
  # the same arrays (no copies), except a BN's variance at another epsilon
  for coll, layer, leaf, path, shift in arch.origin:
    user = v
    for k in path:
      user = user[k]
    assert (ours[coll][layer][leaf] is user) == (shift == 0.0)
  # round trip through JSON
  assert Arch.from_json(arch.to_json()) == arch


def test_resnet_description():
  arch, _ = from_flax(ResNet(), *_setup(ResNet())[::-1])
  lm = arch.layer_map
  assert lm["block1_proj"].shortcut and lm["block1_proj_bn"].shortcut
  assert not lm["block1_conv2"].shortcut
  # residual joins: the stem, block0's output; block1/2's outputs
  assert lm["stem"].out_space == lm["block0_conv2"].out_space
  assert lm["block1_conv2"].out_space == lm["block1_proj"].out_space == \
      lm["block2_conv2"].out_space
  assert lm["block0_conv1"].out_space not in (lm["stem"].out_space,)
  adds = [o for o in arch.ops if o.op == "add"]
  producer = {o.output: o for o in arch.ops}
  for a in adds:  # main branch first: a BN after a 3x3 conv2
    bn = producer[a.inputs[0]]
    assert bn.op == "bn" and arch.layer(bn.layer).name.endswith("bn2")
  assert (arch.node_style, arch.edge_style) == ("resnet", "single")
  assert [s for s, _ in arch.widths][0] == "input" and arch.spaces[-1] == "classes"
  assert len(groups.pruning_groups(arch)) == 5  # stem stage, 3 inner, stage 2


def test_vggish_description():
  m = VGGish()
  x, v = _setup(m)
  arch, _ = from_flax(m, v, x)
  kinds = [o.op for o in arch.ops]
  assert kinds == ["conv", "bn", "relu", "maxpool", "conv", "bn", "relu", "maxpool", "conv",
                   "relu", "gap", "dense", "relu", "dense"]
  lm = arch.layer_map
  assert lm["c1"].bias and not lm["c2"].bias and lm["c3"].bias and lm["fc1"].bias
  assert (arch.node_style, arch.edge_style) == ("vgg", "single")


def test_mixed_description_and_epsilon():
  m = Mixed()
  x, v = _setup(m, hw=32)
  arch, ours = from_flax(m, v, x)
  lm = arch.layer_map
  assert [(lm[n].kernel, lm[n].stride, lm[n].padding) for n in ("stem", "c5", "c1", "c3")] == \
      [(7, 2, 3), (5, 1, 2), (1, 1, 0), (3, 2, 1)]
  pool = [o for o in arch.ops if o.op == "maxpool"][0]
  assert (pool.window, pool.stride, pool.padding) == (3, 2, 1)
  assert arch.edge_style == "multi"
  # epsilon 1e-3 folded into the variance; 1e-5 kept as is
  np.testing.assert_allclose(ours["batch_stats"]["stem_bn"]["var"],
                             v["batch_stats"]["stem_bn"]["running_var"] + (1e-3 - 1e-5),
                             rtol=1e-6)
  assert ours["batch_stats"]["bn5"]["var"] is v["batch_stats"]["bn5"]["running_var"]
  assert ours["params"]["stem_bn"]["scale"] is v["params"]["stem_bn"]["weight"]


def test_macs_closed_form():
  m = VGGish()
  x, v = _setup(m)
  arch, _ = from_flax(m, v, x)
  h = 16
  conv = lambda k, ci, co, hw, b: k * k * ci * co * hw * hw + (co * hw * hw if b else 0)
  expect = (conv(3, 3, 8, h, True) + 2 * 8 * h * h + 8 * h * h + 8 * h * h  # c1 bn relu pool
            + conv(3, 8, 12, h // 2, False) + 2 * 12 * 64 + 12 * 64 + 12 * 64
            + conv(3, 12, 16, h // 4, True) + 16 * 16 + 16 * 16  # c3, relu, gap
            + 16 * 24 + 24 + 24 + 24 * 5 + 5)  # fc1, relu, fc2
  params = (3 * 3 * 3 * 8 + 8 + 16 + 3 * 3 * 8 * 12 + 24 + 3 * 3 * 12 * 16 + 16
            + 16 * 24 + 24 + 24 * 5 + 5)
  assert macs.count_macs(arch, (1, 3, h, h)) == (expect, params)


@pytest.mark.parametrize("net", sorted(NETS))
def test_masked_equals_materialized_and_pruning(net):
  m = NETS[net]()
  hw = 32 if net == "mixed" else 16
  x, v = _setup(m, hw=hw)
  arch, ours = from_flax(m, v, x)
  res = pruning.prune_to_target(arch, ours, 1.5, (1, 3, hw, hw))
  assert res.speed_up >= 1.5
  masked = masks_lib.mask_variables(arch, ours, res.masks)
  y_masked = cnn.apply_model(arch, masked, x, masks=res.masks)
  small, sv = masks_lib.materialize(arch, masked, res.masks)
  np.testing.assert_allclose(cnn.apply_model(small, sv, x), y_masked, atol=1e-5, rtol=1e-5)
  full, _ = macs.count_macs(arch, (1, 3, hw, hw))
  cut, _ = macs.count_macs(small, (1, 3, hw, hw))
  assert full / cut >= 1.5
  assert groups.group_importance(arch, ours)
  if net == "resnet":  # adaptive pruning against the full network's predictions
    ref = jnp.argmax(cnn.apply_model(arch, ours, x), -1)

    def agreement(mk):
      y = cnn.apply_model(arch, masks_lib.mask_variables(arch, ours, mk), x, masks=mk)
      return float(jnp.mean(jnp.argmax(y, -1) == ref))
    mk, speed_up, history = pruning.adaptive_prune(arch, ours, agreement, 0.5, (1, 3, hw, hw),
                                                   max_speed_up=2.0, steps=20)
    assert speed_up > 1.0 and history and agreement(mk) >= 0.5


def test_to_flax_variables_round_trip():
  for net in sorted(NETS):
    m = NETS[net]()
    x, v = _setup(m, hw=32 if net == "mixed" else 16)
    before = _snapshot(v)
    arch, ours = from_flax(m, v, x)
    back = to_flax_variables(arch, ours, like=v)
    np.testing.assert_allclose(
        np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(back)]),
        np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(v)]), rtol=1e-6)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(v)
    assert _same(v, before)


def test_pruned_weights_back_into_the_users_module():
  m = ResNet()
  x, v = _setup(m)
  arch, ours = from_flax(m, v, x)
  res = pruning.prune_to_target(arch, ours, 2.0, (1, 3, 16, 16))
  small, sv = masks_lib.materialize(arch, masks_lib.mask_variables(arch, ours, res.masks),
                                    res.masks)
  w = lambda layer: small.width(small.layer(layer).out_space)
  m2 = ResNet(stem=w("stem"), blocks=tuple(
      (w(f"block{i}_conv1"), w(f"block{i}_conv2"), s) for i, s in enumerate((1, 2, 1))))
  tree = to_flax_variables(small, sv, like=v)
  np.testing.assert_allclose(m2.apply(tree, x), cnn.apply_model(small, sv, x), atol=1e-5,
                             rtol=1e-5)
  # and traced again, the small module gives the small description
  small2, _ = from_flax(m2, tree, x)
  assert small2.widths == small.widths


# ---------------------------------------------------------------------------------------------
# Unsupported operations: each named, with its source line and module path
# ---------------------------------------------------------------------------------------------
def _head(x):
  return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class Concat(nn.Module):
  @nn.compact
  def __call__(self, x):
    a = nn.Conv(4, (3, 3), padding=1, name="a")(x)
    b = nn.Conv(4, (3, 3), padding=1, name="b")(x)
    return _head(jnp.concatenate([a, b], -1))


class Depthwise(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, name="a")(x)
    x = nn.Conv(4, (3, 3), padding=1, feature_group_count=4, name="dw")(x)
    return _head(x)


class Grouped(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, name="a")(x)
    x = nn.Conv(8, (3, 3), padding=1, feature_group_count=2, name="grouped")(x)
    return _head(x)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Conv(4, (1, 1), name="q")(x)
    k = nn.Conv(4, (1, 1), name="k")(x)
    att = jax.nn.softmax(jnp.einsum("bhwc,bijc->bhwij", q, k).reshape(x.shape[:3] + (-1,)))
    return _head(att)


class Sigmoid(nn.Module):  # sigmoid(0) = 0.5: a pruned channel would not stay zero
  @nn.compact
  def __call__(self, x):
    return _head(nn.sigmoid(nn.Conv(4, (3, 3), padding=1, name="a")(x)))


class Cube(nn.Module):  # an elementwise function that is no registered activation
  @nn.compact
  def __call__(self, x):
    return _head(nn.Conv(4, (3, 3), padding=1, name="a")(x) ** 3)


class AvgRect(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _head(nn.avg_pool(nn.Conv(4, (3, 3), padding=1, name="a")(x), (2, 3), (2, 2)))


class AvgNoPad(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.Conv(4, (3, 3), padding=1, name="a")(x)
    return _head(nn.avg_pool(y, (3, 3), (2, 2), padding="SAME", count_include_pad=False))


class Gated(nn.Module):  # a product of two different activations (squeeze-excitation style)
  @nn.compact
  def __call__(self, x):
    y = nn.Conv(4, (3, 3), padding=1, name="a")(x)
    return _head(y * nn.sigmoid(nn.Conv(4, (1, 1), name="g")(y)))


@pytest.mark.parametrize("cls, words", [
    (Concat, "concatenation"), (Depthwise, "depthwise convolution"),
    (Grouped, "grouped convolution"),
    (Attention, "product of two activations"), (Sigmoid, "logistic"),
    (Sigmoid, "maps 0 to 0.5"), (Cube, "none of the Arch's activations"),
    (AvgRect, "average pooling with window (2, 3)"), (AvgNoPad, "count_include_pad=False"),
    (Gated, "mul of two activations")])
def test_unsupported_operations_named(cls, words):
  m = cls()
  x, v = _setup(m, hw=8)
  before = _snapshot(v)
  with pytest.raises(TraceError) as e:
    from_flax(m, v, x)
  msg = str(e.value)
  assert words in msg, msg
  assert "trace_test.py:" in msg, msg  # the user's source line
  assert "module " in msg, msg
  assert _same(v, before)


def test_error_names_module_path():
  m = Depthwise()
  x, v = _setup(m, hw=8)
  with pytest.raises(TraceError, match="module dw"):
    from_flax(m, v, x)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
class TrainBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False, name="bn")(nn.Conv(4, (3, 3), name="a")(x))
    return _head(x)


class Drop(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dropout(0.5, deterministic=not train)(nn.Conv(4, (3, 3), name="a")(x))
    return _head(x)


def test_bad_input_mutable_and_rng():
  x = jnp.ones((1, 8, 8, 3))
  m = TrainBN()
  v = m.init(KEY, x)
  with pytest.raises(TraceError, match="writes a variable collection"):
    from_flax(m, v, x)
  m = Drop()
  v = m.init(KEY, x, train=False)
  with pytest.raises(TraceError, match="needs an RNG"):
    from_flax(m, v, x)
  arch, _ = from_flax(m, v, x, train=False)  # deterministic: fine
  assert [o.op for o in arch.ops] == ["conv", "gap", "dense"]


def test_bad_input_rank_and_variables():
  m = ResNet()
  x, v = _setup(m)
  before = _snapshot(v)
  with pytest.raises(TraceError, match="NHWC"):
    from_flax(m, v, x[0])
  bad = copy.deepcopy(jax.tree_util.tree_map(lambda a: a, v))
  bad["params"]["stem"]["kernel"] = jnp.zeros((3, 3, 3, 5))
  with pytest.raises(TraceError, match="do not match"):
    from_flax(m, bad, x)
  missing = jax.tree_util.tree_map(lambda a: a, v)
  del missing["params"]["head"]
  with pytest.raises(TraceError, match="do not match"):
    from_flax(m, missing, x)
  extra = jax.tree_util.tree_map(lambda a: a, v)
  extra["params"]["unused"] = {"kernel": jnp.zeros((2, 2))}
  with pytest.raises(TraceError, match="never read"):
    from_flax(m, extra, x)
  with pytest.raises(TraceError, match="'params'"):
    from_flax(m, {"batch_stats": v["batch_stats"]}, x)
  assert _same(v, before)


# ---------------------------------------------------------------------------------------------
# Graph, metanetwork
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", sorted(NETS))
def test_graph_round_trip_and_metanet(net):
  from metaprune_jax.graphs import graph  # pylint: disable=g-import-not-at-top
  from metaprune_jax.metanetwork import metanet  # pylint: disable=g-import-not-at-top
  m = NETS[net]()
  hw = 32 if net == "mixed" else 16
  x, v = _setup(m, hw=hw)
  arch, ours = from_flax(m, v, x)
  g = graph.to_graph(arch, ours)
  back = graph.from_graph(arch, g)
  assert _same(back, {"params": ours["params"], "batch_stats": ours["batch_stats"]})
  config = metanet.make_metanet_config(2, 8, graph.node_dim(arch), graph.edge_kinds(arch), 0.1,
                                       0.1)
  params = metanet.init_metanet(config, KEY)
  out = metanet.transform(config, params, arch, ours)
  y = cnn.apply_model(arch, out, x)
  assert y.shape == (2, arch.num_classes) and bool(jnp.all(jnp.isfinite(y)))
  if net == "resnet":  # the regulariser and one meta-training gradient
    from metaprune_jax.metanetwork import metatrain  # pylint: disable=g-import-not-at-top
    from metaprune_jax.prune.regularizer import regularizer  # pylint: disable=g-import-not-at-top
    r = jax.grad(lambda p: regularizer(arch, {"params": p}))(ours["params"])
    assert jax.tree_util.tree_structure(r) == jax.tree_util.tree_structure(ours["params"])
    grads = metatrain.meta_train_grads(config, params, arch, ours, x, jnp.array([0, 1]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------------------------------------
# The zoo, derived the same way: tracing cnn.CNN(arch) gives back the hand-written arch
# ---------------------------------------------------------------------------------------------
def _zoo(name):
  from metaprune_jax.nets import zoo  # pylint: disable=g-import-not-at-top
  if name == "vgg19":  # structure only: narrow channels keep the test cheap
    a = zoo.get_arch(name, 10)
    return a.with_widths({s: 8 for s in a.prunable_spaces})
  if name == "resnet50":
    return zoo.get_arch(name, 10, width_mult=0.125)
  return zoo.get_arch(name, 10)


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet20", "resnet56", "vgg19", "resnet26",
                                  "resnet50"])
def test_zoo_traced_equals_hand_written(name):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from metaprune_jax.graphs import graph  # pylint: disable=g-import-not-at-top
  from metaprune_jax.backends import xla_hints  # pylint: disable=g-import-not-at-top
  a = _zoo(name)
  v = _randomize(cnn.init_variables(a, KEY, (32, 32)))
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  # cnn.CNN's residual joins divide by a data-dependent 1.0 (an XLA scheduling hint)
  with mock.patch.object(xla_hints, "materialize", lambda y: y):
    t, ours = from_flax(cnn.CNN(a), v, x, name=a.name)
  # spaces: one bijection maps the traced names to the zoo's
  ren = {}
  for l1, l2 in zip(a.layers, t.layers):
    for s1, s2 in ((l1.in_space, l2.in_space), (l1.out_space, l2.out_space)):
      if s1 is not None:
        assert ren.setdefault(s2, s1) == s1
  assert len(set(ren.values())) == len(ren) == len(a.widths)
  assert {ren[s]: w for s, w in t.widths} == dict(a.widths)
  # layers (the zoo's ref is the PyTorch name; ours the flax path) and ops
  assert [dataclasses.replace(l, ref=l1.ref, in_space=ren.get(l.in_space),
                              out_space=ren[l.out_space]) for l, l1 in zip(t.layers, a.layers)] \
      == list(a.layers)
  # relus: Torch-Pruning counts nn.ReLU modules only; a flax trace cannot tell them apart
  assert [dataclasses.replace(o, counted=False) for o in t.ops] == \
      [dataclasses.replace(o, counted=False) for o in a.ops]
  assert (t.node_style, t.edge_style, t.num_classes) == (a.node_style, a.edge_style,
                                                         a.num_classes)
  counted = dataclasses.replace(a, ops=tuple(dataclasses.replace(o, counted=True)
                                             for o in a.ops))
  assert macs.count_macs(t) == macs.count_macs(counted)
  gt, ga = groups.pruning_groups(t), groups.pruning_groups(a)
  assert [(ren[g.space], [m_.layer for m_ in g.members]) for g in gt] == \
      [(g.space, [m_.layer for m_ in g.members]) for g in ga]
  # the same graph, bit for bit
  g1, g2 = graph.to_graph(t, ours), graph.to_graph(a, v)
  for f1, f2 in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))
  np.testing.assert_allclose(cnn.apply_model(t, ours, x), cnn.apply_model(a, v, x), atol=1e-5,
                             rtol=1e-5)


def test_zoo_resnet18_34_are_traced():
  from metaprune_jax.nets import flax_resnet  # pylint: disable=g-import-not-at-top
  from metaprune_jax.nets import zoo  # pylint: disable=g-import-not-at-top
  for name, blocks in (("resnet18", 8), ("resnet34", 16)):
    a = zoo.get_arch(name, 10, width_mult=0.125)
    assert a.name == name and not a.origin and (a.node_style, a.edge_style) == ("resnet",
                                                                                "multi")
    assert a.layer("layer2_0_downsample_0").ref == "layer2.0.downsample.0"
    assert a.layer("layer2_0_downsample_1").shortcut
    assert len(groups.pruning_groups(a)) == blocks + 4
    # parameter count against the flax module's own variables
    m = flax_resnet.ResNet(flax_resnet.STAGES[name], 10, 0.125)
    v = jax.eval_shape(m.init, KEY, jnp.zeros((1, 32, 32, 3)))
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(v["params"]))
    assert macs.count_macs(a)[1] == n
  full = zoo.get_arch("resnet18", 1000)
  assert macs.count_macs(full, (1, 3, 224, 224))[1] == 11689512  # torchvision's resnet18


class PreAct(nn.Module):
  """A pre-activation block (BN -> ReLU -> conv): an Arch, but no graph family fits it."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="stem")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
    y = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv1")(y)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn2")(y))
    y = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    x = x + y
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn_out")(x))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2), keepdims=True).reshape((x.shape[0], -1)))


def test_preactivation_arch_without_graph():
  from metaprune_jax.graphs import graph  # pylint: disable=g-import-not-at-top
  m = PreAct()
  x, v = _setup(m, hw=8)
  arch, ours = from_flax(m, v, x)
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5, rtol=1e-5)
  assert len(groups.pruning_groups(arch)) == 2
  with pytest.raises(ValueError, match="does not directly follow a conv"):
    graph.to_graph(arch, ours)


def small_resnet(num_classes):
  """A factory for ``--config.arch=trace_test:small_resnet`` (zoo.get_arch)."""
  return ResNet(num_classes=num_classes), jnp.zeros((1, 8, 8, 3))


def test_arch_from_factory_via_zoo():
  from metaprune_jax.nets import zoo  # pylint: disable=g-import-not-at-top
  a = zoo.get_arch(f"{__name__}:small_resnet", 7)
  assert a.name == "small_resnet" and a.num_classes == 7
  b = zoo.get_arch(f"{__name__}:small_resnet", 7, widths={a.layer("stem").out_space: 4})
  assert b.width(b.layer("stem").out_space) == 4
  v = cnn.init_variables(a, KEY, (8, 8))
  assert cnn.apply_model(a, v, jnp.zeros((1, 8, 8, 3))).shape == (1, 7)
  with pytest.raises(ValueError, match="cannot import"):
    zoo.get_arch(f"{__name__}:no_such_factory", 7)


class BiasedResNet(nn.Module):
  """Conv biases *and* projection-shortcut BatchNorms: the 9-column "full" node family."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn0")(
        nn.Conv(6, (3, 3), padding=1, name="stem")(x)))
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(
        nn.Conv(5, (3, 3), 2, padding=1, name="conv1")(x)))
    y = nn.BatchNorm(use_running_average=True, name="bn2")(
        nn.Conv(8, (5, 5), padding=2, name="conv2")(y))
    s = nn.BatchNorm(use_running_average=True, name="proj_bn")(
        nn.Conv(8, (1, 1), 2, use_bias=False, name="proj")(x))
    return nn.Dense(3, name="head")(jnp.mean(nn.relu(y + s), axis=(1, 2)))


def test_full_node_family_graph_round_trip():
  from metaprune_jax.graphs import graph  # pylint: disable=g-import-not-at-top
  from metaprune_jax.metanetwork import metanet  # pylint: disable=g-import-not-at-top
  m = BiasedResNet()
  x, v = _setup(m, hw=8)
  arch, ours = from_flax(m, v, x)
  assert (arch.node_style, arch.edge_style) == ("full", "multi")
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5, rtol=1e-5)
  g = graph.to_graph(arch, ours)
  assert g.nodes.shape[1] == 9
  assert _same(graph.from_graph(arch, g), ours)
  config = metanet.make_metanet_config(1, 8, 9, graph.edge_kinds(arch), 0.1, 0.1)
  out = metanet.transform(config, metanet.init_metanet(config, KEY), arch, ours)
  assert bool(jnp.all(jnp.isfinite(cnn.apply_model(arch, out, x))))


class KeepDimsHead(nn.Module):
  """avg_pool to 1x1 with the axes kept, Dense on [B, 1, 1, C], a reshape at the end."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding=1, name="a")(x))
    x = nn.avg_pool(x, x.shape[1:3])
    x = nn.relu(nn.Dense(6, name="hidden")(x))
    return nn.Dense(3, name="head")(x).reshape((x.shape[0], -1))


class ConvAfterPool(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.mean(nn.Conv(4, (3, 3), padding=1, name="a")(x), axis=(1, 2), keepdims=True)
    return nn.Dense(3, name="head")(nn.Conv(4, (1, 1), name="b")(x).reshape((x.shape[0], -1)))


def test_pooled_heads():
  m = KeepDimsHead()
  x, v = _setup(m, hw=8)
  arch, ours = from_flax(m, v, x)
  assert [o.op for o in arch.ops] == ["conv", "relu", "gap", "dense", "relu", "dense"]
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5, rtol=1e-5)
  m = ConvAfterPool()
  x, v = _setup(m, hw=8)
  with pytest.raises(TraceError, match="convolution over a pooled tensor"):
    from_flax(m, v, x)


class PlainBN(nn.Module):
  """flax BatchNorms without scale, without bias, and at epsilon 1e-3 (TF's default)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="a")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, use_scale=False, name="n_a")(x))
    x = nn.Conv(5, (3, 3), padding=1, use_bias=False, name="b")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, use_bias=False, epsilon=1e-3,
                             name="n_b")(x))
    return _head(x)


def test_batchnorm_variants():
  m = PlainBN()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  for v in (m.init(KEY, x), _randomize(m.init(KEY, x))):  # fresh (ambiguous values) and random
    arch, ours = from_flax(m, v, x)
    assert [o.op for o in arch.ops] == ["conv", "bn", "relu", "conv", "bn", "relu", "gap",
                                        "dense"]
    np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_array_equal(ours["params"]["n_a"]["scale"], np.ones(4))
    np.testing.assert_array_equal(ours["params"]["n_b"]["bias"], np.zeros(5))
    assert ours["params"]["n_b"]["scale"] is v["params"]["n_b"]["scale"]
    assert ours["batch_stats"]["n_a"]["mean"] is v["batch_stats"]["n_a"]["mean"]
    back = to_flax_variables(arch, ours, like=v)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(v)
    np.testing.assert_allclose(back["batch_stats"]["n_b"]["var"], v["batch_stats"]["n_b"]["var"],
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# flax.nnx
# ---------------------------------------------------------------------------------------------
def _nnx_net():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class NBlock(nnx.Module):

    def __init__(self, cin, cout, stride, rngs):
      self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False,
                            rngs=rngs)
      self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
      self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
      if stride != 1 or cin != cout:
        self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
        self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)
      else:
        self.proj = self.proj_bn = None

    def __call__(self, x):
      y = nnx.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.proj is not None:
        x = self.proj_bn(self.proj(x))
      return nnx.relu(x + y)

  class NNet(nnx.Module):

    def __init__(self, rngs):
      self.stem = nnx.Conv(3, 8, (3, 3), padding=1, use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.blocks = nnx.List([NBlock(8, 8, 1, rngs), NBlock(8, 16, 2, rngs)])
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.fc = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn(self.stem(x)))
      for b in self.blocks:
        x = b(x)
      return self.fc(self.drop(x.mean((1, 2))))
  return NNet(nnx.Rngs(0))


def test_nnx_module():
  from metaprune_jax.nets import trace  # pylint: disable=g-import-not-at-top
  m = _nnx_net()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  with pytest.raises(TraceError, match="model.eval"):
    trace.from_nnx(m, x)
  m.eval()
  trace.update_nnx(m, _randomize(trace.nnx_variables(m)))
  before = _snapshot(trace.nnx_variables(m))
  arch, ours = trace.from_nnx(m, x)
  assert _same(trace.nnx_variables(m), before)
  assert arch.layer("blocks_1_proj").shortcut and arch.layer("blocks_1_proj").ref == \
      "blocks.1.proj"
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m(x), atol=1e-5, rtol=1e-5)
  # pruned, materialised, written back: the tree has the pruned shapes under nnx's keys
  res = pruning.prune_to_target(arch, ours, 1.5, (1, 3, 8, 8))
  small, sv = masks_lib.materialize(arch, masks_lib.mask_variables(arch, ours, res.masks),
                                    res.masks)
  tree = to_flax_variables(small, sv, like=trace.nnx_variables(m))
  assert tree["params"]["blocks"][1]["conv1"]["kernel"].shape == \
      sv["params"]["blocks_1_conv1"]["kernel"].shape
  # unpruned, it goes back into the model exactly
  trace.update_nnx(m, to_flax_variables(arch, ours, like=trace.nnx_variables(m)))
  assert _same(trace.nnx_variables(m), before)


class FoldedBNLayer(nn.Module):
  """A BatchNorm folded into one multiply-add, with names that say nothing."""

  @nn.compact
  def __call__(self, x):
    g = self.param("g", nn.initializers.ones, (4,))
    b = self.param("b", nn.initializers.zeros, (4,))
    m = self.variable("batch_stats", "m", jnp.zeros, (4,)).value
    v = self.variable("batch_stats", "v", jnp.ones, (4,)).value
    a = g * jax.lax.rsqrt(v + 1e-5)
    return x * a + (b - m * a)


class FoldedBN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="a")(x)
    return _head(nn.relu(FoldedBNLayer(name="fbn")(x)))


def test_folded_batchnorm_roles_from_values_never_guessed():
  m = FoldedBN()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  v = m.init(KEY, x)
  with pytest.raises(TraceError, match="do not tell which is which"):
    from_flax(m, v, x)  # fresh values: mean 0 = bias 0, nothing to tell them apart
  v = _randomize(v)
  v["batch_stats"]["fbn"]["v"] = jnp.abs(v["batch_stats"]["fbn"]["v"]) + 0.5
  arch, ours = from_flax(m, v, x)
  np.testing.assert_allclose(cnn.apply_model(arch, ours, x), m.apply(v, x), atol=1e-5, rtol=1e-5)
  assert ours["params"]["fbn"]["scale"] is v["params"]["fbn"]["g"]
  assert ours["params"]["fbn"]["bias"] is v["params"]["fbn"]["b"]
  assert ours["batch_stats"]["fbn"]["mean"] is v["batch_stats"]["fbn"]["m"]


# ---------------------------------------------------------------------------------------------
# The zoo again, from independent plain-flax modules written like the reference's PyTorch ones
# ---------------------------------------------------------------------------------------------
def _torch_ref(path):
  import re  # pylint: disable=g-import-not-at-top
  return ".".join(re.sub(r"^(layer\d+|downsample|block\d+)_(\d+)$", r"\1.\2", p) for p in path)


def _bn(name):
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


class CifarBlock(nn.Module):
  planes: int
  stride: int
  project: bool

  @nn.compact
  def __call__(self, x):
    out = nn.relu(_bn("bn1")(nn.Conv(self.planes, (3, 3), self.stride, padding=1,
                                     use_bias=False, name="conv1")(x)))
    out = _bn("bn2")(nn.Conv(self.planes, (3, 3), padding=1, use_bias=False, name="conv2")(out))
    if self.project:
      x = _bn("downsample_1")(nn.Conv(self.planes, (1, 1), self.stride, use_bias=False,
                                      name="downsample_0")(x))
    return nn.relu(out + x)


class CifarResNet(nn.Module):
  depth: int
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    n = (self.depth - 2) // 6
    x = nn.relu(_bn("bn1")(nn.Conv(16, (3, 3), padding=1, use_bias=False, name="conv1")(x)))
    inp = 16
    for i, planes in enumerate((16, 32, 64)):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        x = CifarBlock(planes, stride, inp != planes, name=f"layer{i + 1}_{j}")(x)
        inp = planes
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class Bottleneck(nn.Module):
  planes: int
  stride: int
  project: bool

  @nn.compact
  def __call__(self, x):
    out = nn.relu(_bn("bn1")(nn.Conv(self.planes, (1, 1), use_bias=False, name="conv1")(x)))
    out = nn.relu(_bn("bn2")(nn.Conv(self.planes, (3, 3), self.stride, padding=1,
                                     use_bias=False, name="conv2")(out)))
    out = _bn("bn3")(nn.Conv(self.planes * 4, (1, 1), use_bias=False, name="conv3")(out))
    if self.project:
      x = _bn("downsample_1")(nn.Conv(self.planes * 4, (1, 1), self.stride, use_bias=False,
                                      name="downsample_0")(x))
    return nn.relu(out + x)


class BottleneckResNet(nn.Module):
  blocks: Sequence[int]
  num_classes: int = 10
  width_mult: float = 1.0

  @nn.compact
  def __call__(self, x):
    planes = [max(1, int(round(p * self.width_mult))) for p in (64, 128, 256, 512)]
    x = nn.relu(_bn("bn1")(nn.Conv(planes[0], (7, 7), 2, padding=3, use_bias=False,
                                   name="conv1")(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, nb in enumerate(self.blocks):
      for j in range(nb):
        x = Bottleneck(planes[i], 2 if i > 0 and j == 0 else 1, j == 0,
                       name=f"layer{i + 1}_{j}")(x)
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class VGG19(nn.Module):
  width: int = 8  # every conv's channels (the structure is what is compared)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for bi, n in enumerate((2, 2, 4, 4, 4)):
      for j in range(n):
        x = nn.Conv(self.width, (3, 3), padding=1, name=f"block{bi}_{3 * j}")(x)
        x = nn.relu(_bn(f"block{bi}_{3 * j + 1}")(x))
      if bi < 3:
        x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg19", "resnet26", "resnet50"])
def test_zoo_equals_trace_of_an_independent_flax_module(name):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from metaprune_jax.graphs import graph  # pylint: disable=g-import-not-at-top
  from metaprune_jax.nets import zoo  # pylint: disable=g-import-not-at-top
  a = zoo.get_arch(name, 10, width_mult=0.125) if name == "resnet26" else _zoo(name)
  if name in ("resnet20", "resnet56"):
    m = CifarResNet(int(name[6:]))
  elif name == "vgg19":
    m = VGG19()
  else:
    m = BottleneckResNet((2, 2, 2, 2) if name == "resnet26" else (3, 4, 6, 3), 10, 0.125)
  x = jnp.zeros((1, 32, 32, 3))
  v = _randomize(jax.jit(m.init)(KEY, x))
  t, ours = from_flax(m, v, x, name=a.name, ref_name=a.ref_name, ref_fn=_torch_ref,
                      init=a.init)
  ren = {}
  for l1, l2 in zip(a.layers, t.layers):
    for s1, s2 in ((l1.in_space, l2.in_space), (l1.out_space, l2.out_space)):
      if s1 is not None:
        assert ren.setdefault(s2, s1) == s1
  assert len(set(ren.values())) == len(ren) == len(a.widths)
  # the same layers, PyTorch names included, and the same ops (ReLU MAC counting aside)
  assert [dataclasses.replace(l, in_space=ren.get(l.in_space), out_space=ren[l.out_space])
          for l in t.layers] == list(a.layers)
  assert [dataclasses.replace(o, counted=False) for o in t.ops] == \
      [dataclasses.replace(o, counted=False) for o in a.ops]
  assert (t.node_style, t.edge_style) == (a.node_style, a.edge_style)
  counted = dataclasses.replace(a, ops=tuple(dataclasses.replace(o, counted=True)
                                             for o in a.ops))
  assert macs.count_macs(t) == macs.count_macs(counted)
  assert [(ren[g.space], g.root, [m_.layer for m_ in g.members])
          for g in groups.pruning_groups(t)] == \
      [(g.space, g.root, [m_.layer for m_ in g.members]) for g in groups.pruning_groups(a)]
  # ours in the zoo's arch: the same graph, bit for bit, as ours in the traced arch
  renamed = dataclasses.replace(
      t, layers=tuple(dataclasses.replace(l, in_space=ren.get(l.in_space),
                                          out_space=ren[l.out_space]) for l in t.layers),
      widths=tuple((ren[s], w) for s, w in t.widths))
  g1, g2 = graph.to_graph(t, ours), graph.to_graph(a.with_widths(renamed.width_map), ours)
  for f1, f2 in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))
  xr = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  np.testing.assert_allclose(cnn.apply_model(a, ours, xr), m.apply(v, xr), atol=1e-4, rtol=1e-4)


class GroupNormNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _head(nn.GroupNorm(num_groups=2, name="gn")(nn.Conv(4, (3, 3), name="a")(x)))


class LayerNormNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _head(nn.LayerNorm(name="ln")(nn.Conv(4, (3, 3), name="a")(x)))


def test_other_normalisations_named():
  for cls, words in ((GroupNormNet, "channel-mixing reshape .* module gn"),
                     (LayerNormNet, "normalisation .* module ln")):
    m = cls()
    x, v = _setup(m, hw=8)
    with pytest.raises(TraceError, match=words):
      from_flax(m, v, x)
