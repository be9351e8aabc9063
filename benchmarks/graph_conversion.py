"""Network <-> graph conversion speed (issue 3): prints one JSON object.

For a full-width ResNet-56 (CIFAR-10) and a full-width ResNet-50 (1000 classes), measures
``to_graph``, ``from_graph`` and their round trip: the first call (trace + compile + run) and
the median wall time of ``--runs`` calls after ``--warmup`` calls (outputs blocked on), plus
the graph's size and the process's peak resident memory (``resource.getrusage``).

Run:
  python benchmarks/graph_conversion.py [--runs 20] [--warmup 3] [--archs resnet56,resnet50]

The script restarts itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35: malloc
asks for transparent huge pages), as the CLI runs (``metaprune_jax.backends.host_memory``);
``METAPRUNE_HUGE_PAGES=0`` measures without. Each call's outputs are fresh buffers of ~100 MB
(ResNet-50) that glibc maps anew, so with 4 KiB pages a call spends much of its time in page
faults (``minor_faults_per_call`` in the output: ~25,000 for ResNet-50's to_graph); with huge
pages it takes a few hundred.

Reference implementation (PyTorch, the 2-core CPU machine of the issue): ResNet-56 state dict
-> graph 37 ms, graph -> state dict 8 ms; ResNet-50 (23,723 nodes, 15.4M edges) 0.87 s and
14 ms, 350 MB of graph.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import _networks
import jax
import numpy as np

from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.nets import zoo

_ARCHS = {"resnet56": ("resnet56", 10, (32, 32)), "resnet50": ("resnet50", 1000, (224, 224))}


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(fn, *args, runs, warmup):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times, faults = [], _minor_faults()
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return {"first_call_s": round(first, 4), "median_ms": round(1e3 * statistics.median(times), 3),
          "min_ms": round(1e3 * min(times), 3),
          "minor_faults_per_call": (_minor_faults() - faults) // runs}


def bench(name: str, runs: int, warmup: int) -> dict:
  zoo_name, num_classes, _ = _ARCHS[name]
  arch = zoo.get_arch(zoo_name, num_classes)
  variables = _networks.random_variables(arch)
  t0 = time.perf_counter()
  layout = graph_lib.graph_layout(arch)
  layout_s = time.perf_counter() - t0
  rss_before = _memory.process_peak_rss_mb()
  res = {"arch": name, "num_classes": num_classes, "layout_build_s": round(layout_s, 4)}
  res["to_graph"] = _time(graph_lib.to_graph, arch, variables, runs=runs, warmup=warmup)
  graph = graph_lib.to_graph(arch, variables)
  res["from_graph"] = _time(graph_lib.from_graph, arch, graph, runs=runs, warmup=warmup)
  res["round_trip"] = _time(lambda v: graph_lib.from_graph(arch, graph_lib.to_graph(arch, v)),
                            variables, runs=runs, warmup=warmup)
  back = graph_lib.from_graph(arch, graph)
  exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
              zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables)))
  edge_bytes = sum(int(e.nbytes) for e in graph.edges)
  res["graph"] = {
      "nodes": int(graph.nodes.shape[0]),
      "edges": int(graph.senders.shape[0]),
      "edges_per_kind": {str(k): int(e.shape[0]) for k, e in zip(layout.edge_kinds, graph.edges)},
      "feature_bytes": int(graph.nodes.nbytes) + edge_bytes,
      "index_bytes": int(graph.senders.nbytes) + int(graph.receivers.nbytes),
      "total_mb": round((int(graph.nodes.nbytes) + edge_bytes + int(graph.senders.nbytes)
                         + int(graph.receivers.nbytes)) / 2**20, 1),
  }
  res["num_variables"] = int(graph_lib.flat_spec(arch).size)
  res["round_trip_bit_exact"] = bool(exact)
  res["peak_rss_mb_before"] = round(rss_before, 1)
  res["peak_rss_mb_after"] = round(_memory.process_peak_rss_mb(), 1)
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--archs", default="resnet56,resnet50")
  args = p.parse_args(argv)
  host = _memory.huge_pages_first()
  dev = jax.devices()[0]
  out = {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
         "num_cpus": os.cpu_count(), "jax": jax.__version__,
         **host,
         "python": platform.python_version(), "runs": args.runs, "warmup": args.warmup,
         "results": [bench(n, args.runs, args.warmup) for n in args.archs.split(",")]}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
