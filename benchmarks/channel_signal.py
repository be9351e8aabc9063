r"""Are a network's low-importance channels silent? The signal behind group-L2 importance.

  python benchmarks/channel_signal.py --out=signal.json --target=3 \
      --runs=sl=ROUND/baselines,v48=ROUND/v48_imitate10_8x64:metanet

For each run (``name=DIR[:method]``, ``DIR`` a ``compare_methods.py``/``recipe_search.py`` output
with ``seed_<s>/<method>_<target>/report.json``; the method defaults to ``name``), every seed's
network right after its method's transform (the one the final pruning is given) is read, and for
every pruning group with BatchNorm each channel's max-normalised group-L2 importance is set beside
its signal: the root mean square of ``ReLU(BatchNorm(.))`` over the validation split, BatchNorm
on the split's batch statistics, summed over the group's BatchNorm layers
(``metatrain.bn_signal``), relative to the group's strongest channel. Writes per run: the share
of channels under 0.1 importance; the share of all channels that are silent (signal under 0.05 of
the group's strongest); among the channels under 0.1, the share that is silent and the quantiles
(10/25/50/75/90%) of their relative signal, against the other channels'.
"""

import glob
import json
import os

import numpy as np
from absl import app
from absl import flags

_RUNS = flags.DEFINE_list("runs", [], "name=DIR[:method], ...")
_TARGET = flags.DEFINE_float("target", 3.0, "Which target's run to read (the transform stage "
                             "is the same for every target of a seed).")
_OUT = flags.DEFINE_string("out", "", "Write the JSON here too.")
_SILENT = 0.05
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def network_signal(arch, variables, images) -> tuple[np.ndarray, np.ndarray]:
  """``(importance, relative signal)`` of every channel of every group with BatchNorm."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from metaprune_jax.metanetwork import metatrain  # pylint: disable=g-import-not-at-top
  from metaprune_jax.prune import groups as groups_lib  # pylint: disable=g-import-not-at-top
  sig = metatrain.bn_signal(arch, variables["params"], variables["batch_stats"], None,
                            jnp.asarray(images))
  imps, rels = [], []
  for g, imp in zip(groups_lib.pruning_groups(arch),
                    groups_lib.group_importance(arch, variables, "max")):
    bns = [m.layer for m in g.members if m.kind == "bn" and m.layer in sig]
    if not bns:
      continue
    s = sum(np.asarray(sig[l], np.float64) for l in bns)
    imps.append(np.asarray(imp, np.float64))
    rels.append(s / np.max(s))
  return np.concatenate(imps), np.concatenate(rels)


def _quantiles(a: np.ndarray) -> list:
  return np.round(np.quantile(a, _QUANTILES), 3).tolist() if a.size else []


def summarise(imp: np.ndarray, rel: np.ndarray) -> dict:
  """The shares and signal quantiles of one network's (or several pooled) channels."""
  low = imp < 0.1
  return {"channels": int(imp.size), "under_0.1": float(np.mean(low)),
          "silent": float(np.mean(rel < _SILENT)),
          "silent_among_under_0.1": float(np.mean(rel[low] < _SILENT)) if low.any() else None,
          "signal_under_0.1": _quantiles(rel[low]), "signal_rest": _quantiles(rel[~low])}


def main(argv):
  del argv
  from metaprune_jax.runtime import data as data_lib  # pylint: disable=g-import-not-at-top
  from metaprune_jax.runtime import train as train_lib  # pylint: disable=g-import-not-at-top
  if not _RUNS.value:
    raise app.UsageError("--runs is required: name=DIR[:method], ...")
  out = {"target": _TARGET.value, "silent_below": _SILENT, "quantiles": list(_QUANTILES),
         "runs": {}}
  for spec in _RUNS.value:
    if "=" not in spec:
      raise app.UsageError(f"--runs entry {spec!r} is not name=DIR[:method]")
    name, rest = spec.split("=", 1)
    d, _, method = rest.partition(":")
    method = method or name
    reports = sorted(glob.glob(os.path.join(d, "seed_*", f"{method}_{_TARGET.value:g}",
                                            "report.json")))
    if not reports:
      raise app.UsageError(f"no {method}_{_TARGET.value:g}/report.json under {d}/seed_*")
    per_seed, imps, rels = {}, [], []
    for path in reports:
      with open(path) as f:
        report = json.load(f)
      config, arch, variables, _ = train_lib.load_run(report["stage_dirs"]["transform"])
      dataset = data_lib.dataset_from_config(config)
      images = np.concatenate([b["image"][b["mask"] > 0]
                               for b in dataset.eval_batches(256, "val")])
      imp, rel = network_signal(arch, variables, images)
      per_seed[os.path.basename(os.path.dirname(os.path.dirname(path)))] = summarise(imp, rel)
      imps.append(imp)
      rels.append(rel)
    out["runs"][name] = {"method": method, "dir": os.path.abspath(d), "per_seed": per_seed,
                         "all": summarise(np.concatenate(imps), np.concatenate(rels))}
    a = out["runs"][name]["all"]
    print(f"{name:12s} under 0.1 {a['under_0.1']:.2f}, silent {a['silent']:.2f}, among them "
          f"{a['silent_among_under_0.1']}, their signal {a['signal_under_0.1']}, "
          f"the rest {a['signal_rest']}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
