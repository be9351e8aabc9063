"""Ours against the PyTorch reference, on the same machine, interleaved in one process.

The issues' reference figures were measured once, on some 2-core machine; this VM's speed
drifts by up to ~2x between sessions (README, "Speed on a 2-core CPU"). This script measures
the reference's own code beside ours, round by round, so the speed-up (the issues' "at least
10x / 20x faster") is read off one machine at one time.

Needs the optional extras and a checkout of the reference (it is imported from there, never
copied into this repository):

  pip install torch==2.13.0        # first: the CPU wheel (see README)
  pip install torch_geometric      # pure Python, takes the torch above
  git clone https://github.com/Yewei-Liu/MetaPruning /path/to/MetaPruning
  python benchmarks/reference_head_to_head.py --reference_dir /path/to/MetaPruning

Cases (prints one JSON object each):
* ``metanet_resnet56``: the reference's ``nn.GNN.MyGNN`` (8 layers, hidden 64) and ours
  (``apply_metanet`` on the dense-block path, ``default_metanet_config('resnet56')``) with the
  same weights (ours exported with ``export_reference_metanet``) on the same full-width ResNet-56
  graph (ours via ``graph_to_reference_arrays``); forward, and forward+backward of the sum of
  squares of the network parameters read back from the output graph (the reference through its
  ``utils.convert.graph_to_state_dict``, ours through ``from_graph``), gradient w.r.t. the
  metanetwork. The outputs are checked to agree first.
* ``graph_resnet56`` / ``graph_resnet50``: the reference's ``state_dict_to_graph`` /
  ``graph_to_state_dict`` on the state dict ``export_reference_state_dict`` writes (its key
  order is the one the reference's positional converters read) against ``to_graph`` /
  ``from_graph``; the two graphs are checked to be equal first.

Each side runs in its own worker process (started once per case, then idle while the other
runs), so neither library's threads, allocator or resident memory slow the other: in one
process, our forward measured ~2x slower after the reference's forward+backward had run (its
~10 GB of buffers). Ours runs with huge pages, as the CLI does (``metaprune_jax.backends.host_memory``;
``METAPRUNE_HUGE_PAGES=0`` turns them off); the reference as PyTorch runs by default. Every
round times each contender ``--repeats`` times, one after another; the JSON gives the median
of all runs, the median and the worst of the per-round ratios (reference / ours), and the
per-round medians. torch runs on ``torch.get_num_threads()`` threads (2 here), XLA:CPU on its
own pool.

``utils.convert`` imports the reference's ViT module, which needs torchvision (not installable
beside the CPU torch wheel here); when torchvision is missing an empty stand-in module is
registered for it (the ViT converters are not used).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import types

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import numpy as np

_CASES = {"metanet": ("resnet56", 10), "graph_resnet56": ("resnet56", 10),
          "graph_resnet50": ("resnet50", 1000)}


# --------------------------------------------------------------------------------------------
# Workers: one process per side and case; `name` on stdin -> JSON list of seconds on stdout.
# --------------------------------------------------------------------------------------------


def _import_reference(reference_dir):
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.abspath(reference_dir))
  try:
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except
    stub = types.ModuleType("generate_dataset.vision_transformer")
    stub.vit_b_16 = stub.my_vit_b_16 = None
    sys.modules["generate_dataset.vision_transformer"] = stub
  from nn import GNN  # pylint: disable=import-outside-toplevel
  from utils import convert  # pylint: disable=import-outside-toplevel
  return torch, GNN, convert


def _inputs(case):
  """The network, its graph, the metanetwork (ours, numpy/jax) shared by both sides."""
  import _networks  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import metaprune_jax as mp  # pylint: disable=import-outside-toplevel
  from metaprune_jax.metanetwork import metanet  # pylint: disable=import-outside-toplevel
  arch = mp.get_arch(*_CASES[case])
  variables = _networks.random_variables(arch)
  config = metanet.default_metanet_config("resnet56")
  params = metanet.init_metanet(config, jax.random.PRNGKey(1))
  return arch, variables, config, params


def _ours(case):
  """{name: fn} of our side (each fn blocks until its result is ready); outputs for checks."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import metaprune_jax as mp  # pylint: disable=import-outside-toplevel
  from metaprune_jax.graphs import graph as graph_lib  # pylint: disable=import-outside-toplevel
  from metaprune_jax.metanetwork import metanet  # pylint: disable=import-outside-toplevel
  arch, variables, config, params = _inputs(case)
  ready = jax.block_until_ready
  if case != "metanet":
    graph = mp.to_graph(arch, variables)
    return {"ours_to_graph": lambda: ready(mp.to_graph(arch, variables)),
            "ours_from_graph": lambda: ready(mp.from_graph(arch, graph))}
  graph = jax.tree_util.tree_map(np.asarray, mp.to_graph(arch, variables))
  plan = metanet.block_plan(arch)
  spec = metanet._spec(config)  # pylint: disable=protected-access

  def loss(p, g):
    out = metanet._forward(spec, p, g, plan)  # pylint: disable=protected-access
    new = graph_lib.from_graph(arch, out)
    return sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(new["params"]))

  g = graph._replace(edges=tuple(graph.edges))
  grad_fn = jax.jit(jax.value_and_grad(loss))
  return {"ours_forward": lambda: ready(mp.apply_metanet(config, params, graph, plan=plan)),
          "ours_forward_backward": lambda: ready(grad_fn(params, g))}


def _reference(case, reference_dir):
  """{name: fn} of the reference's side, and the checks against our outputs."""
  import jax  # pylint: disable=import-outside-toplevel
  import metaprune_jax as mp  # pylint: disable=import-outside-toplevel
  from metaprune_jax.metanetwork import metanet  # pylint: disable=import-outside-toplevel
  torch, GNN, convert = _import_reference(reference_dir)
  arch, variables, config, params = _inputs(case)
  name = arch.name if case != "metanet" else "resnet56"
  cpu = torch.device("cpu")
  t = lambda a: torch.from_numpy(np.array(a))
  sd = {k: t(v) for k, v in
        mp.export_reference_state_dict(arch, variables, num_batches_tracked=True).items()}
  ref_graph = convert.state_dict_to_graph(name, sd, cpu)
  node_index, nf, ei, ef = ref_graph
  graph = mp.to_graph(arch, variables)
  ours = mp.graph_to_reference_arrays(arch, graph)
  if case != "metanet":
    same = bool(np.array_equal(nf.numpy(), ours["node_features"]) and
                np.array_equal(ei.numpy(), ours["edge_index"]))
    if isinstance(ef, (list, tuple)):
      same &= all(np.array_equal(e.numpy(), ours[f"edge_features_{e.shape[1]}"]) for e in ef)
    else:
      same &= bool(np.array_equal(ef.numpy(), ours["edge_features"]))
    fns = {"reference_to_graph": lambda: convert.state_dict_to_graph(name, sd, cpu),
           "reference_from_graph": lambda: convert.graph_to_state_dict(name, sd, *ref_graph,
                                                                       cpu)}
    return fns, {"graphs_equal": same, "num_nodes": int(nf.shape[0]),
                 "num_edges": int(ei.shape[1])}
  spec = metanet._spec(config)  # pylint: disable=protected-access
  x, ea = t(ours["node_features"]), t(ours["edge_features"])
  ref = GNN.MyGNN(spec.num_layers, spec.hidden, x.shape[1], ea.shape[1],
                  spec.node_res_ratio, spec.edge_res_ratio)
  ref.load_state_dict({k: t(v) for k, v in mp.export_reference_metanet(config, params).items()})
  with torch.no_grad():
    rn, re_ = ref(x, ei, ea)
  out = mp.graph_to_reference_arrays(
      arch, mp.apply_metanet(config, params, graph, plan=metanet.block_plan(arch)))
  scale = max(float(np.abs(out["edge_features"]).max()), 1e-30)
  agree = max(float(np.abs(rn.numpy() - out["node_features"]).max()),
              float(np.abs(re_.numpy() - out["edge_features"]).max())) / scale

  def ref_fwd():
    with torch.no_grad():
      return ref(x, ei, ea)

  def ref_fwd_bwd():
    ref.zero_grad(set_to_none=True)
    nodes, edges = ref(x, ei, ea)
    new = convert.graph_to_state_dict(name, sd, node_index, nodes, ei, edges, cpu)
    loss = sum((v * v).sum() for v in new.values() if v.requires_grad)
    loss.backward()
    return loss

  jax.clear_caches()
  return ({"reference_forward": ref_fwd, "reference_forward_backward": ref_fwd_bwd},
          {"outputs_max_abs_diff_rel": agree, "num_nodes": int(x.shape[0]),
           "num_edges": int(ea.shape[0]), "hidden": spec.hidden,
           "num_layers": spec.num_layers, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads()})


def _worker(side, case, reference_dir, repeats):
  if side == "ours":
    host = _memory.huge_pages_first()  # restarts this worker with huge pages, as the CLI runs
    fns, info = _ours(case), host
  else:
    fns, info = _reference(case, reference_dir)
  for fn in fns.values():  # warm-up and compilation
    fn()
  print(json.dumps({"ready": sorted(fns), **info}), flush=True)
  for line in sys.stdin:
    name = line.strip()
    if not name:
      break
    fn, times = fns[name], []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)


# --------------------------------------------------------------------------------------------
# Parent: starts both workers of a case, alternates them round by round.
# --------------------------------------------------------------------------------------------


def _run_case(case, args):
  workers, info, owner = {}, {"case": case}, {}
  for side in ("reference", "ours"):
    cmd = [sys.executable, os.path.abspath(__file__), "--reference_dir", args.reference_dir,
           "--repeats", str(args.repeats), "--worker", f"{side}:{case}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(proc.stdout.readline())
    for name in hello.pop("ready"):
      owner[name] = proc
    info.update(hello)
    workers[side] = proc
  order = ([("reference_forward", "ours_forward"),
            ("reference_forward_backward", "ours_forward_backward")] if case == "metanet" else
           [("reference_to_graph", "ours_to_graph"), ("reference_from_graph", "ours_from_graph")])
  runs = {n: [] for pair in order for n in pair}
  per_round = {n: [] for n in runs}
  try:
    for _ in range(args.rounds):
      for name in runs:
        owner[name].stdin.write(name + "\n")
        owner[name].stdin.flush()
        times = json.loads(owner[name].stdout.readline())
        runs[name].extend(times)
        per_round[name].append(float(np.median(times)))
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()
  info.update({f"{k}_median_s": float(np.median(v)) for k, v in runs.items()})
  info.update({f"{k}_round_medians_s": [round(x, 5) for x in v] for k, v in per_round.items()})
  for ref, ours in order:
    ratios = np.asarray(per_round[ref]) / np.asarray(per_round[ours])
    info[f"speedup_{ours}"] = float(np.median(ratios))
    info[f"speedup_{ours}_worst_round"] = float(np.min(ratios))
  return info


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reference_dir", required=True,
                      help="a checkout of github.com/Yewei-Liu/MetaPruning")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cases", default="metanet,graph_resnet56,graph_resnet50")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    side, case = args.worker.split(":")
    _worker(side, case, args.reference_dir, args.repeats)
    return
  for case in args.cases.split(","):
    if case not in _CASES:
      raise SystemExit(f"unknown case {case!r}; known: {', '.join(_CASES)}")
    res = _run_case(case, args)
    res.update(rounds=args.rounds, repeats=args.repeats, load_avg_1min=os.getloadavg()[0])
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
