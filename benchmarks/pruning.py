"""Pruning-engine benchmark: progressive-pruning search time and materialised speed-up.

  python benchmarks/pruning.py [--runs 5]

Prints JSON: for the full ResNet-56 (CIFAR-10) pruned to 2.3x and the full VGG-19 (CIFAR-100) to
8.95x, the first-call time (compile + run), the median search time after compilation, the steps
taken and the speed-up reached; and the wall-clock inference speed-up of the materialised
ResNet-56 at 2.3x against the full network (batch 128, jitted eval forward, median of runs).
Reference (Torch-Pruning 1.6.1, this 2-core CPU): ResNet-56 7.9 s (103 steps, 2.33x), VGG-19
10.6 s (132 steps, 9.10x); its pruned ResNet-56 runs 1.48x faster (767 vs 519 images/s).
"""

import argparse
import json
import time

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import jax
import numpy as np

import metaprune_jax as mp
from metaprune_jax import xla_hints


def _median_time(fn, runs):
  ts = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), ts


def search(name, ncls, target, runs):
  arch = mp.get_arch(name, ncls)
  v = jax.jit(mp.init_variables, static_argnums=(0,))(arch, jax.random.PRNGKey(0))
  t = time.perf_counter()
  res = mp.prune_to_target(arch, v, target)
  first = time.perf_counter() - t
  med, ts = _median_time(lambda: mp.prune_to_target(arch, v, target).speed_up, runs)
  return arch, v, res, {"first_call_s": round(first, 3), "search_s_median": round(med, 4),
                        "search_s_runs": [round(x, 4) for x in ts], "steps": res.steps,
                        "speed_up": round(res.speed_up, 4), "target": target}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args()
  host = _memory.huge_pages_first()
  out = {"device": str(jax.devices()[0]), "cores": __import__("os").cpu_count(), **host}
  arch, v, res, out["resnet56_2.3x"] = search("resnet56", 10, 2.3, args.runs)
  _, _, _, out["vgg19_8.95x"] = search("vgg19", 100, 8.95, args.runs)

  small, sv = mp.materialize(arch, v, res.masks)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, 32, 32, 3))
  opts = xla_hints.conv_compiler_options()  # as the library's jitted networks
  f_full = jax.jit(lambda v, x: mp.apply_model(arch, v, x), compiler_options=opts)
  f_small = jax.jit(lambda v, x: mp.apply_model(small, v, x), compiler_options=opts)
  f_masked = jax.jit(lambda v, m, x: mp.apply_model(arch, v, x, masks=m), compiler_options=opts)
  for f, a in ((f_full, (v, x)), (f_small, (sv, x)), (f_masked, (v, res.masks, x))):
    jax.block_until_ready(f(*a))
  t_full, _ = _median_time(lambda: f_full(v, x), args.runs * 2)
  t_small, _ = _median_time(lambda: f_small(sv, x), args.runs * 2)
  t_masked, _ = _median_time(lambda: f_masked(v, res.masks, x), args.runs * 2)
  out["inference_resnet56"] = {
      "batch": args.batch, "full_s": round(t_full, 4), "materialised_s": round(t_small, 4),
      "masked_full_width_s": round(t_masked, 4),
      "full_images_per_s": round(args.batch / t_full, 1),
      "materialised_images_per_s": round(args.batch / t_small, 1),
      "wall_clock_speed_up": round(t_full / t_small, 3),
      "macs_full": mp.count_macs(arch)[0], "macs_materialised": mp.count_macs(small)[0]}
  out["peak_rss_mb"] = _memory.process_peak_rss_mb()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
