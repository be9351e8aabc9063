r"""Every round of the recipe search in one figure, from the saved results.

  python benchmarks/recipe_search_plot.py [--results benchmarks/results/recipe_search] \
      [--out docs/images/recipe_search_all.png]

Reads ``recipe_search.json`` of the first round (the folder itself), ``round2/``, ``round3/``
and ``round6/``, and the per-recipe ``compare.json`` copies of rounds 4-5
(``round4/<recipe>.json``), all on search seed 100 (rounds 7-8, on seeds 101-103, are tables
in docs/recipe_search.md); draws, per recipe, its validation score (mean validation accuracy
after the final finetune over the targets: what chose the recipe) beside the baselines', and
the share of channels under 0.1 normalised importance after the metanetwork and its finetune.
Prints the rows as JSON.
"""

import argparse
import glob
import json
import os

import numpy as np


def _rows(results):
  rows = {}
  for sub in ("", "round2", "round3", "round6"):
    path = os.path.join(results, sub, "recipe_search.json")
    if os.path.exists(path):
      for k, r in json.load(open(path))["rows"].items():
        if k in rows:  # the baselines, recomputed by each round (equal): the first one's
          continue
        rows[k] = {"score_val": r["score_val"], "under_0.1": float(np.mean(r["under_0.1"])),
                   "round": sub or "round1"}
  for path in sorted(glob.glob(os.path.join(results, "round4", "v*.json"))):
    name = os.path.basename(path)[:-5]
    d = json.load(open(path))
    vals = [t["metanet"]["val_mean"] for t in d["targets"].values()]
    rows[f"metanet:{name}"] = {"score_val": float(np.mean(vals)),
                               "under_0.1": float(np.mean(d["importance"]["metanet"]["under_0.1"])),
                               "round": "round4-5"}
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ap.add_argument("--results", default=os.path.join(root, "benchmarks", "results", "recipe_search"))
  ap.add_argument("--out", default=os.path.join(root, "docs", "images", "recipe_search_all.png"))
  args = ap.parse_args()
  rows = _rows(args.results)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  recipes = sorted((k for k in rows if k.startswith("metanet:")),
                   key=lambda k: int(k.split(":v")[1].split("_")[0]))
  fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
  x = np.arange(len(recipes))
  colours = {"round1": "C0", "round2": "C1", "round3": "C2", "round4-5": "C3", "round6": "C4"}
  floor = 0.96  # the differences that matter are within a few points; lower bars are labelled
  scores = [rows[k]["score_val"] for k in recipes]
  a1.bar(x, [max(v, floor) for v in scores], color=[colours[rows[k]["round"]] for k in recipes])
  for xi, v in zip(x, scores):
    if v < floor:
      a1.text(xi, floor + 0.001, f"{v:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
  for base, style in (("group_l2", "--"), ("sl", ":"), ("random", "-.")):
    if base in rows:
      a1.axhline(rows[base]["score_val"], color="k", ls=style, lw=1,
                 label=f"{base} {rows[base]['score_val']:.4f}")
  a1.set_ylim(floor, 1.0)
  a1.set_ylabel("validation score\n(axis from 0.96)")
  a1.legend(loc="lower left", fontsize=8)
  a1.set_title("Recipe search on search seed 100 (digits, resnet8): validation decides")
  a2.bar(x, [rows[k]["under_0.1"] for k in recipes],
         color=[colours[rows[k]["round"]] for k in recipes])
  if "sl" in rows:
    a2.axhline(rows["sl"]["under_0.1"], color="k", ls=":", lw=1, label="sl")
    a2.legend(loc="upper left", fontsize=8)
  a2.set_ylabel("share under 0.1\nafter the transform")
  a2.set_xticks(x)
  a2.set_xticklabels([k.split(":")[1] for k in recipes], rotation=60, ha="right", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
