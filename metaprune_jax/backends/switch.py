"""The backend-tuning switch: whether the XLA:CPU settings (``backends/xla_hints.py``) apply.

Its mode comes from ``METAPRUNE_JAX_BACKEND_TUNING`` (read when a program is traced) or, inside a
``with backend_tuning(mode):`` block, from that block: ``auto`` (the default: the CPU settings
where the backend is the CPU), ``none`` (plain JAX everywhere) or ``cpu`` (the traced settings
on every backend, to measure them elsewhere). ``xla_hints`` and ``cpu_kernels`` both ask it.
"""

import contextlib
import os
from typing import Iterator

import jax

from metaprune_jax.backends import host_memory

TUNING_ENV = host_memory.TUNING_ENV  # "METAPRUNE_JAX_BACKEND_TUNING"
TUNING_MODES = host_memory.TUNING_MODES  # ("auto", "cpu", "none")
_override: list = []  # the innermost ``backend_tuning`` block's mode, if any


def tuning_mode() -> str:
  """The backend-tuning mode in force: ``'auto'``, ``'cpu'`` or ``'none'`` (module docstring).

  Raises:
    ValueError: ``METAPRUNE_JAX_BACKEND_TUNING`` holds another value (named in the message).
  """
  if _override:
    return _override[-1]
  return host_memory.tuning_env_mode(os.environ)


def cpu_tuning(platform: str | None = None) -> bool:
  """Whether the XLA:CPU settings apply to a program for ``platform``.

  Args:
    platform: ``'cpu'``, ``'gpu'``, ``'tpu'``, ...; ``None``: ``jax.default_backend()``. Call it
      when tracing or jitting, not at import (it may initialise the backend).

  Returns:
    ``True`` in mode ``'cpu'``, ``False`` in mode ``'none'``; in mode ``'auto'``, whether the
    platform is ``'cpu'`` (:func:`tuning_mode`).

  Raises:
    ValueError: ``METAPRUNE_JAX_BACKEND_TUNING`` holds an unknown value (outside a
      :func:`backend_tuning` block).
  """
  mode = tuning_mode()
  if mode != "auto":
    return mode == "cpu"
  return (platform or jax.default_backend()) == "cpu"


@contextlib.contextmanager
def backend_tuning(mode: str, clear_caches: bool = True) -> Iterator[None]:
  """Runs a block with the backend-tuning ``mode`` (``'auto'``, ``'cpu'`` or ``'none'``).

  Clears jax's tracing and compilation caches on entry and exit: the choice is made when a
  function is traced, and a jitted function traced under another mode would be reused.

  Args:
    mode: ``'auto'`` (the CPU settings where the backend is the CPU), ``'cpu'`` (on every
      backend) or ``'none'`` (plain JAX); it overrides ``METAPRUNE_JAX_BACKEND_TUNING`` inside
      the block (blocks nest).
    clear_caches: False only where nothing traced in the block is cached (``make_jaxpr`` of a
      function without inner ``jax.jit``, as the Flax tracer does): the process keeps its
      compiled functions.

  Yields:
    None.

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in TUNING_MODES:
    raise ValueError(f"unknown backend tuning mode {mode!r}; choose from {TUNING_MODES}")
  if clear_caches:
    jax.clear_caches()
  _override.append(mode)
  try:
    yield
  finally:
    _override.pop()
    if clear_caches:
      jax.clear_caches()

