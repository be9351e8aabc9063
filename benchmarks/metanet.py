"""Metanetwork speed benchmark (issue 4): forward, forward+backward, compiles, peak memory.

Usage (from the repository root):

  python benchmarks/metanet.py [--repeats 5]

Prints one JSON object per case:
* ``resnet56``: full-width ResNet-56 (CIFAR-10) graph built with ``to_graph`` (2,045 nodes,
  140,720 edges), metanetwork hidden 64, 8 layers (``default_metanet_config('resnet56')``).
  By default on the dense-block path (``--path blocks``: ``plan=metanet.block_plan(arch)``;
  ``--path scatter``: the generic scatter path, the reference point).
* ``vgg19_c100_small``: the shared fixture graph (generic scatter path: a reference graph) with the fixture's metanetwork (hidden 32).
* ``vgg19_c100_small_to_graph``: the same network (imported from the fixture's ``model.npz``) and
  metanetwork as ``transform`` runs them: ``to_graph``, the dense-block path, and the backward
  through ``from_graph``.

Forward = ``apply_metanet`` (jitted); forward+backward = gradient w.r.t. the metanetwork params
of a scalar of ``from_graph``'s output (single jit). Times are the median of ``--repeats``
runs after compilation. ``compiles_over_5_pruned`` counts compilations of the forward over 5
differently pruned networks (hidden channels dropped from random node sets), padded to the
full-width budget with ``pad_graph`` (scatter path), or held at full width with node masks
(blocks path, as meta-training does; the first masked call compiles once). ``peak_rss_mb`` is the process's max RSS so far (compilations included);
``peak_rss_mb_forward_backward_runs`` the peak while the forward+backward runs, after the
compiler's freed memory is released (``xla_hints.release_freed_memory``), and
``rss_mb_before_forward_backward_runs`` the process's resident memory just before them (the
Python/jax runtime, the compiled programs, the graph); the network's variables are random
normal, not flax's ``init`` (see ``benchmarks/_networks.py``);
``xla_forward_backward_temp_buffers_mb`` XLA's own buffers of one forward+backward.
``*_cpu_s`` is the process CPU time (user + sys) per call, a contention-robust figure on a
shared machine (XLA uses up to 2 threads here, so wall time on an idle 2-core box lies between
cpu/2 and cpu).

The script restarts itself with transparent huge pages, as the CLI runs
(``metaprune_jax.backends.host_memory``); ``METAPRUNE_HUGE_PAGES=0 python benchmarks/metanet.py`` measures
without them. (An earlier ``--tune_malloc`` flag, glibc's ``mallopt`` with no mmap, no trimming
and one arena, is gone: it removed the page faults too, but raised the peak RSS by ~1 GB and made
the meta-training step slower, 5.8 s against 4.5 s.)

On the CPU the dense-block path runs its grid groups in ``metaprune_jax.backends.cpu_kernels``
(``"grid_impl": "cpu_kernel"``; ``cpu_kernels_load_s`` is their build on a machine's first run,
or their loading from the cache); ``METAPRUNE_JAX_CPU_KERNELS=0 python benchmarks/metanet.py``
measures XLA's fusions instead (``"grid_impl": "xla"``, as on GPUs and TPUs).
"""

import argparse
import json
import os
import time

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import _networks
import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.backends import cpu_kernels
from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet
from metaprune_jax.nets import reference
from metaprune_jax.nets import zoo

def _median_time(fn, repeats):
  """(median wall s, min wall s, mean cpu s) per call."""
  times = []
  c0 = os.times()
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  c1 = os.times()
  cpu = (c1.user - c0.user + c1.system - c0.system) / repeats
  return float(np.median(times)), float(np.min(times)), float(cpu)


def _drop_nodes(graph, drop):
  n = graph.nodes.shape[0]
  keep = np.setdiff1d(np.arange(n), drop)
  new_id = np.full((n,), -1, np.int64)
  new_id[keep] = np.arange(keep.size)
  alive = (new_id[graph.senders] >= 0) & (new_id[graph.receivers] >= 0)
  return graph._replace(
      nodes=graph.nodes[keep], edges=(graph.edges[0][alive],),
      senders=new_id[graph.senders[alive]].astype(np.int32),
      receivers=new_id[graph.receivers[alive]].astype(np.int32),
      n_node=np.array([keep.size], np.int32), n_edge=np.array([alive.sum()], np.int32))


def _pruned_graphs(graph, node_sets, count, seed=0):
  rng = np.random.default_rng(seed)
  hidden = [(s, c) for _, space, s, c in node_sets if space not in ("input", "classes")]
  out = []
  for _ in range(count):
    drop = []
    for i in rng.choice(len(hidden), size=len(hidden) // 2, replace=False):
      start, c = hidden[i]
      drop.extend(start + rng.choice(c, size=rng.integers(1, c), replace=False))
    out.append(_drop_nodes(graph, np.asarray(drop, np.int64)))
  return out


def bench_case(name, config, params, graph, arch, repeats, plan=None):
  """Times one case. ``arch`` (or None) is used for the backward through ``from_graph``;
  ``plan`` (or None: the scatter path) selects the dense-block path."""
  graph = jax.tree_util.tree_map(np.asarray, graph)
  spec = metanet._spec(config)  # pylint: disable=protected-access
  t = time.perf_counter()
  jax.block_until_ready(metanet.apply_metanet(config, params, graph, plan=plan))
  compile_fwd = time.perf_counter() - t
  fwd_med, fwd_min, fwd_cpu = _median_time(
      lambda: metanet.apply_metanet(config, params, graph, plan=plan), repeats)

  def loss(p, g):
    out = metanet._forward(spec, p, g, plan)  # pylint: disable=protected-access
    if arch is not None:
      new = graph_lib.from_graph(arch, out)
      leaves = jax.tree_util.tree_leaves(new["params"])
    else:
      leaves = [out.nodes, *out.edges]
    return sum(jnp.sum(x * x) for x in leaves)

  grad_fn = jax.jit(jax.value_and_grad(loss))
  g = graph._replace(edges=tuple(graph.edges))
  t = time.perf_counter()
  mem = grad_fn.lower(params, g).compile().memory_analysis()
  jax.block_until_ready(grad_fn(params, g))
  compile_bwd = time.perf_counter() - t
  xla_hints.release_freed_memory()  # the compiler's freed memory (see xla_hints)
  resettable = _memory.reset_peak_rss()
  rss_before_runs = _memory.vm_mb("VmRSS")
  bwd_med, bwd_min, bwd_cpu = _median_time(lambda: grad_fn(params, g), repeats)
  runs_peak = _memory.vm_mb("VmHWM") if resettable else None
  return {
      "case": name, "path": "blocks" if plan is not None else "scatter",
      "grid_impl": None if plan is None else (
          "cpu_kernel" if cpu_kernels.use_for(jnp.zeros((1,), jnp.float32)) else "xla"),
      "device": str(jax.devices()[0]), "num_nodes": int(graph.nodes.shape[0]),
      "num_edges": int(graph.senders.shape[0]), "hidden": spec.hidden,
      "num_layers": spec.num_layers, "forward_s": fwd_med, "forward_min_s": fwd_min,
      "forward_cpu_s": fwd_cpu, "forward_backward_s": bwd_med,
      "forward_backward_min_s": bwd_min, "forward_backward_cpu_s": bwd_cpu,
      "load_avg_1min": os.getloadavg()[0],
      "compile_forward_s": compile_fwd, "compile_forward_backward_s": compile_bwd,
      "xla_forward_backward_temp_buffers_mb": (round(mem.temp_size_in_bytes / 2**20, 1)
                                               if mem is not None else None),
      "rss_mb_before_forward_backward_runs": rss_before_runs,
      "peak_rss_mb_forward_backward_runs": runs_peak,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--path", choices=("blocks", "scatter"), default="blocks",
                      help="ResNet-56: the dense-block fast path or the generic scatter path")
  args = parser.parse_args()
  host = _memory.huge_pages_first()
  t = time.perf_counter()
  host["cpu_kernels"] = cpu_kernels.available()  # built (or found in the cache) before timing
  host["cpu_kernels_load_s"] = round(time.perf_counter() - t, 2)

  # ResNet-56, full width.
  arch = zoo.get_arch("resnet56", 10)
  variables = _networks.random_variables(arch)  # see _networks: no flax init in the process
  graph = jax.tree_util.tree_map(np.asarray, graph_lib.to_graph(arch, variables))
  config = metanet.default_metanet_config("resnet56")
  params = metanet.init_metanet(config, jax.random.PRNGKey(1))
  plan = metanet.block_plan(arch) if args.path == "blocks" else None
  res = bench_case("resnet56", config, params, graph, arch, args.repeats, plan)
  before = metanet._forward_jit._cache_size()  # pylint: disable=protected-access
  if plan is None:
    # Compilations over 5 differently pruned networks padded to the full-width budget.
    budget = (graph.nodes.shape[0] + 1, (graph.edges[0].shape[0],))
    for g in _pruned_graphs(graph, graph_lib.graph_layout(arch).node_sets, 5):
      jax.block_until_ready(metanet.apply_metanet(config, params, metanet.pad_graph(g, *budget)))
  else:
    # Compilations over 5 differently pruned networks held at full width with masks (the
    # meta-training form, metatrain.make_slot).
    rng = np.random.default_rng(0)
    spec = metanet._spec(config)  # pylint: disable=protected-access
    for _ in range(5):
      masks = {s: (rng.random(arch.width(s)) < 0.6).astype(np.float32)
                  for s in arch.prunable_spaces}
      valid = graph_lib.node_valid(arch, masks)
      jax.block_until_ready(metanet._forward_jit(spec, params, graph, plan, valid))  # pylint: disable=protected-access
  res["compiles_over_5_pruned"] = metanet._forward_jit._cache_size() - before  # pylint: disable=protected-access
  res["peak_rss_mb"] = _memory.process_peak_rss_mb()
  res.update(host)
  print(json.dumps(res), flush=True)

  # VGG-19 fixture graph with the fixture's metanetwork.
  case = os.path.join(_networks.reference_fixtures(), "vgg19_c100_small")
  config, params = metanet.import_reference_metanet(
      dict(np.load(os.path.join(case, "metanet.npz"))), 0.05, 0.05)
  g = np.load(os.path.join(case, "graph.npz"))
  ei = g["edge_index"].astype(np.int32)
  vgg_graph = graph._replace(
      nodes=g["node_features"], edges=(g["edge_features"],), senders=ei[0], receivers=ei[1],
      n_node=np.array([g["node_features"].shape[0]], np.int32),
      n_edge=np.array([ei.shape[1]], np.int32))
  res = bench_case("vgg19_c100_small", config, params, vgg_graph, None, args.repeats)
  res["peak_rss_mb"] = _memory.process_peak_rss_mb()
  res.update(host)
  print(json.dumps(res), flush=True)

  # The same network and metanetwork as `transform` runs them: `to_graph` of the imported model
  # (the same nodes and edge count; edges in our order, classifier unscrambled) on the block path,
  # backward through `from_graph`.
  vgg_arch, vgg_vars = reference.import_reference_model(
      dict(np.load(os.path.join(case, "model.npz"))), "VGG19", 100)
  ours = jax.tree_util.tree_map(np.asarray, graph_lib.to_graph(vgg_arch, vgg_vars))
  res = bench_case("vgg19_c100_small_to_graph", config, params, ours, vgg_arch, args.repeats,
                   metanet.block_plan(vgg_arch))
  res["peak_rss_mb"] = _memory.process_peak_rss_mb()
  res.update(host)
  print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
