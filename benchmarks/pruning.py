"""Pruning-engine benchmark: progressive-pruning search time and materialised speed-up.

  python benchmarks/pruning.py [--runs 5] [--batch 128] [--quick]

Prints JSON: for the full ResNet-56 (CIFAR-10) pruned to 2.3x and the full VGG-19 (CIFAR-100) to
8.95x, the first-call time (compile + run), the median search time after compilation, the steps
taken and the speed-up reached; and the wall-clock inference speed-up of the materialised
ResNet-56 at 2.3x against the full network (jitted eval forward, median of runs).
Reference (Torch-Pruning 1.6.1, this 2-core CPU): ResNet-56 7.9 s (103 steps, 2.33x), VGG-19
10.6 s (132 steps, 9.10x); its pruned ResNet-56 runs 1.48x faster (767 vs 519 images/s).

``inference_resnet56`` times every variant interleaved in one process (round-robin, so that the
machine's drift hits them alike) and reports medians:

* ``wall_clock_speed_up`` (read by external checks): full network / materialised network, both
  in the form the library ships for inference: BatchNorm folded into the convolutions
  (``fold_batchnorm``), compiled with the library's XLA:CPU settings (``xla_hints``);
* ``unfolded_speed_up``: the same with BatchNorm layers (the previous measurement);
* ``masked_full_width_s``: the masked full-width network (what the search and finetuning run);
* ``round_to_8``: the search with ``round_to=8`` (kept widths multiples of 8), folded;
* ``without_pixel_path``: the folded pair (and ``round_to_8.without_pixel_path_speed_up``)
  compiled without the narrow-convolution kernel's pixel-vectorised path
  (``cpu_kernels.CONV_PIXEL_PATH``), i.e. with the kernel as it was before that path;
* ``ynnpack_convs``: the folded pair compiled with XLA:CPU's default YNNPACK convolutions;
* ``batch1_latency_ms``: batch-1 latency of the folded full and materialised networks;
* ``torch_wall_clock_speed_up``: when torch is importable, the same pruned widths as a PyTorch
  network (NCHW, ``torch.no_grad``, BatchNorm in eval mode), full / pruned, same batch.
"""

import argparse
import json
import os
import time

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
from _timing import interleaved
import jax
import numpy as np

import metaprune_jax as mp
from metaprune_jax.backends import cpu_kernels
from metaprune_jax.backends import xla_hints
from metaprune_jax.nets import inference
from metaprune_jax.nets.arch import pad_pairs


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


def _torch_net(arch, variables):
  """``arch`` as a PyTorch module (NCHW), or None without torch. Inference only."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None
  params, stats = variables["params"], variables.get("batch_stats", {})
  t = lambda a: torch.from_numpy(np.array(a, np.float32))

  class Net(torch.nn.Module):
    """Interprets ``arch.ops`` with torch modules (the reference's operators)."""

    def __init__(self):
      super().__init__()
      self.mods = torch.nn.ModuleDict()
      self.side_pads = {}
      for l in arch.layers:
        p = params[l.name]
        if l.kind == "conv":
          (pt, pb), (pl, pr) = pad_pairs(l.padding)
          sym = pt == pb and pl == pr  # else F.pad before an unpadded conv (flax's 'SAME')
          m = torch.nn.Conv2d(arch.width(l.in_space), arch.width(l.out_space), l.kernel,
                              l.stride, (pt, pl) if sym else 0, bias=l.bias)
          if not sym:
            self.side_pads[l.name] = (pl, pr, pt, pb)
          m.weight.data = t(np.transpose(p["kernel"], (3, 2, 0, 1)))
          if l.bias:
            m.bias.data = t(p["bias"])
        elif l.kind == "bn":
          m = torch.nn.BatchNorm2d(arch.width(l.out_space))
          m.weight.data, m.bias.data = t(p["scale"]), t(p["bias"])
          m.running_mean.data = t(stats[l.name]["mean"])
          m.running_var.data = t(stats[l.name]["var"])
        else:
          m = torch.nn.Linear(arch.width(l.in_space), arch.width(l.out_space), bias=l.bias)
          m.weight.data = t(np.transpose(p["kernel"]))
          if l.bias:
            m.bias.data = t(p["bias"])
        self.mods[l.name] = m

    def forward(self, x):
      env = {"x": x}
      for op in arch.ops:
        a = env[op.inputs[0]]
        F = torch.nn.functional
        if op.op in ("conv", "bn", "dense"):
          if op.layer in self.side_pads:
            a = F.pad(a, self.side_pads[op.layer])
          y = self.mods[op.layer](a)
        elif op.op == "relu":
          y = torch.relu(a)
        elif op.op == "add":
          y = a + env[op.inputs[1]]
        elif op.op in ("maxpool", "avgpool"):
          (pt, pb), (pl, pr) = pad_pairs(op.padding)
          if op.op == "maxpool":
            y = F.max_pool2d(F.pad(a, (pl, pr, pt, pb), value=-float("inf")), op.window,
                             op.stride)
          else:  # the window area divides, padding included (flax's and PyTorch's default)
            y = F.avg_pool2d(F.pad(a, (pl, pr, pt, pb)), op.window, op.stride)
        elif op.op == "gap":
          y = torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)
        elif op.op == "flatten":
          y = torch.flatten(a, 1)
        else:
          raise NotImplementedError(f"the PyTorch twin has no {op.op!r} op")
        env[op.output] = y
      return env[arch.ops[-1].output]
  return torch, Net().eval()


def inference_speed(arch, v, res, batch: int, runs: int, round_to_8=None) -> dict:
  """The ``inference_resnet56`` block (module docstring)."""
  small, sv = mp.materialize(arch, v, res.masks)
  ff, fv = inference.fold_batchnorm(arch, v)
  fs, fsv = inference.fold_batchnorm(small, sv)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
  x1 = x[:1]
  opts = xla_hints.conv_compiler_options()  # as the library's jitted networks

  def net(a, vv, xx, o=opts, pixel_path=True):
    def body(vv, xx):  # the kernel's pixel path is chosen when the call is traced
      old, cpu_kernels.CONV_PIXEL_PATH = cpu_kernels.CONV_PIXEL_PATH, pixel_path
      try:
        return mp.apply_model(a, vv, xx)
      finally:
        cpu_kernels.CONV_PIXEL_PATH = old
    f = jax.jit(body, compiler_options=o)
    return lambda: f(vv, xx)
  f_masked = jax.jit(lambda v, m, x: mp.apply_model(arch, v, x, masks=m), compiler_options=opts)
  fns = {"full": net(ff, fv, x), "small": net(fs, fsv, x),
         "full_bn": net(arch, v, x), "small_bn": net(small, sv, x),
         "masked": lambda: f_masked(v, res.masks, x),
         "full_ynn": net(ff, fv, x, {}), "small_ynn": net(fs, fsv, x, {}),
         "small_no_pixel_path": net(fs, fsv, x, pixel_path=False),
         "full_no_pixel_path": net(ff, fv, x, pixel_path=False)}
  if round_to_8 is not None:
    s8, sv8 = inference.fold_batchnorm(*mp.materialize(arch, v, round_to_8.masks))
    fns["small_r8"] = net(s8, sv8, x)
    fns["small_r8_no_pixel_path"] = net(s8, sv8, x, pixel_path=False)
  torch, tnet = _torch_net(small, sv)
  if torch is not None:
    _, tfull = _torch_net(arch, v)
    xt = torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())

    def tcall(m):
      def f():
        with torch.no_grad():
          return m(xt).numpy()
      return f
    fns["torch_full"], fns["torch_small"] = tcall(tfull), tcall(tnet)
  t = interleaved(fns, runs)
  lat = interleaved({"full": net(ff, fv, x1), "small": net(fs, fsv, x1)}, runs * 10)
  out = {
      "batch": batch, "full_s": round(t["full"], 4), "materialised_s": round(t["small"], 4),
      "masked_full_width_s": round(t["masked"], 4),
      "full_images_per_s": round(batch / t["full"], 1),
      "materialised_images_per_s": round(batch / t["small"], 1),
      "wall_clock_speed_up": round(t["full"] / t["small"], 3),
      "form": "BatchNorm folded (fold_batchnorm), library compiler options",
      "unfolded_full_s": round(t["full_bn"], 4),
      "unfolded_materialised_s": round(t["small_bn"], 4),
      "unfolded_speed_up": round(t["full_bn"] / t["small_bn"], 3),
      "folding_speed_up_full": round(t["full_bn"] / t["full"], 3),
      "folding_speed_up_materialised": round(t["small_bn"] / t["small"], 3),
      # both networks compiled without the kernel's pixel-vectorised path (the kernel before it)
      "without_pixel_path": {"full_s": round(t["full_no_pixel_path"], 4),
                             "materialised_s": round(t["small_no_pixel_path"], 4),
                             "speed_up": round(t["full_no_pixel_path"] / t["small_no_pixel_path"],
                                               3)},
      "ynnpack_convs": {"full_s": round(t["full_ynn"], 4),
                        "materialised_s": round(t["small_ynn"], 4),
                        "speed_up": round(t["full_ynn"] / t["small_ynn"], 3)},
      "batch1_latency_ms": {"full": round(lat["full"] * 1e3, 3),
                            "materialised": round(lat["small"] * 1e3, 3),
                            "speed_up": round(lat["full"] / lat["small"], 3)},
      "macs_full": mp.count_macs(arch)[0], "macs_materialised": mp.count_macs(small)[0],
      "macs_speed_up": round(mp.count_macs(arch)[0] / mp.count_macs(small)[0], 4),
      "widths_materialised": dict(small.widths)}
  if round_to_8 is not None:
    out["round_to_8"] = {"materialised_s": round(t["small_r8"], 4),
                         "speed_up": round(t["full"] / t["small_r8"], 3),
                         "macs_speed_up": round(round_to_8.speed_up, 4), "steps": round_to_8.steps,
                         "without_pixel_path_speed_up": round(
                             t["full_no_pixel_path"] / t["small_r8_no_pixel_path"], 3)}
  if torch is not None:
    out["torch_full_s"] = round(t["torch_full"], 4)
    out["torch_materialised_s"] = round(t["torch_small"], 4)
    out["torch_wall_clock_speed_up"] = round(t["torch_full"] / t["torch_small"], 3)
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--quick", action="store_true", help="skip the VGG-19 search")
  args = p.parse_args()
  host = _memory.huge_pages_first()
  out = {"device": str(jax.devices()[0]), "cores": os.cpu_count(), **host}
  arch, v, res, out["resnet56_2.3x"] = search("resnet56", 10, 2.3, args.runs)
  if not args.quick:
    _, _, _, out["vgg19_8.95x"] = search("vgg19", 100, 8.95, args.runs)
  r8 = mp.prune_to_target(arch, v, 2.3, round_to=8)
  out["inference_resnet56"] = inference_speed(arch, v, res, args.batch, args.runs * 2, r8)
  out["load_avg_1min"] = os.getloadavg()[0]
  out["peak_rss_mb"] = _memory.process_peak_rss_mb()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
