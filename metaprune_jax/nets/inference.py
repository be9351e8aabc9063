"""Inference forms of a network: BatchNorm folded into the convolutions, widths padded.

:func:`fold_batchnorm` rewrites a trained (typically materialised, pruned) network so that every
inference-mode BatchNorm becomes part of the convolution before it: ``bn(conv(x, W) + b)`` with
running statistics is ``conv(x, W * k) + (b - mean) * k + beta`` where
``k = scale / sqrt(var + eps)``, exactly up to float rounding. The folded network has the same
spaces and widths, its convolutions carry a bias, and it has no BatchNorm layers or ops; it runs
with :func:`metaprune_jax.nets.cnn.apply_model` (``train=False``) like any other network.

Why: on XLA:CPU a BatchNorm is a separate elementwise pass over the activations (XLA does not
fuse elementwise consumers into a convolution there), and a pruned network's narrow
convolutions are cheap enough that those passes are a large share of its time. See
``docs/xla_cpu_notes.md`` for the figures.

:func:`pad_channels` zero-pads a pruned network's odd widths up to a channel multiple (the same
function): on an H200 the ResNet-56 pruned to 2.31x fewer MACs ran 0.66-0.78x as fast as the
full network at its odd widths and 1.11x padded to multiples of 8 (batch 1024-8192).
:func:`inference_form` does both, padding as the backend wants
(``xla_hints.inference_channel_multiple``).

The folded form is for inference and export only: it cannot be trained with BatchNorm again,
converted to a graph (the metanetwork's graphs have BatchNorm nodes) or named in the
reference's ``state_dict`` layout.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from metaprune_jax.backends import xla_hints
from metaprune_jax.nets import cnn
from metaprune_jax.nets.arch import Arch


def fold_batchnorm(arch: Arch, variables: Mapping) -> tuple[Arch, dict]:
  """Folds every BatchNorm into the convolution that produces its input. Not jittable.

  Args:
    arch: the network (any widths; e.g. the output of ``materialize``).
    variables: ``{'params': ..., 'batch_stats': ...}`` at ``arch``'s widths.

  Returns:
    ``(folded_arch, folded_variables)``: ``folded_arch`` has no ``bn`` layers or ops and every
    conv that fed a BatchNorm has a bias; ``folded_variables`` is ``{'params': ...,
    'batch_stats': {}}``. ``apply_model(folded_arch, folded_variables, x)`` equals
    ``apply_model(arch, variables, x)`` (inference mode) up to float rounding.

  Raises:
    ValueError: a BatchNorm whose input is not the output of a convolution read by that
      BatchNorm alone (named in the message), or a network with no BatchNorm to fold.
  """
  producer = {}
  readers: dict[str, int] = {}
  for op in arch.ops:
    producer[op.output] = op
    for t in op.inputs:
      readers[t] = readers.get(t, 0) + 1
  layers = arch.layer_map
  bn_ops = [op for op in arch.ops if op.op == "bn"]
  if not bn_ops:
    raise ValueError(f"{arch.name}: fold_batchnorm found no BatchNorm after a convolution "
                     "(nothing to fold; is the network already folded?)")
  fold = {}  # conv layer name -> bn layer name
  rename = {}  # bn op output -> conv op output
  for op in bn_ops:
    src = producer.get(op.inputs[0])
    bn = layers[op.layer]
    if src is None or src.op != "conv":
      what = "the input image" if src is None else f"a {src.op} op ({src.output})"
      raise ValueError(f"{arch.name}: BatchNorm {bn.name} ({bn.ref}) reads {what}, not a "
                       "convolution's output; fold_batchnorm folds BatchNorm into the conv "
                       "before it only")
    if readers.get(src.output, 0) != 1:
      raise ValueError(f"{arch.name}: BatchNorm {bn.name} ({bn.ref}) reads conv "
                       f"{src.layer}'s output, which other ops read too; it cannot be folded")
    fold[src.layer] = bn.name
    rename[op.output] = src.output
  params = variables["params"]
  stats = variables["batch_stats"]
  new_params = {}
  new_layers = []
  for l in arch.layers:
    if l.kind == "bn":
      continue
    p = params[l.name]
    if l.name in fold:
      b = fold[l.name]
      scale = np.asarray(params[b]["scale"], np.float64)
      beta = np.asarray(params[b]["bias"], np.float64)
      mean = np.asarray(stats[b]["mean"], np.float64)
      var = np.asarray(stats[b]["var"], np.float64)
      k = scale / np.sqrt(var + cnn.BN_EPS)
      w = np.asarray(p["kernel"], np.float64) * k
      bias = np.asarray(p["bias"], np.float64) if l.bias else np.zeros_like(mean)
      new_params[l.name] = {"kernel": jnp.asarray(w, jnp.float32),
                            "bias": jnp.asarray((bias - mean) * k + beta, jnp.float32)}
      new_layers.append(dataclasses.replace(l, bias=True))
    else:
      new_params[l.name] = dict(p)
      new_layers.append(l)
  new_ops = []
  for op in arch.ops:
    if op.op == "bn":
      continue
    inputs = tuple(rename.get(t, t) for t in op.inputs)
    new_ops.append(dataclasses.replace(op, inputs=inputs))
  # the last op may have been a bn: keep the output name the model returns
  last = arch.ops[-1].output
  if last in rename:
    raise ValueError(f"{arch.name}: the network ends in a BatchNorm; nothing reads a folded "
                     "output")
  folded = dataclasses.replace(arch, layers=tuple(new_layers), ops=tuple(new_ops))
  return folded.validate(), {"params": new_params, "batch_stats": {}}


def pad_channels(arch: Arch, variables: Mapping, multiple: int) -> tuple[Arch, dict]:
  """Zero-pads every prunable channel space up to a multiple of ``multiple``. Not jittable.

  A pruned network keeps odd widths (a space of 13 channels, say). GPU convolution libraries run
  channel counts that are multiples of 8 on their fast (tensor-core) kernels and others on slow
  ones, so a pruned network can be slower than the full one there (``docs/performance.md``).
  Padding the widths back up to a multiple gives the same function at hardware-friendly shapes,
  without changing which channels were kept (unlike ``prune_to_target(..., round_to=)``, which
  changes the pruning decisions).

  The padded channels are exact zeros of the function: every convolution or dense layer gets
  zero kernel rows for padded inputs and zero kernel columns (and bias) for padded outputs, a
  BatchNorm gets scale 0, bias 0, mean 0 and var 1. Whatever elementwise ops (ReLU, other
  activations, residual adds) make of a padded channel, no layer that mixes channels reads it
  with a non-zero weight, so the outputs equal the unpadded network's up to float rounding.

  Args:
    arch: the network (typically ``materialize``'s output, folded or not).
    variables: ``{'params': ..., 'batch_stats': ...}`` at ``arch``'s widths.
    multiple: the channel multiple (a positive integer; 1 returns the network unchanged).

  Returns:
    ``(padded_arch, padded_variables)``: every prunable space of width ``C`` at
    ``ceil(C / multiple) * multiple``; the input and class spaces are unchanged.

  Raises:
    ValueError: ``multiple`` not a positive integer.
  """
  if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
    raise ValueError(f"pad_channels: multiple must be a positive integer, got {multiple!r}")
  multiple = int(multiple)
  widths = arch.width_map
  new_w = {s: -(-widths[s] // multiple) * multiple for s in arch.prunable_spaces}
  padded = arch.with_widths(new_w)
  pad = {s: new_w.get(s, w) - w for s, w in widths.items()}

  def grow(a, axes_spaces, fill=0.0):
    a = np.asarray(a)
    width = [(0, 0)] * a.ndim
    for axis, s in axes_spaces:
      width[axis] = (0, pad[s])
    return jnp.asarray(np.pad(a, width, constant_values=fill), a.dtype)
  params, stats = variables["params"], variables.get("batch_stats", {})
  out = {"params": {}, "batch_stats": {}}
  for l in arch.layers:
    p = params[l.name]
    if l.kind in ("conv", "dense"):
      axes = (2, 3) if l.kind == "conv" else (0, 1)
      q = {"kernel": grow(p["kernel"], ((axes[0], l.in_space), (axes[1], l.out_space)))}
      if "bias" in p:
        q["bias"] = grow(p["bias"], ((0, l.out_space),))
    else:
      q = {"scale": grow(p["scale"], ((0, l.out_space),)),
           "bias": grow(p["bias"], ((0, l.out_space),))}
      st = stats[l.name]
      out["batch_stats"][l.name] = {"mean": grow(st["mean"], ((0, l.out_space),)),
                                    "var": grow(st["var"], ((0, l.out_space),), fill=1.0)}
    out["params"][l.name] = q
  return padded.validate(), out


def inference_form(arch: Arch, variables: Mapping, multiple: int | None = None
                   ) -> tuple[Arch, dict]:
  """A trained network's fast inference form: BatchNorm folded, widths padded for the backend.

  :func:`fold_batchnorm` where there is a foldable BatchNorm (a network without one, or with a
  BatchNorm that does not follow a convolution, is kept as it is), then :func:`pad_channels`
  to ``multiple``. Not jittable.

  Args:
    arch: the network (e.g. ``materialize``'s or ``modes.prune.load_pruned``'s output).
    variables: ``{'params': ..., 'batch_stats': ...}`` at ``arch``'s widths.
    multiple: the channel multiple; ``None``: the default backend's
      (``xla_hints.inference_channel_multiple``: 8 on GPUs, where it was measured to pay, 1
      elsewhere).

  Returns:
    ``(arch, variables)`` computing ``apply_model(arch, variables, x)`` (inference mode) up to
    float rounding.
  """
  if multiple is None:
    multiple = xla_hints.inference_channel_multiple()
  try:
    arch, variables = fold_batchnorm(arch, variables)
  except ValueError:
    pass  # nothing foldable: the network as it is
  return pad_channels(arch, variables, multiple)
