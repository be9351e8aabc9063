r"""The meta-training recipe search, on validation and on seeds the final comparison never uses.

  python benchmarks/recipe_search.py --out=/tmp/recipes --seeds=100 \
      --recipes=v1_ref_long,v2_balanced,v3_strong --targets=3.0,6.0,10.0

Each recipe is a key of ``benchmarks/recipes.py`` (``configs/digits.py`` plus the overrides
written there). For every search seed the base network and the data models are
made once (``<out>/shared/seed_<s>``, or ``--shared``: reused by every recipe), then
``benchmarks/compare_methods.py``'s ``run`` compares the recipe's metanetwork against the
baselines (``group_l2``, ``sl``, ``random``, run once with the shared settings) through the same
``prune`` pipeline and budget. The score of a recipe is its mean *validation* accuracy after the
final finetune over the targets (ties: the no-finetune validation curve's mean); the test split is
written beside it but never read by the selection.

Writes ``<out>/recipe_search.json`` (per recipe: validation and test accuracy per target, the
share of channels under 0.1 normalised importance after its transform, the score) and
``<out>/recipe_search.png``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare_methods  # noqa: E402  pylint: disable=g-import-not-at-top

# --out, --seeds (search seeds: never the final run's 0-4) and --targets are compare_methods'.
_OUT, _SEEDS, _TARGETS = compare_methods._OUT, compare_methods._SEEDS, compare_methods._TARGETS  # pylint: disable=protected-access
_RECIPES = flags.DEFINE_list("recipes", ["v2_balanced", "v5_early_decay", "v4_gentle",
                                         "v1_ref_long"], "Keys of benchmarks/recipes.py.")
_BASELINES = flags.DEFINE_list("baselines", ["group_l2", "sl", "random"], "Baselines.")


_SHARED = flags.DEFINE_string(
    "shared", "", "Folder holding each search seed's base network and data models "
    "(seed_<s>/, made there if missing): another round's <out>/shared, so that a new round "
    "(a new --out) reuses them and the baselines' cached stages. Default: <out>/shared.")
_EPOCH = flags.DEFINE_integer(
    "metanet_epoch", None, "Override every recipe's prune.metanet_epoch (0: chosen on the "
    "validation curves, as the shipped config does; -1: the last epoch). Default: the "
    "recipe's own (the last epoch unless it says otherwise).")


def _recipe(name):
  c = compare_methods.load_config(os.path.join(ROOT, "benchmarks", "recipes.py") + f":{name}")
  if _EPOCH.value is not None:
    c.prune.metanet_epoch = int(_EPOCH.value)
  return c


def summarise(rows: dict) -> dict:
  """Adds each entry's validation score (mean val accuracy over the targets)."""
  for r in rows.values():
    r["score_val"] = float(np.mean([t["val_mean"] for t in r["targets"].values()]))
  return rows


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("--out is required")
  seeds = [int(s) for s in _SEEDS.value]
  if set(seeds) & {0, 1, 2, 3, 4}:
    raise app.UsageError("search seeds must differ from the final comparison's seeds 0-4")
  targets = [float(t) for t in _TARGETS.value]
  out = os.path.abspath(_OUT.value)
  shared = os.path.abspath(_SHARED.value) if _SHARED.value else os.path.join(out, "shared")
  configs = {name: _recipe(name) for name in _RECIPES.value}
  first = configs[_RECIPES.value[0]]
  for name, c in configs.items():  # recipes vary meta-training only: one base and data-model set
    for key in ("arch", "dataset", "pretrain", "generate", "finetune_after_metanet",
                "finetune_after_pruning", "prune"):
      mine, theirs = c[key], first[key]
      if key == "prune":  # which metanetwork epoch a recipe prunes with is the recipe's
        mine, theirs = (dict(x.to_dict(), metanet_epoch=None) for x in (mine, theirs))
      if mine != theirs:
        raise app.UsageError(f"recipe {name} changes config.{key}; the search shares one base "
                             "network and data-model set per seed")
  from metaprune_jax import modes  # pylint: disable=g-import-not-at-top
  for s in seeds:
    c = first.copy_and_resolve_references()
    c.seed = s
    d = os.path.join(shared, f"seed_{s}")
    if not os.path.exists(os.path.join(d, "pretrain.json")):
      modes.get("pretrain")(c, d)
    modes.get("generate")(c, d)  # skips finished data models
  rows = {}
  base_config = _recipe(_RECIPES.value[0])
  base_config.reference_compat = False  # baselines apply no metanetwork: the scramble is moot
  base = compare_methods.run(base_config, seeds, targets, _BASELINES.value,
                             os.path.join(out, "baselines"), reuse=shared, plot=False)
  for m in _BASELINES.value:
    rows[m] = {"targets": {t: base["targets"][t][m] for t in base["targets"]},
               "under_0.1": base["importance"][m]["under_0.1"]}
  for name in _RECIPES.value:
    res = compare_methods.run(_recipe(name), seeds, targets, ["metanet"],
                              os.path.join(out, name), reuse=shared, plot=False)
    rows[f"metanet:{name}"] = {"targets": {t: res["targets"][t]["metanet"]
                                           for t in res["targets"]},
                               "under_0.1": res["importance"]["metanet"]["under_0.1"]}
  rows = summarise(rows)
  best = max((k for k in rows if k.startswith("metanet:")), key=lambda k: rows[k]["score_val"])
  summary = {"seeds": seeds, "targets": targets, "rows": rows, "best_recipe_on_val": best}
  from metaprune_jax.modes import common as pipeline  # pylint: disable=g-import-not-at-top
  pipeline.write_json(os.path.join(out, "recipe_search.json"), summary)
  _plot(summary, os.path.join(out, "recipe_search.png"))
  for k, r in rows.items():
    print(f"{k:28s} val score {r['score_val']:.4f}  " + "  ".join(
        f"{float(t):g}x val {v['val_mean']:.3f} test {v['mean']:.3f}"
        for t, v in r["targets"].items()) + f"  under0.1 {np.mean(r['under_0.1']):.2f}")
  print(f"best recipe on validation: {best}")


def _plot(summary, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for k, r in summary["rows"].items():
    ts = sorted(r["targets"], key=float)
    ax.plot([float(t) for t in ts], [r["targets"][t]["val_mean"] for t in ts], "o-", label=k,
            lw=2.2 if k == summary["best_recipe_on_val"] else 1.0)
  ax.set_xlabel("target speed-up (MACs)")
  ax.set_ylabel("validation accuracy after the final finetune")
  ax.set_title(f"recipe search, seeds {summary['seeds']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
