"""Inference forms of a network: BatchNorm folded into the convolutions.

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

The folded form is for inference and export only: it cannot be trained with BatchNorm again,
converted to a graph (the metanetwork's graphs have BatchNorm nodes) or named in the
reference's ``state_dict`` layout.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

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
