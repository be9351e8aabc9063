"""Device check: the hot paths on whatever accelerator is present, with and without the CPU settings.

  python benchmarks/device_check.py --out device_check.json [--tiny] [--runs 5]

(``benchmarks/device_check.sh`` runs it under a time limit.) For each backend-tuning mode
(``xla_hints``: on the CPU ``auto`` = the XLA:CPU settings and ``none`` = plain JAX; on a GPU or
TPU ``auto`` = plain JAX and ``cpu`` = the traced CPU settings, the hand-written convolution VJP
and the division barriers, which is what they would cost there) it times, after compilation:

* ``train_step``: one ResNet-56 SGD step at ``--batch`` CIFAR images (images/s);
* ``metanet_forward_backward``: the ResNet-56 metanetwork (hidden 64, 8 layers, dense-block
  path) forward and backward;
* ``meta_train_step``: one meta-training step (metanetwork -> network -> loss -> gradients ->
  AdamW) on a data model pruned to ~1.3x, ``--meta-batch`` images, and the number of
  compilations over two data models of different widths (must be 1);
* ``pruned_speed_up``: inference of the full ResNet-56 and of the one pruned to 2.3x MACs (and
  with ``round_to=8``, and the 2.3x one zero-padded to multiples of 8 by
  ``inference.pad_channels``), BatchNorm folded, batch 128 and batch 1, interleaved; off the CPU also at
  ``--big-batch`` (1024), where an accelerator is no longer bound by launch overhead.

When PyTorch is importable it also times the same full and pruned widths as PyTorch modules
(``torch_pruned_speed_up``, on the GPU when torch sees one, ``channels_last`` and cuDNN's
autotuner there; BatchNorm in eval mode), so the two frameworks' pruned speed-ups come from the
same run.

In the backend's default mode it also times the metanetwork at matmul precision ``highest``
against ``default`` (``config.metanet.precision``) and reports the largest output difference.
Writes one JSON file (``--out``) and prints it. ``--tiny``: a small network, graph and batch, to
check the script itself on a CPU in a minute.
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import metaprune_jax as mp
from _timing import interleaved  # noqa: E402
from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.metanetwork import metatrain
from metaprune_jax.nets import inference
from metaprune_jax.runtime import steps
from metaprune_jax.runtime.state import create_state


def _log(msg):
  print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _timed(fn, runs):
  """``(compile_plus_first_s, median_s)``: the first call, then the median of ``runs``."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  ts = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return round(first, 3), round(float(np.median(ts)), 5)


class Case:
  """The networks, graph and data of one run (built once, outside any tuning mode)."""

  def __init__(self, tiny: bool, batch: int, meta_batch: int):
    if tiny:
      self.arch = mp.get_arch("resnet_tiny", 10)
      self.hw, self.layers, self.hidden, self.target = (8, 8), 2, 16, 1.5
    else:
      self.arch = mp.get_arch("resnet56", 10)
      self.hw, self.layers, self.hidden, self.target = (32, 32), 8, 64, 2.3
    self.batch, self.meta_batch = batch, meta_batch
    init = jax.jit(mp.init_variables, static_argnums=(0, 2))
    self.v = init(self.arch, jax.random.PRNGKey(0), self.hw)
    self.x = jax.random.normal(jax.random.PRNGKey(1), (batch, *self.hw, 3))
    self.y = (jnp.arange(batch) % 10).astype(jnp.int32)
    self.graph = graph_lib.to_graph(self.arch, self.v)
    self.plan = metanet_lib.block_plan(self.arch)
    self.models = []
    for i, speed in enumerate((1.3, 1.4)):
      v = init(self.arch, jax.random.PRNGKey(10 + i), self.hw)
      masks, _ = mp.progressive_prune(self.arch, v, speed, (1, 3, *self.hw))
      small, sv = mp.materialize(self.arch, v, masks)
      self.models.append(metatrain.make_slot(self.arch, sv, mp.masks.kept_indices(self.arch,
                                                                                  masks)))
    self.pruned = mp.prune_to_target(self.arch, self.v, self.target, (1, 3, *self.hw))
    try:
      self.pruned8 = mp.prune_to_target(self.arch, self.v, self.target, (1, 3, *self.hw),
                                        round_to=8)
    except ValueError:
      self.pruned8 = None

  def metanet_config(self, precision):
    return metanet_lib.make_metanet_config(
        self.layers, self.hidden, graph_lib.node_dim(self.arch), graph_lib.edge_kinds(self.arch),
        0.01, 0.01, precision=precision)


def train_step(case, runs):
  tx = optax.sgd(0.1, momentum=0.9)
  step = jax.jit(functools.partial(steps.train_step, arch=case.arch, tx=tx),
                 compiler_options=xla_hints.conv_compiler_options())
  state = create_state(case.arch, case.v, tx, jax.random.PRNGKey(2))
  batch = {"image": case.x, "label": case.y}
  first, med = _timed(lambda: step(state, batch)[1]["loss"], runs)
  return {"compile_and_first_s": first, "step_s": med, "images_per_s": round(case.batch / med, 1),
          "batch": case.batch}


def metanet_fwd_bwd(case, runs, precision="default"):
  mc = case.metanet_config(precision)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(3))
  spec = metanet_lib._spec(mc)  # pylint: disable=protected-access
  fwd = jax.jit(lambda p, g: metanet_lib._forward(spec, p, g, case.plan))  # pylint: disable=protected-access
  f_first, f_med = _timed(lambda: fwd(phi, case.graph).nodes, runs)
  out = fwd(phi, case.graph)
  ct = tuple(jnp.ones_like(e) for e in out.edges)
  grad = jax.jit(jax.grad(lambda p, g: sum(jnp.vdot(a, b) for a, b in zip(
      metanet_lib._forward(spec, p, g, case.plan).edges, ct))))  # pylint: disable=protected-access
  b_first, b_med = _timed(lambda: grad(phi, case.graph), runs)
  return {"forward_s": f_med, "forward_backward_s": b_med, "compile_and_first_forward_s": f_first,
          "compile_and_first_forward_backward_s": b_first, "nodes": int(case.graph.nodes.shape[0]),
          "edges": int(case.graph.senders.shape[0]), "precision": precision}, out


def meta_train_step(case, runs):
  mc = case.metanet_config("default")
  spec = metatrain._spec(mc)  # pylint: disable=protected-access
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(4))
  tx = optax.adamw(1e-3, weight_decay=5e-4)
  opt = tx.init(phi)
  x = jax.random.normal(jax.random.PRNGKey(5), (1, case.meta_batch, *case.hw, 3))
  y = (jnp.arange(case.meta_batch) % 10).astype(jnp.int32)[None]

  @functools.partial(jax.jit, compiler_options=xla_hints.conv_compiler_options())
  def step(phi, opt, slot, x, y):
    *_, g = metatrain._model_loss_grads(spec, case.arch, phi, slot, x, y, 16.0, 10.0, "max")  # pylint: disable=protected-access
    u, opt = tx.update(g, opt, phi)
    return optax.apply_updates(phi, u), opt
  first, med = _timed(lambda: step(phi, opt, case.models[0], x, y)[0], runs)
  jax.block_until_ready(step(phi, opt, case.models[1], x, y))
  return {"compile_and_first_s": first, "step_s": med, "batch": case.meta_batch,
          "compilations_over_2_widths": int(step._cache_size())}  # pylint: disable=protected-access


def pruned_speed_up(case, runs, big_batch=0):
  opts = xla_hints.conv_compiler_options()

  def net(a, v, x):
    a, v = inference.fold_batchnorm(a, v)
    f = jax.jit(lambda v, x: mp.apply_model(a, v, x), compiler_options=opts)
    return lambda: f(v, x)
  x = jax.random.normal(jax.random.PRNGKey(6), (128, *case.hw, 3))
  small = mp.materialize(case.arch, case.v, case.pruned.masks)
  fns = {"full": net(case.arch, case.v, x), "pruned": net(*small, x),
         "full_b1": net(case.arch, case.v, x[:1]), "pruned_b1": net(*small, x[:1])}
  if case.pruned8 is not None:
    fns["pruned_r8"] = net(*mp.materialize(case.arch, case.v, case.pruned8.masks), x)
  # the same decisions zero-padded to multiples of 8 (inference.pad_channels; GPUs' choice)
  small8 = inference.pad_channels(*small, 8)
  fns["pruned_pad8"] = net(*small8, x)
  if big_batch:
    xb = jax.random.normal(jax.random.PRNGKey(7), (big_batch, *case.hw, 3))
    fns["full_big"], fns["pruned_big"] = net(case.arch, case.v, xb), net(*small, xb)
    fns["pruned_pad8_big"] = net(*small8, xb)
  t = interleaved(fns, runs)
  out = {"macs_speed_up": round(case.pruned.speed_up, 4), "full_s": round(t["full"], 5),
         "pruned_s": round(t["pruned"], 5), "wall_clock_speed_up": round(t["full"] / t["pruned"], 3),
         "batch1_full_ms": round(t["full_b1"] * 1e3, 3),
         "batch1_pruned_ms": round(t["pruned_b1"] * 1e3, 3),
         "batch1_speed_up": round(t["full_b1"] / t["pruned_b1"], 3)}
  if case.pruned8 is not None:
    out["round_to_8"] = {"macs_speed_up": round(case.pruned8.speed_up, 4),
                         "pruned_s": round(t["pruned_r8"], 5),
                         "wall_clock_speed_up": round(t["full"] / t["pruned_r8"], 3)}
  out["padded_to_8"] = {"pruned_s": round(t["pruned_pad8"], 5),
                        "wall_clock_speed_up": round(t["full"] / t["pruned_pad8"], 3)}
  if big_batch:
    out["big_batch"] = {"batch": big_batch, "full_s": round(t["full_big"], 5),
                        "pruned_s": round(t["pruned_big"], 5),
                        "wall_clock_speed_up": round(t["full_big"] / t["pruned_big"], 3),
                        "padded_to_8_wall_clock_speed_up":
                            round(t["full_big"] / t["pruned_pad8_big"], 3)}
  return out


def torch_pruned_speed_up(case, runs, big_batch):
  """The full and pruned widths as PyTorch modules (``benchmarks/pruning.py``'s twin), or None."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  from pruning import _torch_net  # pylint: disable=import-outside-toplevel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  small = mp.materialize(case.arch, case.v, case.pruned.masks)
  _, tfull = _torch_net(case.arch, case.v)
  _, tsmall = _torch_net(*small)
  fmt = torch.channels_last if dev == "cuda" else torch.contiguous_format
  if dev == "cuda":
    torch.backends.cudnn.benchmark = True
  tfull, tsmall = (m.to(dev, memory_format=fmt) for m in (tfull, tsmall))

  def call(m, n):
    x = torch.randn(n, 3, *case.hw, device=dev).contiguous(memory_format=fmt)

    def f():
      with torch.no_grad():
        m(x)
      if dev == "cuda":
        torch.cuda.synchronize()
    return f
  batches = {"": 128, "_b1": 1}
  if dev == "cuda":
    batches["_big"] = big_batch
  fns = {}
  for suffix, n in batches.items():
    fns["full" + suffix], fns["pruned" + suffix] = call(tfull, n), call(tsmall, n)
  t = interleaved(fns, runs)
  out = {"torch": torch.__version__, "device": dev, "full_s": round(t["full"], 5),
         "pruned_s": round(t["pruned"], 5),
         "torch_wall_clock_speed_up": round(t["full"] / t["pruned"], 3),
         "batch1_full_ms": round(t["full_b1"] * 1e3, 3),
         "batch1_pruned_ms": round(t["pruned_b1"] * 1e3, 3),
         "batch1_speed_up": round(t["full_b1"] / t["pruned_b1"], 3)}
  if "_big" in batches:
    out["big_batch"] = {"batch": big_batch, "full_s": round(t["full_big"], 5),
                        "pruned_s": round(t["pruned_big"], 5),
                        "wall_clock_speed_up": round(t["full_big"] / t["pruned_big"], 3)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="device_check.json")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--batch", type=int, default=None, help="train-step batch (128; tiny 8)")
  p.add_argument("--meta-batch", type=int, default=None, help="meta-step batch (100; tiny 8)")
  p.add_argument("--big-batch", type=int, default=1024,
                 help="a second inference batch off the CPU (0: none; tiny 32)")
  args = p.parse_args()
  t0 = time.perf_counter()
  backend = jax.default_backend()
  d = jax.devices()[0]
  out = {"backend": backend, "device": str(d), "device_kind": getattr(d, "device_kind", ""),
         "device_count": jax.device_count(), "jax": jax.__version__, "host": platform.node(),
         "tiny": args.tiny, "runs": args.runs, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                        time.gmtime())}
  batch = args.batch or (8 if args.tiny else 128)
  meta_batch = args.meta_batch or (8 if args.tiny else 100)
  big_batch = 0 if backend == "cpu" else (min(args.big_batch, 32) if args.tiny else args.big_batch)
  _log(f"backend {backend} ({d}); building the case")
  case = Case(args.tiny, batch, meta_batch)
  out["case"] = {"arch": case.arch.name, "image_hw": list(case.hw),
                 "metanet": {"layers": case.layers, "hidden": case.hidden}}
  # the backend's own choice first, then the other one
  modes = ["auto", "none"] if backend == "cpu" else ["auto", "cpu"]
  out["modes"] = {}
  outputs = {}

  def save():  # after every part: a run cut short by the time limit keeps what it measured
    out["total_s"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  for mode in modes:
    with xla_hints.backend_tuning(mode):
      r = out["modes"][mode] = {"cpu_settings": xla_hints.cpu_tuning(),
                                "conv_compiler_options": xla_hints.conv_compiler_options()}
      _log(f"mode {mode}: train step")
      r["train_step"] = train_step(case, args.runs)
      save()
      _log(f"mode {mode}: metanetwork")
      r["metanet_forward_backward"], outputs[mode] = metanet_fwd_bwd(case, args.runs)
      save()
      _log(f"mode {mode}: meta-training step")
      r["meta_train_step"] = meta_train_step(case, max(2, args.runs // 2))
      save()
      _log(f"mode {mode}: pruned speed-up")
      r["pruned_speed_up"] = pruned_speed_up(case, args.runs * 2, big_batch)
      save()
      print(json.dumps({mode: r}), file=sys.stderr, flush=True)
  a, b = outputs[modes[0]], outputs[modes[1]]
  out["metanet_max_abs_diff_between_modes"] = float(max(
      [float(jnp.max(jnp.abs(a.nodes - b.nodes)))] +
      [float(jnp.max(jnp.abs(e1 - e2))) for e1, e2 in zip(a.edges, b.edges)]))
  _log("matmul precision")
  with xla_hints.backend_tuning("auto"):
    hi, out_hi = metanet_fwd_bwd(case, args.runs, "highest")
    lo, out_lo = metanet_fwd_bwd(case, args.runs, "default")
  out["metanet_precision"] = {
      "highest": hi, "default": lo,
      "default_speed_up_forward_backward": round(hi["forward_backward_s"] /
                                                 lo["forward_backward_s"], 3),
      "max_abs_output_diff": float(max(
          [float(jnp.max(jnp.abs(out_hi.nodes - out_lo.nodes)))] +
          [float(jnp.max(jnp.abs(e1 - e2))) for e1, e2 in zip(out_hi.edges, out_lo.edges)]))}
  save()
  _log("PyTorch twin")
  try:
    out["torch_pruned_speed_up"] = torch_pruned_speed_up(case, args.runs * 2, big_batch)
  except Exception as e:  # pylint: disable=broad-except
    out["torch_pruned_speed_up"] = {"error": f"{type(e).__name__}: {e}"}
  save()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
