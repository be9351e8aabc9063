"""The one declarative description of a CNN: layers, channel spaces, wiring.

An :class:`Arch` is the single place where a network's layers, kernel sizes, strides,
BatchNorms, residual joins and channel widths are written. Everything else is derived from it:
the Flax model (:mod:`metaprune_jax.nets.cnn`), the network <-> graph bijection
(:mod:`metaprune_jax.graphs.graph`), MAC/parameter counts (:mod:`metaprune_jax.nets.macs`), the pruning
groups (:mod:`metaprune_jax.prune.groups`) and the reference (PyTorch) key names
(:mod:`metaprune_jax.nets.reference`).

Vocabulary.

* A **space** is a set of interchangeable channels: every axis of every tensor that carries the
  same channels names the same space (the "group id" of a universal neural functional's
  permutation spec). A residual addition forces its operands into one space; pruning a channel
  of a space removes it from every layer that reads or writes that space. The spaces ``"input"``
  (image channels) and ``"classes"`` (logits) are never pruned.
* A **layer** owns parameters: a ``conv`` (kernel HWIO ``[k, k, in, out]``, optional bias), a
  ``bn`` (scale, bias; running mean/var in ``batch_stats``) or a ``dense`` (kernel ``[in, out]``,
  bias). ``ref`` is its module name in the reference PyTorch implementation.
* An **op** is one step of the forward pass over named tensors (``x`` is the image). Ops are
  listed in the network's execution order, which is also the graph's "network order".
  ``add(a, b)`` is a residual join: ``a`` is the main branch, ``b`` the shortcut (an identity
  tensor, or the output of a ``shortcut`` conv and its BN).

Arch objects are frozen and hashable, so they serve as ``jax.jit`` static arguments and as
cache keys for the index arithmetic derived from them. Widths live in ``widths`` (one int per
space); ``with_widths`` gives the same network at other widths.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np

INPUT = "input"
CLASSES = "classes"


@dataclasses.dataclass(frozen=True)
class Layer:
  """A parameterised layer.

  Attributes:
    name: parameter-tree key (``variables['params'][name]``), e.g. ``"layer1_0_conv1"``.
    ref: the reference (PyTorch) module name, e.g. ``"layer1.0.conv1"``.
    kind: ``"conv"``, ``"bn"`` or ``"dense"``.
    in_space: channel space read (conv/dense); ``None`` for bn.
    out_space: channel space written (the normalised space for bn).
    kernel: square kernel size (conv).
    stride: conv stride.
    padding: zero padding (conv): an int ``p`` pads ``p`` on every side (PyTorch's
      ``padding=p``); ``((top, bottom), (left, right))`` when the sides differ (flax's
      ``padding='SAME'`` with a stride on an even input pads ``(0, 1)``). :func:`pad_pairs`
      reads either form; :func:`compact_padding` writes the int whenever it can.
    bias: whether the conv/dense has a bias.
    shortcut: a projection-shortcut (downsample) conv or its BN: it makes no graph nodes and
      writes into its block's output node set.
  """

  name: str
  ref: str
  kind: str
  in_space: str | None
  out_space: str
  kernel: int = 1
  stride: int = 1
  padding: int | tuple = 0
  bias: bool = False
  shortcut: bool = False


@dataclasses.dataclass(frozen=True)
class Op:
  """One forward step: ``output = op(*inputs)``.

  ``op`` is one of ``conv``, ``bn``, ``dense`` (``layer`` names the layer), ``relu`` (``counted``:
  an ``nn.ReLU`` module, counted by Torch-Pruning's MAC counter; functional relus are not),
  ``act`` (another elementwise activation: ``fn`` names it in
  :data:`metaprune_jax.nets.activations.REGISTRY`, ``alpha`` is its parameter, ``counted`` as
  for relu), ``add``, ``maxpool`` and ``avgpool`` (``window``, ``stride``, ``padding`` as a
  :class:`Layer`'s; avgpool divides by the window area, padding included, as flax's and
  PyTorch's defaults), ``gap`` (global average pool, the reference's
  AvgPool(8)/AdaptiveAvgPool((1, 1)) followed by a flatten) and ``flatten`` ([B, 1, 1, C] ->
  [B, C]: after a conv whose kernel covers the whole map, which is how a traced flatten of a
  spatial map into a dense layer is described).
  """

  op: str
  inputs: tuple[str, ...]
  output: str
  layer: str | None = None
  counted: bool = False
  window: int = 0
  stride: int = 0
  padding: int | tuple = 0
  fn: str = ""
  alpha: float = 0.0


_OP_KINDS = ("conv", "bn", "dense", "relu", "act", "add", "maxpool", "avgpool", "gap", "flatten")
_OP_DEFAULTS_LEFT_OUT = {"fn": "", "alpha": 0.0}  # not written to JSON: old files stay as they are


def pad_pairs(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """``((top, bottom), (left, right))`` of a :class:`Layer`'s or :class:`Op`'s ``padding``."""
  if isinstance(padding, (int, np.integer)):
    p = int(padding)
    return ((p, p), (p, p))
  (t, b), (l, r) = padding
  return ((int(t), int(b)), (int(l), int(r)))


def compact_padding(padding) -> int | tuple:
  """``p`` when ``padding`` pads ``p`` on every side, else its ``((top, bottom), (left,
  right))`` pairs (tuples: Arch objects stay hashable)."""
  pairs = pad_pairs(padding)
  if len({v for pair in pairs for v in pair}) == 1:
    return pairs[0][0]
  return pairs


@dataclasses.dataclass(frozen=True)
class Arch:
  """A CNN at given widths.

  Attributes:
    name: zoo name (``resnet56``, ``vgg19``, ``resnet50``, ...).
    ref_name: the reference's model name (``resnet56``, ``VGG19``, ``resnet50``).
    num_classes: number of logits.
    layers: parameterised layers in the reference's ``state_dict`` order.
    ops: forward ops in execution order.
    widths: ``((space, width), ...)``: channel count of every space, ``input`` and ``classes``
      included. Use :meth:`width` / :attr:`width_map`.
    node_style: ``"resnet"`` (8 node-feature columns: bn, downsample bn) or ``"vgg"`` (5: bn,
      conv bias), docs/design.md section 3; ``"full"`` (9: bn, downsample bn, conv/dense bias)
      for traced networks that need both.
    edge_style: ``"single"`` (every edge a 3x3 slice, 1x1 at the centre, dense identity blocks)
      or ``"multi"`` (edge kinds by kernel area, diagonal reversed identity edges).
    init: ``"resnet"`` (kaiming fan-out convs, PyTorch-default Linear) or ``"vgg"``
      (N(0, sqrt(2/(k*k*out))) convs with zero bias, N(0, 0.01) Linear with zero bias).
    origin: for a traced network (:func:`metaprune_jax.nets.trace.from_flax`), where each of our
      variable leaves lives in the user's tree: ``((collection, layer, leaf, user_path,
      shift), ...)``; ``user_path`` is a tuple of keys (empty: a leaf the user's module lacks)
      and ``shift`` a constant added to it (BatchNorm variances at another epsilon). Empty for
      the zoo; left out of :meth:`to_json` when empty.
  """

  name: str
  ref_name: str
  num_classes: int
  layers: tuple[Layer, ...]
  ops: tuple[Op, ...]
  widths: tuple[tuple[str, int], ...]
  node_style: str = "resnet"
  edge_style: str = "single"
  init: str = "resnet"
  origin: tuple = ()

  # An Arch is a static argument and a cache key everywhere (jit, lru_cache): its hash, a walk
  # over every layer and op, was ~1 ms of each ResNet-50 from_graph call. Computed once per
  # object; never pickled (str hashes differ between processes).
  def __hash__(self) -> int:
    h = self.__dict__.get("_hash")
    if h is None:
      h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
      object.__setattr__(self, "_hash", h)
    return h

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_hash", None)
    return state

  # ----------------------------------------------------------------------------------------
  @property
  def width_map(self) -> dict[str, int]:
    return dict(self.widths)

  def width(self, space: str) -> int:
    return self.width_map[space]

  @property
  def spaces(self) -> tuple[str, ...]:
    """All spaces in declaration order (``input`` first, ``classes`` last)."""
    return tuple(s for s, _ in self.widths)

  @property
  def prunable_spaces(self) -> tuple[str, ...]:
    return tuple(s for s in self.spaces if s not in (INPUT, CLASSES))

  @property
  def layer_map(self) -> dict[str, Layer]:
    return {l.name: l for l in self.layers}

  def layer(self, name: str) -> Layer:
    try:
      return self.layer_map[name]
    except KeyError:
      raise KeyError(f"{self.name}: no layer named {name!r}") from None

  @property
  def classifier(self) -> str:
    """Name of the classifier: the last layer writing the classes (a dense layer, or a conv
    covering a flattened map)."""
    return [l.name for l in self.layers if l.out_space == CLASSES][-1]

  def with_widths(self, widths: Mapping[str, int]) -> "Arch":
    """The same network with some spaces resized (unknown spaces raise)."""
    current = self.width_map
    for s, w in widths.items():
      if s not in current:
        raise ValueError(f"{self.name}: unknown channel space {s!r}; spaces are {list(current)}")
      if int(w) < 1:
        raise ValueError(f"{self.name}: space {s!r} must keep at least one channel, got {w}")
      if s in (INPUT, CLASSES) and int(w) != current[s]:
        raise ValueError(f"{self.name}: space {s!r} has fixed width {current[s]}, got {w}")
    new = tuple((s, int(widths.get(s, w))) for s, w in self.widths)
    return dataclasses.replace(self, widths=new)

  # ----------------------------------------------------------------------------------------
  def param_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{layer: {leaf: shape}}`` for ``params``; Flax layouts (HWIO, [in, out])."""
    w = self.width_map
    out = {}
    for l in self.layers:
      if l.kind == "conv":
        d = {"kernel": (l.kernel, l.kernel, w[l.in_space], w[l.out_space])}
        if l.bias:
          d["bias"] = (w[l.out_space],)
      elif l.kind == "bn":
        d = {"scale": (w[l.out_space],), "bias": (w[l.out_space],)}
      elif l.kind == "dense":
        d = {"kernel": (w[l.in_space], w[l.out_space])}
        if l.bias:
          d["bias"] = (w[l.out_space],)
      else:
        raise ValueError(f"unknown layer kind {l.kind!r}")
      out[l.name] = d
    return out

  def stat_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{bn layer: {"mean": (c,), "var": (c,)}}`` for ``batch_stats``."""
    w = self.width_map
    return {l.name: {"mean": (w[l.out_space],), "var": (w[l.out_space],)}
            for l in self.layers if l.kind == "bn"}

  # ----------------------------------------------------------------------------------------
  def validate(self) -> "Arch":
    """Checks wiring and widths; raises ValueError naming the op or layer."""
    w = self.width_map
    layers = self.layer_map
    if len(layers) != len(self.layers):
      raise ValueError(f"{self.name}: duplicate layer names")
    space_of = {"x": INPUT}
    for l in self.layers:
      if l.kind == "conv" and min(v for pair in pad_pairs(l.padding) for v in pair) < 0:
        raise ValueError(f"{self.name}: layer {l.ref} has negative padding {l.padding}")
    for op in self.ops:
      if op.op not in _OP_KINDS:
        raise ValueError(f"{self.name}: unknown op {op.op!r} -> {op.output}")
      if op.op == "act":
        from metaprune_jax.nets import activations  # pylint: disable=g-import-not-at-top
        if op.fn not in activations.REGISTRY:
          raise ValueError(f"{self.name}: act -> {op.output}: unknown activation {op.fn!r}; "
                           f"known: {sorted(activations.REGISTRY)}")
      for t in op.inputs:
        if t not in space_of:
          raise ValueError(f"{self.name}: op {op.op} -> {op.output} reads unknown tensor {t!r}")
      src = space_of[op.inputs[0]]
      if op.op in ("conv", "dense", "bn"):
        l = layers.get(op.layer)
        if l is None or l.kind != op.op:
          raise ValueError(f"{self.name}: op {op.op} refers to missing layer {op.layer!r}")
        expect = l.out_space if op.op == "bn" else l.in_space
        if src != expect:
          raise ValueError(f"{self.name}: layer {l.ref} expects input space {expect!r} "
                           f"(width {w.get(expect)}), got {src!r} (width {w.get(src)})")
        space_of[op.output] = l.out_space
      elif op.op == "add":
        other = space_of[op.inputs[1]]
        if src != other:
          raise ValueError(
              f"{self.name}: residual add -> {op.output} joins space {src!r} (width {w[src]}) "
              f"with {other!r} (width {w[other]}); residual operands must share one space")
        space_of[op.output] = src
      else:
        space_of[op.output] = src
    for s, n in self.widths:
      if n < 1:
        raise ValueError(f"{self.name}: space {s!r} has width {n}")
    return self

  # ----------------------------------------------------------------------------------------
  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    if not d["origin"]:
      del d["origin"]
    for o in d["ops"]:
      for k, v in _OP_DEFAULTS_LEFT_OUT.items():
        if o[k] == v:
          del o[k]
    return json.dumps(d)

  @classmethod
  def from_json(cls, text: str) -> "Arch":
    d = json.loads(text)
    d["layers"] = tuple(Layer(**{**l, "padding": compact_padding(l.get("padding", 0))})
                        for l in d["layers"])
    d["ops"] = tuple(Op(**{**o, "inputs": tuple(o["inputs"]),
                           "padding": compact_padding(o.get("padding", 0))}) for o in d["ops"])
    d["widths"] = tuple((s, int(n)) for s, n in d["widths"])
    d["origin"] = tuple((c, l, f, tuple(p), float(sh)) for c, l, f, p, sh in d.get("origin", ()))
    return cls(**d)


class Builder:
  """Small helper used by the zoo to write an Arch down: layers, ops and spaces in order."""

  def __init__(self):
    self.layers: list[Layer] = []
    self.ops: list[Op] = []
    self.widths: dict[str, int] = {}
    self._n = 0

  def space(self, name: str, width: int) -> str:
    if name not in self.widths:
      self.widths[name] = int(width)
    return name

  def _tmp(self) -> str:
    self._n += 1
    return f"t{self._n}"

  def conv(self, x, ref, in_space, out_space, kernel, stride=1, padding=None, bias=False,
           shortcut=False):
    name = ref.replace(".", "_")
    padding = (kernel // 2) if padding is None else compact_padding(padding)
    self.layers.append(Layer(name, ref, "conv", in_space, out_space, kernel, stride, padding,
                             bias, shortcut))
    y = self._tmp()
    self.ops.append(Op("conv", (x,), y, layer=name))
    return y

  def bn(self, x, ref, space, shortcut=False):
    name = ref.replace(".", "_")
    self.layers.append(Layer(name, ref, "bn", None, space, shortcut=shortcut))
    y = self._tmp()
    self.ops.append(Op("bn", (x,), y, layer=name))
    return y

  def dense(self, x, ref, in_space, out_space, bias=True):
    name = ref.replace(".", "_")
    self.layers.append(Layer(name, ref, "dense", in_space, out_space, bias=bias))
    y = self._tmp()
    self.ops.append(Op("dense", (x,), y, layer=name))
    return y

  def relu(self, x, counted):
    y = self._tmp()
    self.ops.append(Op("relu", (x,), y, counted=counted))
    return y

  def add(self, main, shortcut):
    y = self._tmp()
    self.ops.append(Op("add", (main, shortcut), y))
    return y

  def maxpool(self, x, window, stride, padding=0):
    y = self._tmp()
    self.ops.append(Op("maxpool", (x,), y, window=window, stride=stride,
                       padding=compact_padding(padding)))
    return y

  def avgpool(self, x, window, stride, padding=0):
    y = self._tmp()
    self.ops.append(Op("avgpool", (x,), y, window=window, stride=stride,
                       padding=compact_padding(padding)))
    return y

  def act(self, x, fn, alpha=0.0, counted=False):
    y = self._tmp()
    self.ops.append(Op("act", (x,), y, counted=counted, fn=fn, alpha=float(alpha)))
    return y

  def gap(self, x):
    y = self._tmp()
    self.ops.append(Op("gap", (x,), y))
    return y

  def build(self, **kw) -> Arch:
    return Arch(layers=tuple(self.layers), ops=tuple(self.ops),
                widths=tuple(self.widths.items()), **kw).validate()
