"""The narrow-convolution kernel (``backends/csrc/conv_cpu.cc``) against other versions of its
source, interleaved in one process: for work on the kernel, where runs minutes apart on this VM
differ by more than the change being measured.

  python benchmarks/conv_kernel_ab.py --baseline=HEAD~1 [--variants=a.cc,b.cc] [--runs 15]

Each version (the working tree's source first, then ``--baseline``, a git revision's source,
then each ``--variants`` file) is compiled like the library's build (``g++ -O3 -march=native``)
and registered as its own XLA FFI target; every convolution below runs through each, with the
bias, ReLU and (where the output keeps the stream's width) the residual epilogue, as a folded
network calls it. Prints JSON: per convolution ``"HxW C->O"``, each version's median ms and the
first version's speed-up over it (``speed_up_of_first``); ``max_abs_diff`` between each version's output and the first's (the
versions must compute the same convolution); and ``resnet56``: the full ResNet-56 and the one
pruned to 2.3x fewer MACs (as ``benchmarks/pruning.py`` makes them: BatchNorm folded, the
library's compiler options), batch ``--batch``, each compiled with each version's kernel, all
interleaved: ms and the pruned network's speed-up per version (``pruning.py``'s
``wall_clock_speed_up`` for that version). Only a CPU with the kernel's compiler.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

import metaprune_jax as mp
from metaprune_jax.backends import cpu_kernels
from metaprune_jax.backends import xla_hints
from metaprune_jax.nets import inference
from _timing import interleaved as _interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "metaprune_jax", "backends", "csrc")
SOURCE = os.path.join(CSRC, "conv_cpu.cc")
# (H = W, C, O, residual): the pruned ResNet-56's kinds of 3x3 convolutions (stage 1 at 32x32
# reading or writing the 15-channel stream, stage 2 at 16x16, stage 3 at 8x8), a full one, and
# the main job's
_CONVS = ((32, 15, 1, False), (32, 15, 2, False), (32, 15, 3, False), (32, 15, 5, False),
          (32, 15, 7, False), (32, 15, 9, False), (32, 1, 15, True), (32, 5, 15, True),
          (32, 16, 16, True), (16, 32, 1, False), (16, 32, 6, False), (16, 32, 9, False),
          (16, 32, 18, False), (8, 64, 24, False), (8, 64, 3, False),
          # the main job's pruned resnet8 at 8x8 (digits): a 10-channel stream, inner width 4
          (8, 10, 4, False), (8, 4, 10, True))


def _build(source: str, tag: str, tmp: str) -> str:
  """Compiles ``source`` into a library registered as FFI target ``conv_ab_<tag>``."""
  out = os.path.join(tmp, f"{tag}.so")
  cmd = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-I", jax.ffi.include_dir(), "-I", CSRC, source, "-o", out]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"building {source} failed:\n{proc.stderr[-3000:]}")
  lib = ctypes.cdll.LoadLibrary(out)
  jax.ffi.register_ffi_target(f"conv_ab_{tag}", jax.ffi.pycapsule(lib.MetapruneConvNhwc),
                              platform="cpu")
  return f"conv_ab_{tag}"


def _conv(target, x, w, bias, res):
  b, h, wd, _ = x.shape
  out = jax.ShapeDtypeStruct((b, h, wd, w.shape[-1]), jnp.float32)
  empty = jnp.zeros((0,), jnp.float32)
  # geom: stride 1, padding 1, ReLU, the pixel path up to 16 outputs and for odd widths (the
  # library's settings, cpu_kernels.CONV_PIXEL_MAX_OUT / CONV_PIXEL_ODD)
  return jax.ffi.ffi_call(target, out)(x, w, bias, empty if res is None else res,
                                       geom=np.asarray([1, 1, 1, 1, 1, 16, 1], np.int64))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--baseline", default="HEAD", help="git revision whose kernel source to time")
  p.add_argument("--variants", default="", help="more source files, comma-separated")
  p.add_argument("--runs", type=int, default=15)
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args()
  host = _memory.huge_pages_first()
  if jax.default_backend() != "cpu":
    raise SystemExit("the kernel is a CPU kernel: run this on a CPU backend")
  with tempfile.TemporaryDirectory() as tmp:
    base = os.path.join(tmp, "baseline.cc")
    rel = os.path.relpath(SOURCE, ROOT)
    proc = subprocess.run(["git", "-C", ROOT, "show", f"{args.baseline}:{rel}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"--baseline={args.baseline}: {proc.stderr.strip()}")
    with open(base, "w") as f:
      f.write(proc.stdout)
    sources = {"working_tree": SOURCE, f"baseline:{args.baseline}": base}
    for i, v in enumerate(filter(None, args.variants.split(","))):
      if not os.path.exists(v):
        raise SystemExit(f"--variants: no file {v}")
      sources[f"variant{i}:{v}"] = v
    targets = {name: _build(src, f"v{i}", tmp) for i, (name, src) in enumerate(sources.items())}
    fns, diffs = {}, {}
    key = jax.random.PRNGKey(0)
    for hw, c, o, with_res in _CONVS:
      k = f"{hw}x{hw} {c}->{o}"
      ks = jax.random.split(jax.random.fold_in(key, hw * 10000 + c * 100 + o), 4)
      x = jax.random.normal(ks[0], (args.batch, hw, hw, c))
      w = jax.random.normal(ks[1], (3, 3, c, o))
      bias = jax.random.normal(ks[2], (o,))
      res = jax.random.normal(ks[3], (args.batch, hw, hw, o)) if with_res else None
      ref = None
      for name, t in targets.items():
        f = jax.jit(lambda x, w, bias, t=t, res=res: _conv(t, x, w, bias, res))
        y = f(x, w, bias)
        if ref is None:
          ref = y
        diffs.setdefault(k, {})[name] = float(jnp.max(jnp.abs(y - ref)))
        fns[f"{k}|{name}"] = (lambda f=f, x=x, w=w, bias=bias: f(x, w, bias))
    # the networks, each version's kernel chosen while the call is traced (the library's
    # convolution calls name their FFI target then)
    arch = mp.get_arch("resnet56", 10)
    v = mp.init_variables(arch, jax.random.PRNGKey(0))
    pruned = mp.materialize(arch, v, mp.prune_to_target(arch, v, 2.3).masks)
    nets = {"full": inference.fold_batchnorm(arch, v), "pruned": inference.fold_batchnorm(*pruned)}
    xn = jax.random.normal(jax.random.PRNGKey(1), (args.batch, 32, 32, 3))
    if not cpu_kernels.conv_available():
      raise SystemExit("the library's kernel is not built (METAPRUNE_JAX_CPU_KERNELS=0?)")
    for name, t in targets.items():
      for tag, (a, vv) in nets.items():
        def body(vv, x, a=a, t=t):
          old, cpu_kernels._CONV = cpu_kernels._CONV, t  # pylint: disable=protected-access
          try:
            return mp.apply_model(a, vv, x)
          finally:
            cpu_kernels._CONV = old  # pylint: disable=protected-access
        f = jax.jit(body, compiler_options=xla_hints.conv_compiler_options())
        f(vv, xn).block_until_ready()
        fns[f"resnet56 {tag}|{name}"] = (lambda f=f, vv=vv: f(vv, xn))
    times = _interleaved(fns, args.runs)
  first = next(iter(targets))
  convs = {}
  for hw, c, o, _ in _CONVS:
    k = f"{hw}x{hw} {c}->{o}"
    convs[k] = {name: {"ms": round(times[f"{k}|{name}"] * 1e3, 3),
                       "speed_up_of_first": round(times[f"{k}|{name}"] / times[f"{k}|{first}"], 3)}
                for name in targets}
  net = {name: {"full_ms": round(times[f"resnet56 full|{name}"] * 1e3, 2),
                "pruned_ms": round(times[f"resnet56 pruned|{name}"] * 1e3, 2),
                "speed_up": round(times[f"resnet56 full|{name}"]
                                  / times[f"resnet56 pruned|{name}"], 3)} for name in targets}
  print(json.dumps({"device": str(jax.devices()[0]), "cores": os.cpu_count(), **host,
                    "batch": args.batch, "runs": args.runs, "versions": list(sources),
                    "resnet56": net, "convs_ms": convs, "max_abs_diff": diffs,
                    "load_avg_1min": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
  sys.exit(main())
