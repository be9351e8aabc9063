r"""Markdown tables of a comparison and a recipe search, for docs/results.md and
docs/recipe_search.md.

  python benchmarks/results_tables.py --compare=DIR/compare.json \
      --recipes=benchmarks/results/recipe_search/recipe_search.json

Prints the tables: test accuracy after the final finetune (mean +- std over seeds, and the
speed-up reached), validation accuracy, the no-finetune curves at a few speed-ups, the share of
channels under 0.1 normalised importance after each method's transform, and the recipe search.
"""

import json
import sys

import numpy as np
from absl import app
from absl import flags

_COMPARE = flags.DEFINE_string("compare", "", "A compare.json.")
_RECIPES = flags.DEFINE_string("recipes", "", "A recipe_search.json.")
_AT = flags.DEFINE_list("curve_at", ["2", "4", "6", "8", "10"], "Speed-ups of the curve table.")


def compare_tables(d: dict, at) -> str:
  methods = d["settings"]["methods"]
  targets = sorted(d["targets"], key=float)
  n = len(d["settings"]["seeds"])
  out = [f"Test accuracy after the final finetune (mean +- std over {n} seeds; speed-up reached "
         "in brackets, mean):", "",
         "| method | " + " | ".join(f"{float(t):g}x" for t in targets) + " |",
         "| --- |" + " --- |" * len(targets)]
  for m in methods:
    cells = []
    for t in targets:
      r = d["targets"][t][m]
      cells.append(f"{r['mean']:.4f} +- {r['std']:.4f} ({np.mean(r['speed_up']):.2f}x)")
    out.append(f"| {m} | " + " | ".join(cells) + " |")
  out += ["", "Validation accuracy after the final finetune (what selection sees):", "",
          "| method | " + " | ".join(f"{float(t):g}x" for t in targets) + " |",
          "| --- |" + " --- |" * len(targets)]
  for m in methods:
    out.append(f"| {m} | " + " | ".join(
        f"{d['targets'][t][m]['val_mean']:.4f} +- {d['targets'][t][m]['val_std']:.4f}"
        for t in targets) + " |")
  out += ["", "No-finetune test accuracy of the network right before the final pruning, pruned "
          "by its method's criterion to each speed-up (mean over seeds):", "",
          "| method | " + " | ".join(f"{float(a):g}x" for a in at) + " |",
          "| --- |" + " --- |" * len(at)]
  for m in methods:
    c = d["curves"][m]
    grid = np.asarray(c["speed_ups"])
    vals = []
    for a in at:
      i = int(np.argmin(np.abs(grid - float(a))))
      v = c["test_mean"][i]
      vals.append("-" if v is None or np.isnan(v) else f"{v:.3f}")
    out.append(f"| {m} | " + " | ".join(vals) + " |")
  out += ["", "Share of channels under 0.1 normalised group-L2 importance after the transform "
          "(before it: the initial network):", "", "| method | before | after |",
          "| --- | --- | --- |"]
  for m in methods:
    imp = d["importance"][m]
    out.append(f"| {m} | {np.mean(imp['under_0.1_before']):.3f} | "
               f"{np.mean(imp['under_0.1']):.3f} +- {np.std(imp['under_0.1']):.3f} |")
  if d.get("metanet_epochs"):
    out += ["", "Metanetwork epoch chosen on validation curves, per seed: " +
            ", ".join(f"seed {s}: {e}" for s, e in d["metanet_epochs"].items())]
  return "\n".join(out)


def recipe_table(d: dict) -> str:
  targets = [f"{t}" for t in d["targets"]]
  out = [f"Recipe search (seeds {d['seeds']}; validation decides, test shown only):", "",
         "| run | val score | " + " | ".join(f"{float(t):g}x val / test" for t in targets) +
         " | under 0.1 |", "| --- | --- |" + " --- |" * len(targets) + " --- |"]
  for k, r in d["rows"].items():
    cells = [f"{r['targets'][t]['val_mean']:.3f} / {r['targets'][t]['mean']:.3f}"
             for t in targets]
    mark = " (chosen)" if k == d["best_recipe_on_val"] else ""
    out.append(f"| {k}{mark} | {r['score_val']:.4f} | " + " | ".join(cells) +
               f" | {np.mean(r['under_0.1']):.2f} |")
  return "\n".join(out)


def main(argv):
  del argv
  if _COMPARE.value:
    with open(_COMPARE.value) as f:
      print(compare_tables(json.load(f), _AT.value))
    print()
  if _RECIPES.value:
    with open(_RECIPES.value) as f:
      print(recipe_table(json.load(f)))
  if not (_COMPARE.value or _RECIPES.value):
    sys.exit("give --compare and/or --recipes")


if __name__ == "__main__":
  app.run(main)
