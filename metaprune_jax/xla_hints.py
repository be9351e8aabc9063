"""Exact identities that stop XLA from re-fusing (recomputing) a value into its consumers.

XLA fuses cheap elementwise producers into every consumer, duplicating them. That is usually a
win, but it turns quadratic when the producer is itself a long fused chain that several
expensive consumers read element by element. Two cases measured on XLA:CPU here:

* a ResNet's residual stream (BN, add, ReLU of every earlier block) was re-fused into each
  weight-gradient transpose: a ResNet-56 train step took 2.7 s instead of 1.6 s (batch 128);
* the cotangent of a flat parameter vector (a sum of ~170 padded slices) was re-fused into the
  gather that ``flat_from_graph``'s transpose performs: 0.31 s of a meta-training step.

``lax.optimization_barrier`` does not help there: XLA:CPU expands barriers before fusion. A
division is one of the ops XLA will not duplicate into consumers, and dividing by exactly 1.0
is exact, so :func:`materialize` (forward) and :func:`materialize_cotangent` (backward) change
no bit of any result. The 1.0s are computed from the data so that they cannot be constant-folded.

:func:`conv_compiler_options` is the third XLA:CPU finding: its YNNPACK library fusions run a
convolution on one thread, so on a 2-core CPU the convolutions it takes (every 3x3 layer of
ResNet-56's second and third stages) ran at half the speed of XLA's own multi-threaded ones.
The jitted functions that run networks (train/eval steps, the meta-training step) are compiled
without that one fusion type; YNNPACK keeps the reductions, dots and elementwise work, where it
is fast.

:func:`release_freed_memory` is the fourth: memory the XLA compiler frees stays in the
process (glibc keeps it for reuse), ~1 GB after compiling the ResNet-56 meta-training step,
so the first run's buffers came on top of it (3.8 GB peak instead of 2.8 GB).
:func:`compile_and_release` compiles a jitted function for its arguments (jax keeps the
executable for the calls that follow) and gives that memory back to the system before the
first run.
"""

import ctypes
import ctypes.util
import functools
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp

_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


# XLA:CPU's default YNNPACK fusion types in jaxlib 0.10.2 (INDIVIDUAL_DOT, REDUCE,
# INDIVIDUAL_CONVOLUTION) less the convolutions. Per-jit options take exact enum names (the
# '-name' form works in XLA_FLAGS only); with these, the compiled train step and metanetwork are
# the programs that XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
# gives (checked by comparing their optimised HLO).
_YNN_NO_CONV = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.cache
def _cpu_options_accepted(options: tuple) -> bool:
  """Whether this XLA accepts ``options`` (a tiny compile, once per process)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jnp.zeros((2,), jnp.float32)).compile()
    return True
  except Exception:  # pylint: disable=broad-except
    # A newer XLA without this option or enum value: keep its defaults.
    return False


def conv_compiler_options(devices: Iterable | None = None) -> dict:
  """``jax.jit(..., compiler_options=...)`` for a jitted function that runs convolutions.

  On CPU: XLA's multi-threaded convolutions instead of YNNPACK's single-threaded ones (YNNPACK
  keeps the dots and reductions); measured here on 2 cores, a ResNet-56 train step at batch
  128 went from ~75 to ~90 images/s and the ResNet-56 meta-training step from 6.3 to 5.3 s
  (``benchmarks/train_step.py``, ``benchmarks/meta_train.py``). Empty on other platforms, when
  ``XLA_FLAGS`` already sets that flag (the user's choice wins) and when this XLA does not know
  the option.

  Args:
    devices: the devices the function will run on (a mesh's ``devices.flat``); ``None``: the
      default backend's. Call it when jitting, not at import (it may initialise the backend).

  Returns:
    ``{option: value}``, possibly empty.
  """
  if _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
    return {}
  if devices is None:
    platform = jax.default_backend()
  else:
    platform = next(iter(devices)).platform
  options = ((_YNN_FLAG, _YNN_NO_CONV),)
  if platform != "cpu" or not _cpu_options_accepted(options):
    return {}
  return dict(options)


@functools.cache
def _libc():
  name = ctypes.util.find_library("c")
  try:
    lib = ctypes.CDLL(name) if name else None
  except OSError:
    lib = None
  return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> bool:
  """Gives the memory this process has freed back to the OS (glibc ``malloc_trim(0)``).

  Returns:
    Whether it could (False without glibc, e.g. on macOS: nothing to do there).
  """
  lib = _libc()
  if lib is None:
    return False
  lib.malloc_trim(0)
  return True


def compile_and_release(jitted, *args: Any) -> None:
  """Compiles ``jitted`` (a ``jax.jit`` function) for ``args``, then releases freed memory.

  Later calls with arguments of the same shapes and shardings reuse this compilation (jax's
  cache), so the compiler's temporary memory is gone before the first run allocates its own
  buffers. Nothing runs; donated arguments stay valid.
  """
  jitted.lower(*args).compile()
  release_freed_memory()


def _ones_like(x: jax.Array) -> jax.Array:
  """Exactly 1.0 everywhere, computed elementwise from ``x`` so that it cannot be folded.

  Full-shape on purpose: XLA rewrites a division by a broadcast scalar into a multiplication,
  which it does duplicate. ``nan_to_num`` keeps it 1.0 whatever ``x`` holds.
  """
  x = jax.lax.stop_gradient(x)
  return 1 + 0 * jnp.nan_to_num(x, nan=0, posinf=0, neginf=0)


def materialize(y: jax.Array) -> jax.Array:
  """``y``, bit for bit, computed once instead of being re-fused into its consumers.

  Its cotangent is divided the same way (so it is materialised too).
  """
  return y / _ones_like(y)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """The identity; its cotangent is computed once instead of being re-fused downstream."""
  return x


def _mc_fwd(x):
  return x, x


def _mc_bwd(x, ct):
  return (ct / _ones_like(x).astype(ct.dtype),)


materialize_cotangent.defvjp(_mc_fwd, _mc_bwd)
