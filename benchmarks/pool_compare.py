r"""Pools comparisons made on disjoint seeds into one ``compare.json`` (and ``compare.png``).

  python benchmarks/pool_compare.py --out=DIR RUN_A/compare.json RUN_B/compare.json
  python benchmarks/pool_compare.py --out=DIR \
      A/compare.json B/compare.json A_SL/compare.json@sl=sl_0.01 B_SL/compare.json@sl=sl_0.01

Each input is ``PATH`` (every method of that comparison) or ``PATH@METHOD`` or
``PATH@METHOD=LABEL`` (one method, under another name: a method run at other settings, as a
row of its own). Rows of one label from several files are pooled over their seeds: the per-seed
test and validation accuracies and speed-ups are concatenated and their mean and standard
deviation recomputed exactly as ``compare_methods.py`` computes them, the per-seed no-finetune
curves are put on the first file's speed-up grid and averaged, the importance shares and
metanetwork epochs concatenated. For a fair table every label must cover the same seeds and
targets, and no seed may appear twice in one label: anything else is an error naming the
label, and nothing is written. ``settings.pooled_from`` records every input with its seeds and
its own settings and which of its methods became which row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

import compare_methods  # noqa: E402  pylint: disable=g-import-not-at-top

def parse_input(arg: str) -> tuple[str, str, str]:
  """``PATH[@METHOD[=LABEL]]`` -> (path, method or '', label or '')."""
  path, at, rest = arg.partition("@")
  method, eq, label = rest.partition("=")
  if not path or (at and not method) or (eq and not label):
    raise ValueError(f"input {arg!r}: expected PATH, PATH@METHOD or PATH@METHOD=LABEL")
  return path, method, label or method


def pool(inputs: list[tuple[dict, str, str, str]]) -> dict:
  """Pools comparisons over disjoint seeds.

  Args:
    inputs: (compare.json dict, its path, method or '' for all, label) per input.

  Returns:
    A dict of ``compare_methods.py``'s compare.json form whose methods are the labels.

  Raises:
    ValueError: an unknown method, a seed twice in one label, or labels that do not cover
      the same seeds and targets.
  """
  rows: dict[str, dict] = {}
  pooled_from = []
  grid = None
  epochs: dict[str, int] = {}
  for summary, path, method, label in inputs:
    epochs.update(summary.get("metanet_epochs", {}))
    seeds = [int(s) for s in summary["settings"]["seeds"]]
    methods = summary["settings"]["methods"]
    if method and method not in methods:
      raise ValueError(f"{path}: no method {method!r} (it has {', '.join(methods)})")
    if grid is None:
      grid = np.asarray(summary["curves"][methods[0]]["speed_ups"])
    for m in [method] if method else methods:
      lab = label if method else m
      row = rows.setdefault(lab, {"seeds": [], "targets": {}, "per_seed": {},
                                  "importance": {}})
      twice = sorted(set(seeds) & set(row["seeds"]))
      if twice:
        raise ValueError(f"label {lab!r}: seed(s) {twice} come from more than one input")
      row["seeds"] += seeds
      for t, r in summary["targets"].items():
        if m not in r:
          raise ValueError(f"{path}: method {m!r} has no result at target {t}")
        tr = row["targets"].setdefault(t, {"values": [], "val_values": [], "speed_up": []})
        for key in tr:
          tr[key] += list(r[m][key])
      row["per_seed"].update(summary["curves"][m]["per_seed"])
      for key, vals in summary.get("importance", {}).get(m, {}).items():
        row["importance"].setdefault(key, []).extend(vals)
      if not pooled_from or pooled_from[-1]["path"] != path:
        pooled_from.append({"path": path, "seeds": seeds, "rows": {},
                            "settings": summary["settings"]})
      pooled_from[-1]["rows"][m] = lab
  seed_sets = {lab: sorted(r["seeds"]) for lab, r in rows.items()}
  target_sets = {lab: sorted(r["targets"], key=float) for lab, r in rows.items()}
  first = next(iter(rows))
  for lab in rows:
    if seed_sets[lab] != seed_sets[first]:
      raise ValueError(f"label {lab!r} covers seeds {seed_sets[lab]}, label {first!r} "
                       f"{seed_sets[first]}: a pooled table compares rows on the same seeds")
    if target_sets[lab] != target_sets[first]:
      raise ValueError(f"label {lab!r} has targets {target_sets[lab]}, label {first!r} "
                       f"{target_sets[first]}")
  targets: dict[str, dict] = {}
  curves: dict[str, dict] = {}
  for lab, row in rows.items():
    for t, tr in row["targets"].items():
      targets.setdefault(t, {})[lab] = tr
    curves[lab] = {"per_seed": row["per_seed"]}
  compare_methods.summarise(targets, curves, grid)
  settings = {"seeds": seed_sets[first], "targets": target_sets[first], "methods": list(rows),
              "pooled_from": pooled_from}
  importance = {lab: r["importance"] for lab, r in rows.items()}
  return {"settings": settings, "targets": targets, "curves": curves, "importance": importance,
          "metanet_epochs": epochs}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="+", help="PATH[@METHOD[=LABEL]] of a compare.json")
  parser.add_argument("--out", required=True, help="output folder (compare.json, compare.png)")
  parser.add_argument("--no_plot", action="store_true", help="do not write compare.png")
  args = parser.parse_args(argv)
  try:
    parsed = [parse_input(a) for a in args.inputs]
  except ValueError as e:
    parser.error(str(e))
  inputs = []
  for path, method, label in parsed:
    if not os.path.isfile(path):
      parser.error(f"no such file: {path}")
    with open(path) as f:
      inputs.append((json.load(f), path, method, label))
  try:
    summary = pool(inputs)
  except ValueError as e:
    parser.error(str(e))
  os.makedirs(args.out, exist_ok=True)
  out = os.path.join(args.out, "compare.json")
  with open(out, "w") as f:
    json.dump(summary, f)
  if not args.no_plot:
    compare_methods.plot_comparison(summary, os.path.join(args.out, "compare.png"))
  for t in sorted(summary["targets"], key=float):
    for m, r in summary["targets"][t].items():
      print(f"  {float(t):5g}x  {m:12s} test {r['mean']:.4f} +- {r['std']:.4f}  "
            f"(val {r['val_mean']:.4f}, {len(r['values'])} seeds)")
  print(f"wrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
