"""Named architectures, each written once as an :class:`~metaprune_jax.nets.arch.Arch`.

docs/design.md section 7 gives their exact definitions; the reference's module names are kept as
each layer's ``ref``. Every builder takes ``num_classes`` and optional ``widths`` (a mapping
space -> channels; unspecified spaces keep the full width). Adding a network means adding a
builder here (or anywhere: :func:`register`), nothing else.

Spaces: CIFAR ResNets use ``s1, s2, s3`` for the residual streams of the three stages and the
conv's reference name (``layer1.0.conv1``) for each block's inner channels; ResNet-50 adds
``stem`` (its first block has a projection, so the stem is not coupled to stage 1) and
``layer{i}.{j}.conv{1,2}``; VGG names every conv's output space after the conv.
"""

from __future__ import annotations

from typing import Callable, Mapping

from metaprune_jax.nets.arch import CLASSES, INPUT, Arch, Builder

_REGISTRY: dict[str, Callable[..., Arch]] = {}


def register(name: str):
  def deco(fn):
    _REGISTRY[name.lower()] = fn
    return fn
  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)


def get_arch(name: str, num_classes: int, widths: Mapping[str, int] | None = None,
             **kw) -> Arch:
  """Builds a named architecture.

  Args:
    name: a zoo name, any case (``resnet20/32/56/110``, ``resnet8``/``resnet_tiny``, ``vgg19``,
      ``resnet50``, ``resnet26``, ``resnet18/34``), a reference name (``VGG19``), or
      ``"package.module:factory"``: a flax module traced by
      :func:`metaprune_jax.nets.trace.arch_from_factory`.
    num_classes: number of classes.
    widths: optional per-space widths (see the module docstring).
    **kw: builder options (``width_mult`` for CIFAR ResNets, ``input_size`` for VGG).

  Returns:
    The validated :class:`Arch`; fresh variables for it come from ``init_variables``, and the
    network maps ``[B, H, W, 3]`` NHWC images to ``[B, num_classes]`` logits.

  Raises:
    ValueError: unknown name (the message lists the known ones) or widths that do not fit.
  """
  if ":" in name:  # "package.module:factory": a flax module, traced (metaprune_jax.nets.trace)
    from metaprune_jax.nets import trace  # pylint: disable=g-import-not-at-top
    arch = trace.arch_from_factory(name, num_classes, **kw)
    return (arch.with_widths(widths) if widths else arch).validate()
  key = name.lower()
  if key not in _REGISTRY:
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(names())}")
  arch = _REGISTRY[key](num_classes=num_classes, **kw)
  if widths:
    arch = arch.with_widths(widths)
  return arch.validate()


# --------------------------------------------------------------------------------------------
def cifar_resnet(depth: int, num_classes: int, width_mult: float = 1.0,
                 base=(16, 32, 64), name=None, ref_name=None) -> Arch:
  """CIFAR ResNet with basic blocks (He et al. 2016, section 4.2): depth = 6n + 2."""
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
  n = (depth - 2) // 6
  planes = [max(1, int(round(p * width_mult))) for p in base]
  b = Builder()
  b.space(INPUT, 3)
  s = b.space("s1", planes[0])
  x = b.conv("x", "conv1", INPUT, s, 3)
  x = b.bn(x, "bn1", s)
  x = b.relu(x, counted=True)
  for i in range(3):
    stage = b.space(f"s{i + 1}", planes[i])
    for j in range(n):
      p = f"layer{i + 1}.{j}"
      stride = 2 if (i > 0 and j == 0) else 1
      inner = b.space(f"{p}.conv1", planes[i])
      y = b.conv(x, f"{p}.conv1", s, inner, 3, stride)
      y = b.bn(y, f"{p}.bn1", inner)
      y = b.relu(y, counted=True)
      y = b.conv(y, f"{p}.conv2", inner, stage, 3)
      y = b.bn(y, f"{p}.bn2", stage)
      if s != stage:
        sc = b.conv(x, f"{p}.downsample.0", s, stage, 1, stride, 0, shortcut=True)
        sc = b.bn(sc, f"{p}.downsample.1", stage, shortcut=True)
      else:
        sc = x
      x = b.relu(b.add(y, sc), counted=False)
      s = stage
  x = b.gap(x)
  b.space(CLASSES, num_classes)
  b.dense(x, "fc", s, CLASSES)
  return b.build(name=name or f"resnet{depth}", ref_name=ref_name or f"resnet{depth}",
                 num_classes=num_classes, node_style="resnet", edge_style="single",
                 init="resnet")


for _d in (8, 14, 20, 32, 44, 56, 110):
  register(f"resnet{_d}")(lambda num_classes, _d=_d, **kw: cifar_resnet(_d, num_classes, **kw))


@register("resnet_tiny")
def resnet_tiny(num_classes: int, width_mult: float = 0.5) -> Arch:
  """A 3-block CIFAR ResNet (ResNet-8) at half width: tests and the digits default."""
  return cifar_resnet(8, num_classes, width_mult, name="resnet_tiny", ref_name="resnet8")


# --------------------------------------------------------------------------------------------
VGG19_CFG = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


@register("vgg19")
def vgg19(num_classes: int, input_size: int = 32, cfg=VGG19_CFG) -> Arch:
  """VGG-19 with BatchNorm for CIFAR (RepDistiller layout, as the reference)."""
  b = Builder()
  s = b.space(INPUT, 3)
  x = "x"
  for bi, block in enumerate(cfg):
    for j, width in enumerate(block):
      out = b.space(f"block{bi}.{3 * j}", width)
      x = b.conv(x, f"block{bi}.{3 * j}", s, out, 3, 1, 1, bias=True)
      x = b.bn(x, f"block{bi}.{3 * j + 1}", out)
      x = b.relu(x, counted=j < len(block) - 1)  # the block's last ReLU is functional
      s = out
    if bi < 3 or (bi == 3 and input_size == 64):
      x = b.maxpool(x, 2, 2)
  x = b.gap(x)
  b.space(CLASSES, num_classes)
  b.dense(x, "classifier", s, CLASSES)
  return b.build(name="vgg19", ref_name="VGG19", num_classes=num_classes, node_style="vgg",
                 edge_style="single", init="vgg")


# --------------------------------------------------------------------------------------------
def bottleneck_resnet(blocks, num_classes: int, name: str, ref_name: str,
                      width_mult: float = 1.0) -> Arch:
  """torchvision-layout bottleneck ResNet (v1.5: stride in the 3x3), a projection shortcut in
  the first block of every stage (the reference's ``MyResNetDeep``)."""
  planes = [max(1, int(round(p * width_mult))) for p in (64, 128, 256, 512)]
  b = Builder()
  b.space(INPUT, 3)
  s = b.space("stem", planes[0])
  x = b.conv("x", "conv1", INPUT, s, 7, 2, 3)
  x = b.bn(x, "bn1", s)
  x = b.relu(x, counted=True)
  x = b.maxpool(x, 3, 2, 1)
  for i, nb in enumerate(blocks):
    stage = b.space(f"s{i + 1}", planes[i] * 4)
    for j in range(nb):
      p = f"layer{i + 1}.{j}"
      stride = 2 if (i > 0 and j == 0) else 1
      c1 = b.space(f"{p}.conv1", planes[i])
      c2 = b.space(f"{p}.conv2", planes[i])
      y = b.relu(b.bn(b.conv(x, f"{p}.conv1", s, c1, 1, 1, 0), f"{p}.bn1", c1), True)
      y = b.relu(b.bn(b.conv(y, f"{p}.conv2", c1, c2, 3, stride, 1), f"{p}.bn2", c2), True)
      y = b.bn(b.conv(y, f"{p}.conv3", c2, stage, 1, 1, 0), f"{p}.bn3", stage)
      if j == 0:
        sc = b.conv(x, f"{p}.downsample.0", s, stage, 1, stride, 0, shortcut=True)
        sc = b.bn(sc, f"{p}.downsample.1", stage, shortcut=True)
      else:
        sc = x
      x = b.relu(b.add(y, sc), counted=True)
      s = stage
  x = b.gap(x)
  b.space(CLASSES, num_classes)
  b.dense(x, "fc", s, CLASSES)
  return b.build(name=name, ref_name=ref_name, num_classes=num_classes, node_style="resnet",
                 edge_style="multi", init="resnet")


@register("resnet50")
def resnet50(num_classes: int = 1000, width_mult: float = 1.0) -> Arch:
  return bottleneck_resnet((3, 4, 6, 3), num_classes, "resnet50", "resnet50", width_mult)


@register("resnet26")
def resnet26(num_classes: int = 10, width_mult: float = 1.0) -> Arch:
  return bottleneck_resnet((2, 2, 2, 2), num_classes, "resnet26", "resnet26", width_mult)


# --------------------------------------------------------------------------------------------
# Traced from a plain flax.linen module (metaprune_jax.nets.flax_resnet), not written op by op.
def _traced_resnet(name):
  def build(num_classes: int = 1000, width_mult: float = 1.0) -> Arch:
    from metaprune_jax.nets import flax_resnet  # pylint: disable=g-import-not-at-top
    return flax_resnet.traced_arch(name, num_classes, width_mult)
  build.__doc__ = f"torchvision {name} (basic blocks), traced from flax_resnet.ResNet."
  return build


for _n in ("resnet18", "resnet34"):
  register(_n)(_traced_resnet(_n))
