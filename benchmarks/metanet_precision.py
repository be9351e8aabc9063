"""Metanetwork matmul precision: ``config.metanet.precision`` 'highest' against 'default'.

  python benchmarks/metanet_precision.py [--runs 5] [--case resnet56|digits]

Prints JSON: the ResNet-56 metanetwork (hidden 64, 8 layers, dense-block path) forward and
forward+backward at each precision, timed interleaved in one process (medians), and the largest
difference between their outputs. On XLA:CPU both compute float32 products (expect equal outputs
and equal times); on TPUs and on GPUs with TF32, 'default' uses bfloat16/TF32 passes
(``benchmarks/device_check.sh`` measures it there).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import metaprune_jax as mp
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--case", default="resnet56")
  args = p.parse_args()
  arch = mp.get_arch(args.case if args.case != "digits" else "resnet_tiny", 10)
  hw = (32, 32) if args.case != "digits" else (8, 8)
  v = jax.jit(mp.init_variables, static_argnums=(0, 2))(arch, jax.random.PRNGKey(0), hw)
  graph = graph_lib.to_graph(arch, v)
  plan = metanet_lib.block_plan(arch)
  layers, hidden = (8, 64) if args.case != "digits" else (2, 16)
  fns, outs = {}, {}
  for prec in ("highest", "default"):
    mc = metanet_lib.make_metanet_config(layers, hidden, graph_lib.node_dim(arch),
                                         graph_lib.edge_kinds(arch), 0.01, 0.01, precision=prec)
    phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(1))
    spec = metanet_lib._spec(mc)  # pylint: disable=protected-access
    fwd = jax.jit(lambda p, g, spec=spec: metanet_lib._forward(spec, p, g, plan))  # pylint: disable=protected-access
    outs[prec] = fwd(phi, graph)
    ct = tuple(jnp.ones_like(e) for e in outs[prec].edges)
    grad = jax.jit(jax.grad(lambda p, g, spec=spec, ct=ct: sum(jnp.vdot(a, b) for a, b in zip(
        metanet_lib._forward(spec, p, g, plan).edges, ct))))  # pylint: disable=protected-access
    fns[f"{prec}_forward"] = lambda fwd=fwd, phi=phi: fwd(phi, graph).nodes
    fns[f"{prec}_forward_backward"] = lambda grad=grad, phi=phi: grad(phi, graph)
  for f in fns.values():
    jax.block_until_ready(f())
  ts = {k: [] for k in fns}
  for _ in range(args.runs):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t)
  med = {k: round(float(np.median(v)), 4) for k, v in ts.items()}
  a, b = outs["highest"], outs["default"]
  diff = max([float(jnp.max(jnp.abs(a.nodes - b.nodes)))] +
             [float(jnp.max(jnp.abs(x - y))) for x, y in zip(a.edges, b.edges)])
  print(json.dumps({"device": str(jax.devices()[0]), "case": args.case, "seconds": med,
                    "default_over_highest_forward_backward": round(
                        med["default_forward_backward"] / med["highest_forward_backward"], 3),
                    "max_abs_output_diff": diff, "load_avg_1min": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
  main()
