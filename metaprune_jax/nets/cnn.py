"""The Flax model of an :class:`~metaprune_jax.nets.arch.Arch`, at any widths, with channel masks.

Flax linen, not nnx: the model is a pure function of a ``{'params', 'batch_stats'}`` pytree,
which is exactly what the metanetwork produces (``from_graph``), what Orbax stores and what
``jax.grad`` differentiates in meta-training; linen keeps that pytree explicit with no module
state to split and merge.

The module interprets ``arch.ops`` in order. PyTorch semantics are kept where they matter for
matching the reference (docs/design.md section 7): explicit conv padding (never 'SAME'; per side
when a traced network pads asymmetrically), BatchNorm normalising with the biased batch variance
while its running variance takes the unbiased one, momentum 0.1 in torch terms, eps 1e-5;
max-pool pads with -inf, average pooling divides by the window area (padding included).

Inference of an unmasked network with conv biases (a folded one, ``fold_batchnorm``) runs each
conv -> bias [-> residual add] -> ReLU as one :func:`xla_hints.conv_bias_relu` (on the CPU the
narrow-convolution kernel applies the epilogue as it writes its output; elsewhere, and for
gradients, the same composition as below).

Residual joins go through :func:`xla_hints.materialize` (on the CPU backend, an exact division
by 1.0; elsewhere the identity). Without it, XLA:CPU fuses the whole elementwise residual stream
of a stage (BN, add, ReLU of every earlier block) into each transpose that the weight-gradient
convolutions need, recomputing it from the stage's start for every layer: quadratic work that
made a ResNet-56 train step 1.6x slower (2.7 s against 1.65 s at batch 128,
``benchmarks/train_step.py``). Convolutions go through :func:`xla_hints.conv2d` (a hand-written
backward on the CPU backend only). ``xla_hints`` is the one place for these XLA:CPU settings.

Masks: ``masks[space]`` is a ``[width]`` float vector (1 keep, 0 pruned). Every conv and BN
output in a space is multiplied by its mask, so a pruned channel is an exact zero everywhere it
is read, and the masked network computes what the network materialised at the kept widths
computes.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from metaprune_jax.backends import xla_hints
from metaprune_jax.nets import activations
from metaprune_jax.nets.arch import Arch, pad_pairs


BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * running + m * batch


def conv2d(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
  """2-D convolution ``[B, H, W, C] x [kh, kw, C, O] -> [B, Ho, Wo, O]`` (NHWC, HWIO).

  :func:`metaprune_jax.backends.xla_hints.conv2d`: ``lax.conv_general_dilated`` with its own gradient,
  except on the CPU backend, where the backward pass is hand-written (the same numbers; see
  ``xla_hints`` for why and for the switch).

  Args:
    x: ``[B, H, W, C]``.
    w: ``[kh, kw, C, O]``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.
  """
  return xla_hints.conv2d(x, w, strides, padding)


def _flax_conv(x, w, strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
  """``nn.Conv``'s ``conv_general_dilated`` hook, routed to :func:`conv2d`."""
  del dimension_numbers, precision  # nn.Conv's 2-D defaults: NHWC / HWIO
  if any(d != 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1))) or \
      feature_group_count != 1:
    raise ValueError("cnn.conv2d supports plain convolutions only (no dilation, no groups): "
                     f"got lhs_dilation={lhs_dilation}, rhs_dilation={rhs_dilation}, "
                     f"feature_group_count={feature_group_count}")
  return conv2d(x, w, tuple(strides), tuple(tuple(p) for p in padding))


def _kaiming_fan_out(key, shape, dtype=jnp.float32):
  kh, kw, _, out = shape
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out))


def _torch_linear_uniform(fan_in):
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class BatchNorm(nn.Module):
  """PyTorch-semantics BatchNorm over the last axis (NHWC or NC)."""

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean_v = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    var_v = self.variable("batch_stats", "var", jnp.ones, (c,))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      n = math.prod(x.shape[:-1])
      if not self.is_initializing():
        unbiased = var * (n / max(n - 1, 1))
        mean_v.value = (1 - BN_MOMENTUM) * mean_v.value + BN_MOMENTUM * mean
        var_v.value = (1 - BN_MOMENTUM) * var_v.value + BN_MOMENTUM * unbiased
    else:
      mean, var = mean_v.value, var_v.value
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class CNN(nn.Module):
  """A CNN interpreted from ``arch.ops``. Call with NHWC images ``[B, H, W, 3]``."""

  arch: Arch

  @nn.compact
  def __call__(self, x, train: bool = False, masks: Mapping[str, jax.Array] | None = None):
    arch = self.arch
    layers = arch.layer_map
    env = {"x": x}
    # inference of an unmasked network: conv -> bias [-> add] -> relu runs as one op
    # (xla_hints.conv_bias_relu: on the CPU the kernel writes its output with the epilogue)
    fuse = {} if train or masks is not None or self.is_initializing() else _epilogues(arch)
    done = set()
    for i, op in enumerate(arch.ops):
      if i in done:
        continue
      a = env[op.inputs[0]]
      if i in fuse:
        l = layers[op.layer]
        last, residual = fuse[i]
        p = self.variables["params"][l.name]
        env[arch.ops[last].output] = xla_hints.conv_bias_relu(
            a, p["kernel"], p["bias"], None if residual is None else env[residual],
            (l.stride, l.stride), pad_pairs(l.padding))
        done.update(range(i + 1, last + 1))
        continue
      if op.op == "conv":
        l = layers[op.layer]
        binit = nn.initializers.zeros  # conv biases (VGG) start at zero in the reference
        y = nn.Conv(arch.width(l.out_space), (l.kernel, l.kernel), (l.stride, l.stride),
                    padding=pad_pairs(l.padding), use_bias=l.bias,
                    kernel_init=_kaiming_fan_out, bias_init=binit,
                    conv_general_dilated=_flax_conv, name=l.name)(a)
        y = _mask(y, masks, l.out_space)
      elif op.op == "bn":
        l = layers[op.layer]
        y = _mask(BatchNorm(name=l.name)(a, train), masks, l.out_space)
      elif op.op == "dense":
        l = layers[op.layer]
        fan_in = arch.width(l.in_space)
        if arch.init == "vgg":
          kinit = nn.initializers.normal(0.01)
          binit = nn.initializers.zeros
        else:
          kinit = binit = _torch_linear_uniform(fan_in)
        y = nn.Dense(arch.width(l.out_space), use_bias=l.bias, kernel_init=kinit,
                     bias_init=binit, name=l.name)(a)
      elif op.op == "relu":
        y = nn.relu(a)
      elif op.op == "act":
        y = activations.apply(op.fn, op.alpha, a)
      elif op.op == "add":
        y = xla_hints.materialize(a + env[op.inputs[1]])
      elif op.op in ("maxpool", "avgpool"):
        pads = ((0, 0), *pad_pairs(op.padding), (0, 0))
        win, st = (1, op.window, op.window, 1), (1, op.stride, op.stride, 1)
        if op.op == "maxpool":
          y = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, win, st, pads)
        else:  # flax's nn.avg_pool (count_include_pad=True), PyTorch's AvgPool2d default
          y = jax.lax.reduce_window(a, 0.0, jax.lax.add, win, st, pads) / (op.window * op.window)
      elif op.op == "gap":
        y = jnp.mean(a, axis=(1, 2))
      elif op.op == "flatten":  # [B, 1, 1, C] -> [B, C] (after a conv covering the whole map)
        y = a.reshape(a.shape[0], -1)
      else:
        raise ValueError(f"unknown op {op.op!r}")
      env[op.output] = y
    return env[arch.ops[-1].output]


@functools.lru_cache(maxsize=64)
def _epilogues(arch: Arch) -> dict:
  """``{conv op index: (index of the relu ending the pattern, residual value name or None)}``
  for each biased conv followed by a relu, or by an add then a relu, whose intermediate values
  nothing else reads (a folded network's blocks)."""
  reads = {}
  for op in arch.ops:
    for name in op.inputs:
      reads[name] = reads.get(name, 0) + 1
  final = arch.ops[-1].output
  once = lambda name: reads.get(name, 0) == 1 and name != final  # pylint: disable=unnecessary-lambda-assignment
  layers, ops, out = arch.layer_map, arch.ops, {}
  for i, op in enumerate(ops):
    if op.op != "conv" or not layers[op.layer].bias or not once(op.output) or i + 1 >= len(ops):
      continue
    nxt = ops[i + 1]
    if nxt.op == "relu" and nxt.inputs[0] == op.output:
      out[i] = (i + 1, None)
    elif (nxt.op == "add" and op.output in nxt.inputs and len(nxt.inputs) == 2
          and nxt.inputs[0] != nxt.inputs[1] and once(nxt.output) and i + 2 < len(ops)
          and ops[i + 2].op == "relu" and ops[i + 2].inputs[0] == nxt.output):
      other = nxt.inputs[1] if nxt.inputs[0] == op.output else nxt.inputs[0]
      out[i] = (i + 2, other)
  return out


def _mask(y, masks, space):
  if masks is None or space not in masks:
    return y
  return y * masks[space].astype(y.dtype)


def init_variables(arch: Arch, rng: jax.Array, input_hw=(32, 32)) -> dict:
  """Fresh ``{'params', 'batch_stats'}`` for ``arch`` (reference init, docs/design.md section 7).

  Args:
    arch: the architecture (its widths decide the shapes).
    rng: PRNG key.
    input_hw: ``(H, W)`` of the ``[1, H, W, 3]`` zero image the module is initialised on.

  Returns:
    ``{'params': {layer: {'kernel': ..., 'bias'?: ...} / {'scale', 'bias'}}, 'batch_stats':
    {bn_layer: {'mean': [C], 'var': [C]}}}``: conv kernels ``[k, k, C_in, C_out]`` (HWIO),
    dense kernels ``[C_in, C_out]``, BatchNorm scale/bias/statistics ``[C]``, float32.
  """
  x = jnp.zeros((1, *input_hw, 3), jnp.float32)
  variables = CNN(arch).init(rng, x, train=False)
  return jax.tree_util.tree_map(lambda a: a, dict(variables))


def apply_model(arch: Arch, variables: Mapping, images_nhwc: jax.Array, train: bool = False,
                masks: Mapping[str, jax.Array] | None = None):
  """Runs the network.

  Args:
    arch: the architecture (its widths must match ``variables``).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    images_nhwc: ``[B, H, W, 3]`` float32.
    train: BatchNorm in training mode (batch statistics, running stats updated).
    masks: optional ``{space: [width] float}`` channel masks.

  Returns:
    ``logits [B, num_classes]``; with ``train=True``, ``(logits, new_batch_stats)``.

  Raises:
    ValueError: an op the network does not know; flax raises its own errors for variables
      whose shapes do not match ``arch``'s widths.
  """
  model = CNN(arch)
  v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if train:
    logits, upd = model.apply(v, images_nhwc, train=True, masks=masks, mutable=["batch_stats"])
    return logits, upd["batch_stats"]
  return model.apply(v, images_nhwc, train=False, masks=masks)
