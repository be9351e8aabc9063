"""Where a pruned ResNet-56's inference time goes on XLA:CPU: per stage, and per convolution width.

  python benchmarks/pruned_profile.py [--runs 7] [--batch 128]

Prints JSON:

* ``stages_ms``: the full ResNet-56 and the one pruned to 2.3x MACs (reference decisions),
  BatchNorm folded, cut after the stem, after stage 1 and after stage 2 (``arch.ops`` truncated),
  each cut jitted on its own; the differences are the stages' times (interleaved medians), and
  ``per_stage_full_over_pruned`` each stage's time ratio beside its MACs ratio;
* ``kernel_rules``: the full network and the pruned ones (``round_to`` 1 and 8), folded, batch
  ``--batch``, compiled with the narrow-convolution kernel for no layer (``none``), for layers with
  at most 16 output channels (``out16``), for layers reading at most 16 channels (``in16``), and
  ``in16`` plus the kernel's pixel-vectorised path for layers writing at most 8, 16 or 32
  channels at stride 1 (``in16_pixel8/16/32``; the library's rule is ``in16_pixel16``:
  ``cpu_kernels.CONV_MAX_IN``, ``CONV_PIXEL_MAX_OUT``), all interleaved: ms and speed-ups;
* ``convs_ms``: isolated 3x3 convolutions at the pruned network's kinds of widths, batch 128:
  XLA:CPU as the library compiles it (``xla``), XLA:CPU with its default YNNPACK convolutions
  (``xla_ynnpack``) and the narrow-convolution kernel (``kernel``, ``cpu_kernels.conv_nhwc``), with
  the achieved GMAC/s;
* ``batch_chunks``: the full and the pruned network with the batch run in chunks of 128, 64, 32,
  16 images (``lax.map``, one call): ms and speed-ups.
"""

import argparse
import dataclasses
import json
import os

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import jax
import numpy as np

import metaprune_jax as mp
from metaprune_jax.backends import cpu_kernels
from metaprune_jax.backends import xla_hints
from metaprune_jax.nets import inference
from _timing import interleaved as _interleaved

_DN = ("NHWC", "HWIO", "NHWC")
_CONVS = ((32, 16, 16), (32, 15, 7), (32, 7, 15), (32, 8, 8), (32, 6, 6), (32, 3, 16),
          (16, 32, 32), (16, 32, 9), (16, 9, 32), (8, 64, 64), (8, 64, 24),
          # the last stage's widths in the pruned ResNet-56 (inner 22-57, the stream 64)
          (8, 64, 51), (8, 51, 64), (8, 64, 57), (8, 57, 64), (8, 64, 48), (8, 48, 64))


def _cut(arch, prefix):
  """``arch`` up to the last op of the layers named ``prefix*`` (and the add/relu after it)."""
  idx = max(i for i, op in enumerate(arch.ops) if op.layer and op.layer.startswith(prefix))
  while idx + 1 < len(arch.ops) and arch.ops[idx + 1].op in ("add", "relu"):
    idx += 1
  return dataclasses.replace(arch, ops=arch.ops[:idx + 1])


def stages(batch, runs):
  arch = mp.get_arch("resnet56", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  res = mp.prune_to_target(arch, v, 2.3)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  opts = xla_hints.conv_compiler_options()
  cuts = ("conv1", "layer1_8", "layer2_8", None)
  fns = {}
  for tag, (a, vv) in (("full", inference.fold_batchnorm(arch, v)),
                       ("pruned", inference.fold_batchnorm(*mp.materialize(arch, v,
                                                                           res.masks)))):
    for c in cuts:
      net = a if c is None else _cut(a, c)
      f = jax.jit(lambda vv, x, net=net: mp.apply_model(net, vv, x), compiler_options=opts)
      fns[(tag, c)] = (lambda f=f, vv=vv: f(vv, x))
  t = _interleaved({f"{k[0]}/{k[1]}": f for k, f in fns.items()}, runs)
  out = {}
  macs = {}
  for tag, a in (("full", arch), ("pruned", mp.materialize(arch, v, res.masks)[0])):
    cum = [mp.count_macs(a if c is None else _cut(a, c))[0] for c in cuts]
    macs[tag] = [cum[0], cum[1] - cum[0], cum[2] - cum[1], cum[3] - cum[2]]
  for tag in ("full", "pruned"):
    m = [t[f"{tag}/{c}"] * 1e3 for c in cuts]
    out[tag] = {"stem": round(m[0], 1), "stage1": round(m[1] - m[0], 1),
                "stage2": round(m[2] - m[1], 1), "stage3_and_head": round(m[3] - m[2], 1),
                "total": round(m[3], 1)}
  names = ("stem", "stage1", "stage2", "stage3_and_head")
  out["per_stage_full_over_pruned"] = {
      n: {"time": round(out["full"][n] / out["pruned"][n], 2),
          "macs": round(macs["full"][i] / macs["pruned"][i], 2)} for i, n in enumerate(names)}
  return out


def batch_chunks(batch, runs):
  """The full and the pruned network (folded) with the batch run in chunks (``lax.map`` over
  ``batch / chunk`` slices, one jitted call): smaller activations stay in cache."""
  arch = mp.get_arch("resnet56", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  res = mp.prune_to_target(arch, v, 2.3)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  opts = xla_hints.conv_compiler_options()
  chunks = [c for c in (batch, 64, 32, 16) if c <= batch and batch % c == 0]
  fns = {}
  for tag, (a, vv) in (("full", inference.fold_batchnorm(arch, v)),
                       ("pruned", inference.fold_batchnorm(*mp.materialize(arch, v,
                                                                           res.masks)))):
    for c in chunks:
      def body(vv, x, a=a, c=c):
        xs = x.reshape(batch // c, c, *x.shape[1:])
        return jax.lax.map(lambda xc: mp.apply_model(a, vv, xc), xs).reshape(batch, -1)
      f = jax.jit(body, compiler_options=opts)
      fns[f"{tag}/{c}"] = (lambda f=f, vv=vv: f(vv, x))
  t = _interleaved(fns, runs)
  return {f"chunk_{c}": {"full_ms": round(t[f"full/{c}"] * 1e3, 1),
                         "pruned_ms": round(t[f"pruned/{c}"] * 1e3, 1),
                         "speed_up": round(t[f"full/{c}"] / t[f"pruned/{c}"], 3)}
          for c in chunks}


def kernel_rules(batch, runs):
  arch = mp.get_arch("resnet56", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  opts = xla_hints.conv_compiler_options()
  nets = {"full": inference.fold_batchnorm(arch, v)}
  for rt in (1, 8):
    res = mp.prune_to_target(arch, v, 2.3, round_to=rt)
    nets[f"round_to_{rt}"] = inference.fold_batchnorm(*mp.materialize(arch, v, res.masks))
  # (max in, max out) of the channel-vectorised path, max out of the pixel-vectorised one (0: off)
  rules = {"none": (0, 0, 0), "out16": (10**9, 16, 0), "in16": (16, 64, 0),
           "in16_pixel8": (16, 64, 8), "in16_pixel16": (16, 64, 16),
           "in16_pixel32": (16, 64, 32)}
  names = ("CONV_MAX_IN", "CONV_MAX_OUT", "CONV_PIXEL_MAX_OUT")
  saved = tuple(getattr(cpu_kernels, n) for n in names)
  fns = {}
  try:
    for rule, values in rules.items():  # read when tracing: compile under each
      for n, value in zip(names, values):
        setattr(cpu_kernels, n, value)
      for k, (a, vv) in nets.items():
        f = jax.jit(lambda vv, x, a=a: mp.apply_model(a, vv, x), compiler_options=opts)
        f.lower(vv, x).compile()
        fns[f"{rule}/{k}"] = (lambda f=f, vv=vv: f(vv, x))
  finally:
    for n, value in zip(names, saved):
      setattr(cpu_kernels, n, value)
  t = _interleaved(fns, runs)
  out = {}
  for rule in rules:
    r = {k: round(t[f"{rule}/{k}"] * 1e3, 1) for k in nets}
    for k in nets:
      if k != "full":
        r[f"speed_up_{k}"] = round(t[f"{rule}/full"] / t[f"{rule}/{k}"], 3)
    out[rule] = r
  return out


def convs(batch, runs):
  opts = xla_hints.conv_compiler_options()
  fns, macs = {}, {}
  for hw, ci, co in _CONVS:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, hw, hw, ci))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, ci, co))
    pad = ((1, 1), (1, 1))
    conv = lambda x, w, pad=pad: jax.lax.conv_general_dilated(x, w, (1, 1), pad,
                                                              dimension_numbers=_DN)
    key = f"{hw}x{hw} {ci}->{co}"
    macs[key] = batch * hw * hw * 9 * ci * co
    for name, f in (("xla", jax.jit(conv, compiler_options=opts)),
                    ("xla_ynnpack", jax.jit(conv))):
      fns[f"{key}/{name}"] = (lambda f=f, x=x, w=w: f(x, w))
    if cpu_kernels.conv_available() and co <= 64:
      f = jax.jit(lambda x, w, pad=pad: cpu_kernels.conv_nhwc(x, w, (1, 1), pad))
      fns[f"{key}/kernel"] = (lambda f=f, x=x, w=w: f(x, w))
  t = _interleaved(fns, runs)
  out = {}
  for k, s in t.items():
    key, name = k.split("/")
    out.setdefault(key, {})[name] = {"ms": round(s * 1e3, 2),
                                     "gmac_per_s": round(macs[key] / s / 1e9, 1)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=7)
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args()
  host = _memory.huge_pages_first()
  out = {"device": str(jax.devices()[0]), "cores": os.cpu_count(), **host,
         "stages_ms": stages(args.batch, args.runs),
         "kernel_rules": kernel_rules(args.batch, args.runs),
         "convs_ms": convs(args.batch, args.runs),
         "batch_chunks": batch_chunks(args.batch, args.runs),
         "load_avg_1min": os.getloadavg()[0]}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
