"""Pruned ResNet-56 inference over ``round_to``, batch size and dtype: where pruning pays on a backend.

  python benchmarks/pruned_sweep.py --out sweep.json [--tiny] [--runs 10]

``device_check.py`` measures one pruned width (2.3x MACs, ``round_to`` 1 and 8) at two batch
sizes. On a GPU that network ran slower than the full one, so this sweep asks which of three
things decides it: channel counts that are not multiples of the tensor cores' tile
(``--round-to``: 1, 8, 16, 32; ``--pad``: the ``round_to=1`` network with its widths zero-padded
to multiples of 8 or 16 by ``inference.pad_channels``, the same decisions and function), launch overhead (``--batches``: 128 up to 8192), and the number
format (``float32`` against ``bfloat16`` parameters and inputs, where the tensor cores run
without TF32's conversion). Every network has its BatchNorm folded
(``metaprune_jax.nets.inference.fold_batchnorm``) and runs in the backend's own tuning mode; the
full and pruned networks of one batch and dtype are timed interleaved (``_timing.interleaved``).
Prints and writes one JSON file, saved after every batch size (a run cut short keeps what it
measured): ``{"<dtype>": {"<batch>": {"full_s": .., "round_to_<r>": {"macs_speed_up": ..,
"pruned_s": .., "wall_clock_speed_up": ..}, "pad_<m>": {..}}}}``.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

import metaprune_jax as mp
from _timing import interleaved  # noqa: E402
from metaprune_jax.backends import xla_hints
from metaprune_jax.nets import inference


def _log(msg):
  print(f"[pruned_sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--tiny", action="store_true", help="resnet_tiny on 8x8, small batches")
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--target", type=float, default=None, help="MACs speed-up (2.3; tiny 1.5)")
  p.add_argument("--round-to", default="1,8,16,32")
  p.add_argument("--batches", default=None, help="comma list (128,1024,8192; tiny 8,32)")
  p.add_argument("--pad", default="8,16",
                 help="also the round_to=1 network zero-padded to these channel multiples "
                      "(inference.pad_channels: the same decisions and function)")
  p.add_argument("--dtypes", default="float32,bfloat16")
  args = p.parse_args()
  t0 = time.perf_counter()
  if args.tiny:
    arch, hw, target, batches = mp.get_arch("resnet_tiny", 10), (8, 8), 1.5, "8,32"
  else:
    arch, hw, target, batches = mp.get_arch("resnet56", 10), (32, 32), 2.3, "128,1024,8192"
  target = args.target or target
  batches = [int(b) for b in (args.batches or batches).split(",")]
  d = jax.devices()[0]
  out = {"backend": jax.default_backend(), "device_kind": getattr(d, "device_kind", ""),
         "jax": jax.__version__, "arch": arch.name, "image_hw": list(hw), "target": target,
         "runs": args.runs, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
         "results": {}}
  v = jax.jit(mp.init_variables, static_argnums=(0, 2))(arch, jax.random.PRNGKey(0), hw)
  folded = {"full": inference.fold_batchnorm(arch, v)}
  for r in (int(s) for s in args.round_to.split(",")):
    try:
      res = mp.prune_to_target(arch, v, target, (1, 3, *hw), round_to=r)
    except ValueError as e:
      out["results"].setdefault("skipped", {})[f"round_to_{r}"] = str(e)
      continue
    folded[f"round_to_{r}"] = inference.fold_batchnorm(*mp.materialize(arch, v, res.masks))
    out.setdefault("macs_speed_up", {})[f"round_to_{r}"] = round(res.speed_up, 4)
    if r == 1:
      for m in (int(s) for s in args.pad.split(",") if s):
        folded[f"pad_{m}"] = inference.pad_channels(*folded["round_to_1"], m)
  opts = xla_hints.conv_compiler_options()

  def save():
    out["total_s"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  for dt in args.dtypes.split(","):
    dtype = jnp.dtype(dt)
    for b in batches:
      _log(f"{dt} batch {b}")
      x = jax.random.normal(jax.random.PRNGKey(1), (b, *hw, 3)).astype(dtype)
      fns = {}
      for name, (a, fv) in folded.items():
        fv = jax.tree.map(lambda t: t.astype(dtype), fv)
        f = jax.jit(lambda fv, x, a=a: mp.apply_model(a, fv, x), compiler_options=opts)
        fns[name] = lambda f=f, fv=fv: f(fv, x)
      t = interleaved(fns, args.runs)
      row = {"full_s": round(t["full"], 6)}
      for name in folded:
        if name != "full":
          row[name] = {"pruned_s": round(t[name], 6),
                       "wall_clock_speed_up": round(t["full"] / t[name], 3)}
      out["results"].setdefault(dt, {})[str(b)] = row
      save()
  save()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
