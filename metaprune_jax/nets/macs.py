"""MACs and parameter counts, counted as Torch-Pruning's ``count_ops_and_params`` counts them.

Rules (docs/design.md section 6): conv ``k*k*Cin*Cout*Hout*Wout`` (+ ``Cout*Hout*Wout`` with bias);
dense ``in*out + out``; BatchNorm ``2*numel(input)``; each ``nn.ReLU`` *module* call
``numel(output)`` (functional relus, residual adds and reshapes count 0), and so each
``nn.ReLU6``/``nn.LeakyReLU``/``nn.ELU`` module (an ``act`` op with ``counted``); other
activations (GELU, SiLU, Tanh, ...) count 0, as Torch-Pruning's counter has no rule for them
(:mod:`metaprune_jax.nets.activations`); pooling, max or average, ``numel(input)``. Output sizes
follow each conv's and pool's padding, per side.

Both counts are polynomials of degree <= 2 in the channel widths: a sum of terms
``coef * n[a] * n[b]``. :func:`count_terms` returns those terms once per architecture and input
size, so the MACs of any set of kept-channel counts is a tiny jittable dot product
(:func:`macs_of_counts`), which is what the pruning search evaluates at every step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from metaprune_jax.nets.arch import Arch, pad_pairs


class CountTerms(NamedTuple):
  """``total = sum(coef * w[a] * w[b])`` with ``w[-1] = 1``; spaces indexed as ``arch.spaces``.

  Fields: ``coef [T] float64``, ``a [T] int32``, ``b [T] int32`` (``-1`` = constant 1).
  """

  coef: np.ndarray
  a: np.ndarray
  b: np.ndarray

  def evaluate(self, widths: Sequence[float]) -> float:
    w = np.append(np.asarray(widths, np.float64), 1.0)
    return float(np.sum(self.coef * w[self.a] * w[self.b]))


def _out_size(h, k, s, pad):
  lo, hi = pad
  return (h + lo + hi - k) // s + 1


@functools.lru_cache(maxsize=256)
def count_terms(arch: Arch, input_shape: tuple) -> tuple[CountTerms, CountTerms]:
  """``(mac_terms, param_terms)`` for ``arch`` on an NCHW ``input_shape`` (batch 1 counted).

  The structure (not the widths) decides the terms, but ``arch`` carries widths, so terms are
  cached per arch; evaluate them at other widths with :meth:`CountTerms.evaluate` or
  :func:`macs_of_counts`.
  """
  if len(input_shape) != 4:
    raise ValueError(f"input_shape must be NCHW, got {input_shape}")
  n_batch, _, h0, w0 = (int(v) for v in input_shape)
  sid = {s: i for i, s in enumerate(arch.spaces)}
  layers = arch.layer_map
  macs, params = [], []
  hw = {"x": (h0, w0)}
  space = {"x": sid["input"]}
  for op in arch.ops:
    h, w = hw[op.inputs[0]]
    s_in = space[op.inputs[0]]
    if op.op == "conv":
      l = layers[op.layer]
      ph, pw = pad_pairs(l.padding)
      ho, wo = _out_size(h, l.kernel, l.stride, ph), _out_size(w, l.kernel, l.stride, pw)
      o = sid[l.out_space]
      macs.append((l.kernel * l.kernel * ho * wo * n_batch, sid[l.in_space], o))
      params.append((l.kernel * l.kernel, sid[l.in_space], o))
      if l.bias:
        macs.append((ho * wo * n_batch, o, -1))
        params.append((1, o, -1))
      hw[op.output], space[op.output] = (ho, wo), o
    elif op.op == "bn":
      macs.append((2 * h * w * n_batch, s_in, -1))
      params.append((2, s_in, -1))
      hw[op.output], space[op.output] = (h, w), s_in
    elif op.op == "dense":
      l = layers[op.layer]
      o = sid[l.out_space]
      macs.append((n_batch, sid[l.in_space], o))
      params.append((1, sid[l.in_space], o))
      if l.bias:
        macs.append((n_batch, o, -1))
        params.append((1, o, -1))
      hw[op.output], space[op.output] = (1, 1), o
    elif op.op in ("relu", "act"):
      if op.counted:
        macs.append((h * w * n_batch, s_in, -1))
      hw[op.output], space[op.output] = (h, w), s_in
    elif op.op in ("maxpool", "avgpool"):
      macs.append((h * w * n_batch, s_in, -1))
      ph, pw = pad_pairs(op.padding)
      hw[op.output] = (_out_size(h, op.window, op.stride, ph),
                       _out_size(w, op.window, op.stride, pw))
      space[op.output] = s_in
    elif op.op == "gap":
      macs.append((h * w * n_batch, s_in, -1))
      hw[op.output], space[op.output] = (1, 1), s_in
    elif op.op == "flatten":  # a reshape of a 1x1 map: no arithmetic (Torch-Pruning: 0)
      hw[op.output], space[op.output] = (1, 1), s_in
    elif op.op == "add":
      hw[op.output], space[op.output] = (h, w), s_in
    else:
      raise ValueError(f"unknown op {op.op!r}")
    if min(hw[op.output]) < 1:
      raise ValueError(f"{arch.name}: input {input_shape} too small: {op.op} -> {op.output} "
                       f"has spatial size {hw[op.output]}")

  def pack(terms):
    c, a, b = zip(*terms)
    return CountTerms(np.array(c, np.float64), np.array(a, np.int32), np.array(b, np.int32))
  return pack(macs), pack(params)


def count_macs(arch: Arch, input_shape=(1, 3, 32, 32)) -> tuple[int, int]:
  """``(macs, params)`` of ``arch`` as Python ints; ``input_shape`` NCHW, e.g. (1, 3, 32, 32).

  Args:
    arch: the architecture, counted at its widths.
    input_shape: ``(N, C, H, W)``; the MACs scale with ``N``, the params do not.

  Returns:
    ``(macs, params)``: Python ints, counted by the module docstring's rules.

  Raises:
    ValueError: an ``input_shape`` that is not 4-long, one too small for the network (an op's
      output would have spatial size < 1), or an op the counter does not know.
  """
  mt, pt = count_terms(arch, tuple(int(v) for v in input_shape))
  w = [arch.width(s) for s in arch.spaces]
  return int(round(mt.evaluate(w))), int(round(pt.evaluate(w)))


def macs_of_counts(terms: CountTerms, counts):
  """MACs at per-space channel counts ``counts [num_spaces]`` (jnp, jittable, float32/64)."""
  counts = jnp.asarray(counts)
  w = jnp.concatenate([counts, jnp.ones((1,), counts.dtype)])
  return jnp.sum(jnp.asarray(terms.coef, counts.dtype) * w[terms.a] * w[terms.b])
