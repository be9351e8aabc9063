"""The ``all`` mode: the whole MetaPrune pipeline in one workdir.

``all`` runs ``pretrain`` -> ``generate`` -> ``meta_train`` -> ``visualize`` -> ``prune``
(docs/design.md section 2), each through the mode registry; every mode resumes from its own
checkpoints, so re-running the same command after a crash or a kill continues where it stopped.
A stage whose input comes from another run (``config.base_workdir``, ``config.data_models_dir``,
``config.metanet_dir``) is skipped. At the end it prints where the report and the plots are
(the workdir layout: :mod:`metaprune_jax.modes.common`).
"""

import os

from absl import logging

from metaprune_jax import modes
from metaprune_jax.modes import common


def run_all(config, workdir: str) -> dict:
  """The ``all`` mode: pretrain -> generate -> meta_train -> visualize -> prune.

  Stages whose input comes from another run's workdir (``config.base_workdir``,
  ``config.data_models_dir``, ``config.metanet_dir``) are skipped; with
  ``config.prune.method='group_l2'`` the meta-learning stages are skipped too.

  Returns:
    The prune report (a dict).
  """
  workdir = os.path.abspath(workdir)
  method = common.pruning_method(config)
  stages = []
  if not (config.get("base_workdir", "") or ""):
    stages.append("pretrain")
  if method in common.METANET_METHODS:
    if not (config.get("metanet_dir", "") or ""):
      if not (config.get("data_models_dir", "") or ""):
        stages.append("generate")
      stages.append("meta_train")
    if config.visualize.get("enabled", True):
      stages.append("visualize")
  stages.append("prune")
  logging.info("all: stages %s in %s", stages, workdir)
  result = None
  for name in stages:
    logging.info("all: ---- %s ----", name)
    result = modes.get(name)(config, workdir)
  report_path = os.path.join(workdir, "report.json")
  lines = ["", "MetaPrune pipeline finished.",
           f"  report: {report_path} (table: {os.path.join(workdir, 'report.txt')})",
           f"  pruned network: {os.path.join(workdir, 'prune', 'final')} (Orbax), "
           f"{os.path.join(workdir, 'prune', 'final_state_dict.npz')} (reference state dict)"]
  if "visualize" in stages:
    lines.append(f"  curves: {os.path.join(workdir, 'visualize', 'curves.png')} "
                 f"(+ curves.json)")
  if isinstance(result, dict):
    lines.append(f"  speed-up {result['speed_up']:.3f}x (target {result['target_speed_up']}), "
                 f"accuracy {result['accuracy_before']:.4f} -> {result['accuracy_after']:.4f}")
  print("\n".join(lines), flush=True)
  return result
