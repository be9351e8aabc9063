"""The elementwise activations an :class:`~metaprune_jax.nets.arch.Arch` can run (``Op("act")``).

An activation here is a function of one activation tensor, applied to every element alike, with
``f(0) = 0``: channel-wise, so it leaves channel spaces as they are, and a pruned (zeroed)
channel stays zero through it, so the masked network still computes what the materialised one
computes. ``sigmoid`` and ``softplus`` (``f(0) != 0``) are therefore not activations of the Arch.

The registry maps a name (what ``Op.fn`` stores, JSON-serialisable) to the function, its
optional scalar parameter (``Op.alpha``: the negative slope of ``leaky_relu``, the ``alpha`` of
``elu``/``celu``) and whether Torch-Pruning's MAC counter counts it. Torch-Pruning's counter
(ptflops' module table) counts ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``, ``nn.ELU`` and
``nn.PReLU`` modules as ``numel(output)`` and every other activation module (GELU, SiLU, Tanh,
Hardtanh, Hardswish, CELU, SELU, Mish) as 0; :mod:`metaprune_jax.nets.macs` follows that:
``relu6``, ``leaky_relu`` and ``elu`` count like ``relu`` (only when the trace's ``count_relu``
is on), the rest count 0.

:func:`identify` names the activation a traced elementwise program computes, from its values on
a grid of probe points (the tracer never trusts a function's name alone).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Activation:
  """``fn(x, alpha)``; ``estimate(x, y)`` -> alpha from probe values (None: no parameter)."""

  fn: Callable
  estimate: Callable | None = None
  torch_counted: bool = False


def _elu_alpha(x, y):
  i = int(np.argmin(x))  # f(x) = alpha * (e^x - 1) for x < 0
  return float(y[i] / np.expm1(x[i]))


def _celu_alpha(x, y):
  i = int(np.argmin(x))  # f(x) = alpha * (e^(x / alpha) - 1): a fixed point from -f(x)
  alpha = -float(y[i])
  for _ in range(50):
    if not alpha > 0:
      return float("nan")
    alpha = -float(y[i]) / -float(np.expm1(float(x[i]) / alpha))
  return alpha


def _leaky_alpha(x, y):
  i = int(np.argmin(np.abs(x + 1.0)))  # f(-1) = -alpha
  return float(y[i] / x[i])


REGISTRY: dict[str, Activation] = {
    "relu": Activation(lambda x, a: jax.nn.relu(x), torch_counted=True),
    "relu6": Activation(lambda x, a: jax.nn.relu6(x), torch_counted=True),
    "leaky_relu": Activation(lambda x, a: jax.nn.leaky_relu(x, a), _leaky_alpha, True),
    "elu": Activation(lambda x, a: jax.nn.elu(x, a), _elu_alpha, True),
    "gelu": Activation(lambda x, a: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": Activation(lambda x, a: jax.nn.gelu(x, approximate=True)),
    "silu": Activation(lambda x, a: jax.nn.silu(x)),
    "tanh": Activation(lambda x, a: jnp.tanh(x)),
    "hard_tanh": Activation(lambda x, a: jax.nn.hard_tanh(x)),
    "hard_silu": Activation(lambda x, a: jax.nn.hard_silu(x)),
    "celu": Activation(lambda x, a: jax.nn.celu(x, a), _celu_alpha),
    "selu": Activation(lambda x, a: jax.nn.selu(x)),
    "mish": Activation(lambda x, a: jax.nn.mish(x)),
}


def apply(name: str, alpha: float, x: jax.Array) -> jax.Array:
  """``REGISTRY[name].fn(x, alpha)``; an unknown name raises ValueError."""
  try:
    act = REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(REGISTRY)}") from None
  return act.fn(x, alpha)


def probe_points() -> np.ndarray:
  """The float32 points :func:`identify` compares functions on: [-8, 8] in steps of 1/128."""
  return np.linspace(-8.0, 8.0, 2049, dtype=np.float32)


def identify(x: np.ndarray, y: np.ndarray, rtol: float = 1e-5) -> tuple[str, float] | None:
  """``(name, alpha)`` of the registered activation with ``f(x) == y`` (within ``rtol``), or None.

  The first match in registry order wins (``celu`` with alpha 1 is ``elu``; ``leaky_relu`` with
  slope 0 is ``relu``).
  """
  x = np.asarray(x, np.float32).ravel()
  y = np.asarray(y).ravel()
  if y.dtype.kind != "f" or y.shape != x.shape or not np.all(np.isfinite(y)):
    return None
  y = y.astype(np.float64)
  for name, act in REGISTRY.items():
    alpha = float(round(act.estimate(x, y), 6)) if act.estimate else 0.0  # short, JSON
    if not np.isfinite(alpha) or abs(alpha) > 1e6:
      continue
    ref = np.asarray(act.fn(jnp.asarray(x), jnp.float32(alpha)), np.float64)
    if np.all(np.abs(y - ref) <= rtol * (1.0 + np.abs(ref))):
      return name, alpha
  return None
