"""torchvision's ResNet-18/34 written in plain ``flax.linen``; their Archs come from tracing.

The zoo's ``resnet18`` and ``resnet34`` are not written op by op: :func:`traced_arch` traces
:class:`ResNet` with :func:`metaprune_jax.nets.trace.from_flax`. Module names follow torchvision's
state_dict keys with ``_`` for ``.`` inside a block (``layer1_0/conv1``,
``layer2_0/downsample_0``), so each layer's ``ref`` is torchvision's name (``layer1.0.conv1``)
and its parameter key the zoo's (``layer1_0_conv1``).

Layout (torchvision ``resnet18``/``resnet34``): conv 7x7/2 (padding 3) + BN + ReLU, max pool
3x3/2 (padding 1), basic blocks (3x3 convs; the stride in the first conv; a 1x1 projection +
BN on the first block of stages 2-4), global average pool, fc. Every ReLU is torchvision's
``nn.ReLU`` module, so every ReLU counts MACs.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metaprune_jax.nets.arch import Arch


class BasicBlock(nn.Module):
  """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

  planes: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    y = nn.Conv(self.planes, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = nn.Conv(self.planes, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.downsample:
      x = nn.Conv(self.planes, (1, 1), self.stride, padding=0, use_bias=False,
                  name="downsample_0")(x)
      x = norm(name="downsample_1")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """An ImageNet-layout basic-block ResNet on NHWC images ``[B, H, W, 3]``."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 1000
  width_mult: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    planes = [max(1, int(round(p * self.width_mult))) for p in (64, 128, 256, 512)]
    x = nn.Conv(planes[0], (7, 7), 2, padding=3, use_bias=False, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    inp = planes[0]
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(planes[i], stride, downsample=stride != 1 or inp != planes[i],
                       name=f"layer{i + 1}_{j}")(x, train)
        inp = planes[i]
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def torchvision_ref(path: tuple) -> str:
  """Module path -> torchvision name (``('layer1_0', 'downsample_0')`` ->
  ``layer1.0.downsample.0``)."""
  parts = [re.sub(r"^(layer\d+|downsample)_(\d+)$", r"\1.\2", p) for p in path]
  return ".".join(parts)


STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


@functools.lru_cache(maxsize=16)
def traced_arch(name: str, num_classes: int = 1000, width_mult: float = 1.0) -> Arch:
  """The Arch of ``ResNet(STAGES[name])``, derived by :func:`~metaprune_jax.nets.trace.from_flax`."""
  from metaprune_jax.nets import trace  # pylint: disable=g-import-not-at-top
  module = ResNet(STAGES[name], num_classes, width_mult)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  variables = jax.jit(module.init)(jax.random.key(0), x)
  arch, _ = trace.from_flax(module, variables, x, name=name, ref_name=name, count_relu=True,
                            ref_fn=torchvision_ref)
  # a zoo arch has no user tree to map back to
  return Arch(**{**{f: getattr(arch, f) for f in arch.__dataclass_fields__}, "origin": ()})
