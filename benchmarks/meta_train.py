"""Meta-training step benchmark.

  python benchmarks/meta_train.py [--runs 3] [--batch 500] [--case resnet56|vgg19|all]

Prints JSON: time and peak memory of one meta-train step (the low-memory setting: one data
batch of ``--batch`` CIFAR-shaped images) for ResNet-56 (hidden 64, 8 layers; a data model
pruned to ~1.32x by group L2, embedded at full width) and for the shared VGG-19 case (hidden 32);
the cost split between the metanetwork, from_graph, the network forward/backward and the
regulariser (each timed as its own jitted function); compilations over 5 data models of
different widths (target: 1). Memory: ``peak_rss_mb_compile`` (the process's peak up to the
compiled step), ``peak_rss_mb_steps`` (the peak while the steps run, after the compiler's freed
memory is released as ``meta_train`` does: the figure the step itself costs),
``xla_step_temp_buffers_mb`` (XLA's own buffers of one step) and ``peak_rss_mb`` (the whole
process, including the timing of the parts). Reference (PyTorch, this 2-core CPU): ResNet-56 step 14-20 s
(metanetwork forward 1.6 s, CE forward 1.1 s, CE backward 7.1 s, regulariser backward 3.6 s),
9 GB peak.
"""

import argparse
import functools
import json
import os
import sys
import time

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import _networks
import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaprune_jax as mp
from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.metanetwork import metatrain
from metaprune_jax.prune.regularizer import regularizer


def _log(msg):
  print(f"[meta_train benchmark] {msg}", file=sys.stderr, flush=True)


def _t(fn, runs):
  """Median wall time after one warm-up call (compilation excluded)."""
  jax.block_until_ready(fn())
  ts = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return round(float(np.median(ts)), 4)


def _data_models(full, n, seed):
  """n data models: full-width random networks pruned to 1.2-1.5x by group L2."""
  out = []
  init = jax.jit(mp.init_variables, static_argnums=(0,))
  for i in range(n):
    v = init(full, jax.random.PRNGKey(seed + i))
    masks, _ = mp.progressive_prune(full, v, 1.2 + 0.3 * i / max(n - 1, 1))
    small, sv = mp.materialize(full, v, masks)
    out.append((small, sv, mp.masks.kept_indices(full, masks)))
  return out


def bench(full, mc, batch, runs, chunk, n_models=5):
  spec = metatrain._spec(mc)  # pylint: disable=protected-access
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
  t = time.perf_counter()
  models = _data_models(full, n_models, 10)
  prep_s = time.perf_counter() - t
  slots = [metatrain.make_slot(full, sv, keep) for _, sv, keep in models]
  x = jax.random.normal(jax.random.PRNGKey(1), (1, batch, 32, 32, 3))
  y = (jnp.arange(batch) % full.num_classes).astype(jnp.int32)[None]
  tx = optax.adamw(1e-3, weight_decay=5e-4)
  opt = tx.init(phi)

  conv_opts = xla_hints.conv_compiler_options()  # as the library's meta step

  def make_step():
    @functools.partial(jax.jit, compiler_options=conv_opts)
    def step(phi, opt, slot, x, y):
      *_, g = metatrain._model_loss_grads(spec, full, phi, slot, x, y, 16.0, 10.0, "max",  # pylint: disable=protected-access
                                            chunk=chunk)
      u, opt = tx.update(g, opt, phi)
      return optax.apply_updates(phi, u), opt
    return step
  step = make_step()
  rss_before_mb = _memory.process_peak_rss_mb()
  t = time.perf_counter()
  mem = step.lower(phi, opt, slots[0], x, y).compile().memory_analysis()
  compile_s = time.perf_counter() - t
  xla_temp_mb = round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None
  rss_compile_mb = _memory.process_peak_rss_mb()
  xla_hints.release_freed_memory()  # as meta_train does after compiling its step
  resettable = _memory.reset_peak_rss()  # from here the peak is the steps' own
  jax.block_until_ready(step(phi, opt, slots[0], x, y))  # no compilation: jax's cache
  _log(f"compile {compile_s:.1f} s")
  step_s = _t(lambda: step(phi, opt, slots[0], x, y), runs)
  _log(f"step {step_s:.2f} s")
  rss_exec_mb = _memory.vm_mb("VmHWM") if resettable else None
  # compilations over the data models of different widths (a small batch: same program shape
  # rules, cheap runs)
  small_step = make_step()
  for s in slots:
    jax.block_until_ready(small_step(phi, opt, s, x[:, :8], y[:, :8]))
  n_compiles = small_step._cache_size()  # pylint: disable=protected-access

  slot = slots[0]
  flat = jnp.asarray(slot.flat)
  graph = jax.jit(graph_lib.graph_from_flat)(slot.layout, flat)
  # the meta step's own metanetwork form: the dense-block path at full width with node masks
  plan = metanet_lib.block_plan(full)
  valid = graph_lib.node_valid(full, slot.masks)
  fwd = jax.jit(lambda p, g: metanet_lib._forward(spec, p, g, plan, valid))  # pylint: disable=protected-access
  out = fwd(phi, graph)
  dec = jax.jit(lambda la, g: graph_lib.unflatten_variables(
      full, graph_lib.flat_from_graph(la, g, flat.shape[0]))["params"])
  theta = dec(slot.layout, out)
  ce = jax.jit(lambda th, x, y: metatrain.network_grads(full, th, slot.batch_stats, slot.masks,
                                                        x, y, chunk),
               compiler_options=xla_hints.conv_compiler_options())
  reg = jax.jit(jax.value_and_grad(lambda th: regularizer(full, {"params": th}, masks=slot.masks)))
  mn_vjp = jax.jit(jax.grad(lambda p, g, ct: sum(
      jnp.vdot(a, b) for a, b in zip(metanet_lib._forward(spec, p, g, plan, valid).edges, ct))))  # pylint: disable=protected-access
  _log("timing the parts")
  split = {
      "metanet_forward_s": _t(lambda: fwd(phi, graph), runs),
      "graph_gather_plus_from_graph_s": _t(lambda: dec(slot.layout, out), runs),
      "network_forward_backward_s": _t(lambda: ce(theta, x, y), runs),
      "regularizer_value_and_grad_s": _t(lambda: reg(theta), runs),
  }
  jax.block_until_ready(mn_vjp(phi, graph, out.edges))
  split["metanet_forward_backward_s"] = _t(lambda: mn_vjp(phi, graph, out.edges), runs)
  return {"nodes": int(graph.nodes.shape[0]), "edges": int(graph.senders.shape[0]),
          "hidden": mc.hidden, "layers": mc.num_layers, "batch": batch,
          "chunk": metatrain.chunk_size(batch, chunk),
          "step_s_median": step_s, "compile_s": round(compile_s, 2),
          "compilations_over_%d_widths" % n_models: int(n_compiles),
          "split": split, "data_model_prep_s": round(prep_s, 2),
          "peak_rss_mb_before_compile": rss_before_mb, "peak_rss_mb_compile": rss_compile_mb,
          "peak_rss_mb_steps": rss_exec_mb, "xla_step_temp_buffers_mb": xla_temp_mb}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=2)
  p.add_argument("--batch", type=int, default=500)
  p.add_argument("--case", default="all")
  p.add_argument("--chunk", type=int, default=metatrain.DEFAULT_CHUNK,
                 help="images per scanned network forward/backward (0: the whole batch)")
  args = p.parse_args()
  host = _memory.huge_pages_first()
  out = {"device": str(jax.devices()[0]), **host}
  if args.case in ("resnet56", "all"):
    full = mp.get_arch("resnet56", 10)
    out["resnet56"] = bench(full, metanet_lib.default_metanet_config("resnet56"), args.batch,
                            args.runs, args.chunk)
    print(json.dumps({"resnet56": out["resnet56"], **host}), flush=True)
  if args.case in ("vgg19", "all"):
    # the shared fixture's VGG-19 widths are the budget; data models are pruned from it
    arch, _ = mp.import_reference_model(dict(np.load(os.path.join(
        _networks.reference_fixtures(), "vgg19_c100_small", "model.npz"))), "VGG19", 100)
    out["vgg19_case"] = bench(arch, metanet_lib.default_metanet_config("vgg19"), args.batch,
                              args.runs, args.chunk)
  out["peak_rss_mb"] = _memory.process_peak_rss_mb()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
