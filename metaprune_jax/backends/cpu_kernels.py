"""XLA:CPU custom kernels for the metanetwork's dense edge blocks (``csrc/grid_cpu.cc``).

On the CPU, a metanetwork layer's edge work over its dense block groups (``metanetwork.blocks``:
both passes' mean/std/max/min statistics, the edge update, each node's combination of its
blocks' partial statistics, and their backward) is memory-bound, and XLA's fusions stream each
group's ``[B, S, R, h]`` edge tensor and its full-size temporaries through memory many times per
layer, around many small per-block gathers and per-node reductions. XLA:CPU has no user-kernel
language (Pallas targets GPUs and TPUs), so this is C++ behind XLA's FFI: one call per layer
(:func:`layer_forward`, :func:`layer_backward`) over every grid group, one pass over the edges
forward and one backward, on XLA's own intra-op thread pool, in vectorised 8-row tiles (GCC
vector extensions) when h is a multiple of 16. One 25-block 64x64 group (hidden 64) runs at
about the speed of one XLA elementwise pass over its edges here (forward 6-7 ms against 5.7-7.6
ms for ``x * 1.5``; 2-core Intel VM, 2026-12-03).

The kernels are compiled on first use, on the machine that runs them (``g++ -O3
-march=native``, ~8 s), into a cache folder keyed by the source, the compiler command, jaxlib
and the CPU's feature flags (a home folder shared by different machines gets one build per
CPU kind): ``$METAPRUNE_JAX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/metaprune_jax`` or
``~/.cache/metaprune_jax``. A build is written under a temporary name and renamed into place,
so concurrent processes (test workers, hosts of one job) never load a partial file.

Everything else keeps XLA: the GPU/TPU path is the XLA path of ``metanetwork.blocks``, and so is
the CPU path when the kernels are off (``METAPRUNE_JAX_CPU_KERNELS=0``, or all XLA:CPU settings
off with ``METAPRUNE_JAX_BACKEND_TUNING=none``: see ``xla_hints``) or cannot be built (no
C++ compiler: one warning, then XLA). The two paths compute the same maths in float32 with
sums in different orders (tests check the kernels against a direct statement of the maths and
the XLA path). The kernels run vmapped (meta-training's lanes: every operand then has the lane
axes) and give every node the same bits whatever the lanes or threads around it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from metaprune_jax.backends import switch

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "grid_cpu.cc")
_CONV_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "conv_cpu.cc")
_CONV = "metaprune_conv_nhwc"
# narrow layers: the direct kernel wins where a layer reads at most CONV_MAX_IN channels
# (benchmarks/pruned_profile.py: 15 -> 7 at 32x32 2.5x faster than XLA, 9 -> 32 at 16x16 1.5x;
# 32 -> 9 and 64 -> 24 slower with the channel-vectorised path), up to the kernel's 64 output
# channels; and, with its pixel-vectorised path, where a layer writes at most CONV_PIXEL_MAX_OUT
# channels at stride 1 along x, whatever it reads (32 -> 8 at 16x16 1.4x, 64 -> 8 at 8x8 1.4x,
# 15 -> 7 at 32x32 4.4x faster than XLA)
CONV_MAX_IN = 16
CONV_MAX_OUT = 64
CONV_PIXEL_MAX_OUT = 16
# and for any width up to CONV_MAX_OUT that is not a multiple of 16 (a pruned network's odd
# widths: 16x16 32 -> 18 / 23, 18 / 23 -> 32 1.3-1.4x faster than XLA; at multiples of 16 XLA's
# convolutions are as fast or faster)
CONV_PIXEL_ODD = True
_LFWD, _LFWD_NO_COUNTS, _LBWD = ("metaprune_layer_fwd", "metaprune_layer_fwd_no_counts",
                                 "metaprune_layer_bwd")
_ENV_SWITCH = "METAPRUNE_JAX_CPU_KERNELS"


def _cache_dir() -> str:
  root = os.environ.get("METAPRUNE_JAX_KERNEL_CACHE")
  if not root:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "metaprune_jax")
  return os.path.abspath(root)


def _cpu_flags() -> str:
  """The CPU's feature flags (Linux); elsewhere, or without /proc, the processor's name."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("flags", "Features"))]
  except OSError:  # no /proc: the name is the best key there is
    lines = []
  return lines[0].split(":", 1)[1].strip() if lines else platform.processor()


def _compile_command(compiler: str, out: str, source: str = _SOURCE) -> list:
  return [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
          "-I", jax.ffi.include_dir(), source, "-o", out]


def build(compiler: str | None = None, source_path: str = _SOURCE) -> str:
  """Compiles the kernels (or finds the cached build); returns the shared library's path.

  Args:
    compiler: the C++ compiler (default ``$CXX`` or ``g++``).
    source_path: the kernels' source (``csrc/grid_cpu.cc``, or ``csrc/conv_cpu.cc``).

  Raises:
    RuntimeError: no C++ compiler, or the compiler failed (its output included).
  """
  compiler = compiler or os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  with open(source_path, "rb") as f:
    source = f.read()
  for header in sorted(glob.glob(os.path.join(os.path.dirname(source_path), "*.h"))):
    with open(header, "rb") as f:  # the headers it may include (csrc/parallel_for.h)
      source += b"\0" + f.read()
  key = hashlib.sha256(b"\0".join([
      source, " ".join(_compile_command(compiler, "OUT", source_path)).encode(),
      jaxlib.__version__.encode(), jax.__version__.encode(), platform.machine().encode(), _cpu_flags().encode(),
  ])).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(source_path))[0]
  folder = os.path.join(_cache_dir(), f"{stem}-{key}")
  path = os.path.join(folder, f"{stem}.so")
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  try:
    proc = subprocess.run(_compile_command(compiler, tmp, source_path), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"building {source_path} failed ({compiler}, exit {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _load(source_path: str, what: str):
  """The built library of ``source_path`` (ctypes), or None when switched off or unbuildable
  (logged once per caller: both callers are cached)."""
  if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
    return None
  try:
    return ctypes.cdll.LoadLibrary(build(source_path=source_path))
  except (RuntimeError, OSError) as e:
    logging.warning("metaprune_jax: %s unavailable, using XLA's: %s", what, e)
    return None


@functools.cache
def available() -> bool:
  """Whether the CPU kernels are built and registered (once per process; cached).

  False when ``METAPRUNE_JAX_CPU_KERNELS=0`` or when the build fails (logged once).
  """
  lib = _load(_SOURCE, "CPU edge kernels")
  if lib is None:
    return False
  for name, symbol in ((_LFWD, lib.MetapruneLayerFwd),
                       (_LFWD_NO_COUNTS, lib.MetapruneLayerFwdNoCounts),
                       (_LBWD, lib.MetapruneLayerBwd)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    jax.ffi.register_ffi_target_as_batch_partitionable(name)
  return True


@functools.cache
def conv_available() -> bool:
  """Whether the direct convolution kernel (``csrc/conv_cpu.cc``) is built and registered.

  False when ``METAPRUNE_JAX_CPU_KERNELS=0`` or when the build fails (logged once).
  """
  lib = _load(_CONV_SOURCE, "CPU convolution kernel")
  if lib is None:
    return False
  jax.ffi.register_ffi_target(_CONV, jax.ffi.pycapsule(lib.MetapruneConvNhwc), platform="cpu")
  return True


def conv_use_for(x, w, strides=(1, 1)) -> bool:
  """Whether :func:`conv_nhwc` runs the convolution of ``x`` [B, H, W, C] and ``w``
  [kh, kw, C, O] at ``strides`` here: the CPU backend with its settings on
  (``xla_hints.cpu_tuning``), float32, the kernel built, and a narrow layer (where XLA:CPU's
  convolution costs per pixel rather than per MAC): at most :data:`CONV_MAX_IN` input and
  :data:`CONV_MAX_OUT` output channels, or at most :data:`CONV_PIXEL_MAX_OUT` output channels or
  (:data:`CONV_PIXEL_ODD`) a width up to :data:`CONV_MAX_OUT` that is not a multiple of 16 (stride
  1 along x, rows at least 8 pixels wide: the kernel's pixel-vectorised path) with any input."""
  o = w.shape[-1]
  pixel = o <= CONV_PIXEL_MAX_OUT or (CONV_PIXEL_ODD and o % 16 != 0 and o <= CONV_MAX_OUT)
  narrow = ((w.shape[-2] <= CONV_MAX_IN and o <= CONV_MAX_OUT)
            or (pixel and CONV_PIXEL_PATH and strides[1] == 1 and x.shape[2] >= 8))
  return (jax.default_backend() == "cpu" and switch.cpu_tuning("cpu")
          and x.dtype == jnp.float32 and w.dtype == jnp.float32 and x.ndim == 4
          and narrow and conv_available())


# Whether conv_nhwc may take the kernel's pixel-vectorised path for at most CONV_PIXEL_MAX_OUT
# output channels (stride 1 along x, rows >= 8 pixels); read when a call is traced. The
# benchmarks flip it to time both paths.
CONV_PIXEL_PATH = True


def conv_nhwc(x, w, strides, padding, bias=None, residual=None, relu: bool = False):
  """``lax.conv_general_dilated(x, w, strides, padding, ('NHWC', 'HWIO', 'NHWC'))`` by the
  direct kernel (forward only; sums in another order: equal up to float rounding), with an
  optional epilogue in the same pass: ``+ bias``, ``+ residual``, ReLU.

  Args:
    x: [B, H, W, C] float32; w: [kh, kw, C, O] float32, O <= 64.
    strides: (sh, sw); padding: ((top, bottom), (left, right)), symmetric.
    bias: optional [O] float32.
    residual: optional [B, Ho, Wo, O] float32 (the output's shape).
    relu: apply ReLU last.
  """
  (pt, pb), (pl, pr) = padding
  if pt != pb or pl != pr:
    raise ValueError(f"conv_nhwc takes symmetric padding only, got {padding}")
  b, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  ho = (h + 2 * pt - kh) // strides[0] + 1
  wo = (wd + 2 * pl - kw) // strides[1] + 1
  if o > 64:
    raise ValueError(f"conv_nhwc takes at most 64 output channels, got {o}")
  out = jax.ShapeDtypeStruct((b, ho, wo, o), jnp.float32)
  empty = jnp.zeros((0,), jnp.float32)
  return jax.ffi.ffi_call(_CONV, out, vmap_method="sequential")(
      x, w, empty if bias is None else bias, empty if residual is None else residual,
      geom=np.asarray([strides[0], strides[1], pt, pl, int(bool(relu)),
                       CONV_PIXEL_MAX_OUT if CONV_PIXEL_PATH else 0,
                       int(CONV_PIXEL_PATH and CONV_PIXEL_ODD)],
                      np.int64))


def use_for(*arrays) -> bool:
  """Whether ``metanetwork.blocks`` runs its grid groups here: the kernels are available, the
  default backend is the CPU (a jit then compiles for the CPU; on a GPU/TPU host the XLA path
  runs), the XLA:CPU settings are on (``xla_hints.cpu_tuning``: not with
  ``METAPRUNE_JAX_BACKEND_TUNING=none``) and every operand is float32."""
  return (jax.default_backend() == "cpu" and switch.cpu_tuning("cpu")
          and all(a.dtype == jnp.float32 for a in arrays) and available())


def _check_f32(name, arrays):
  bad = [a.dtype for a in arrays if a.dtype != jnp.float32]
  if bad:
    raise TypeError(f"cpu_kernels.{name} takes float32 operands only, got {sorted(set(map(str, bad)))}")


def _offsets(s_starts, r_starts, es):
  """The kernels' ``offs`` attribute: per group, its blocks' S offsets then their R offsets."""
  if not (len(s_starts) == len(r_starts) == len(es)):
    raise ValueError("one S and one R offset list per edge tensor")
  parts = []
  for so, ro, e in zip(s_starts, r_starts, es):
    if len(so) != e.shape[-4] or len(ro) != e.shape[-4]:
      raise ValueError(f"{e.shape[-4]} blocks need as many S and R offsets, got {len(so)}, "
                       f"{len(ro)}")
    parts += [np.asarray(so, np.int64), np.asarray(ro, np.int64)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def layer_forward(a1, a3, a4, v, es, s_starts, r_starts, counts: bool = True):
  """One metanetwork layer's edge work over every grid group, statistics combined per node.

  Args:
    a1, a3, a4: [..., N, h] float32 node factors (``a1`` zero at invalid nodes).
    v: [..., N] float32 validity (> 0: valid; ones when nothing is masked).
    es: per group g, ``E_g`` [..., B_g, S_g, R_g, h] (block b's S rows are nodes
      ``s_starts[g][b] + s``, its R rows ``r_starts[g][b] + r``).
    s_starts, r_starts: static per-group sequences of B_g ints.
    counts: whether to count the max/min ties (the backward needs them).

  Returns:
    ``t1`` [..., 6, N, h]: at each node, over every message ``p1 = a1[S node] * E`` that reaches
    it as an R row (from valid S nodes): sum, sum of squares, max, min, and the number of
    messages attaining the max and the min (zeros without ``counts``); a node no block reaches
    as an R row gets (0, 0, -inf, +inf, 0, 0). ``t2`` [..., 6, N, h]: the same over the messages
    ``p2 = a1[R node] * E`` that reach each node as an S row. ``ens``: per group,
    ``E * (1 + a3_s a4_r + a3_r a4_s)``. Each node's statistics are combined across blocks in
    a fixed order: the same bits whatever the thread count.
  """
  es = tuple(es)
  _check_f32("layer_forward", (a1, a3, a4, v) + es)
  *lead, n, h = a1.shape
  t = jax.ShapeDtypeStruct(tuple(lead) + (6, n, h), jnp.float32)
  out = (t, t) + tuple(jax.ShapeDtypeStruct(e.shape, jnp.float32) for e in es)
  res = jax.ffi.ffi_call(_LFWD if counts else _LFWD_NO_COUNTS, out,
                         vmap_method="broadcast_all")(
      a1, a3, a4, v, *es, offs=_offsets(s_starts, r_starts, es))
  return res[0], res[1], tuple(res[2:])


def layer_backward(a1, a3, a4, v, n1, n2, es, ges, s_starts, r_starts):
  """Backward of :func:`layer_forward`.

  Args:
    a1, a3, a4, v, es, s_starts, r_starts: as :func:`layer_forward`.
    n1: [..., 6, N, h]: cotangents of ``t1``'s sum and sum of squares, ``t1``'s max and min,
      and their cotangents divided by the tie counts (max/min gradients are split evenly among
      a node's tied messages); n2: the same for ``t2``.
    ges: per group, the cotangent of ``ens[g]``.

  Returns:
    ``da`` [..., 3, N, h] (cotangents of a1, a3, a4) and the per-group ``dE`` tuple.
  """
  es, ges = tuple(es), tuple(ges)
  _check_f32("layer_backward", (a1, a3, a4, v, n1, n2) + es + ges)
  *lead, n, h = a1.shape
  out = (jax.ShapeDtypeStruct(tuple(lead) + (3, n, h), jnp.float32),) + tuple(
      jax.ShapeDtypeStruct(e.shape, jnp.float32) for e in es)
  res = jax.ffi.ffi_call(_LBWD, out, vmap_method="broadcast_all")(
      a1, a3, a4, v, n1, n2, *es, *ges, offs=_offsets(s_starts, r_starts, es))
  return res[0], tuple(res[1:])
