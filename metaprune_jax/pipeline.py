"""The whole MetaPrune pipeline as one mode (``all``) and the helpers its later stages share.

``all`` runs, in one workdir, ``pretrain`` -> ``generate`` -> ``meta_train`` -> ``visualize`` ->
``prune`` (docs/design.md section 2); every mode resumes from its own checkpoints, so re-running the
same command after a crash or a kill continues where it stopped. A stage whose input comes from
another run (``config.base_workdir``, ``config.data_models_dir``, ``config.metanet_dir``) is
skipped. At the end it prints where the report and the plots are.

Workdir layout (one pipeline, one folder)::

  <workdir>/checkpoints, metrics.jsonl, tb/, pretrain.json    pretrain (the base network)
  <workdir>/data_models/, generate/                           generate
  <workdir>/meta_train/                                       meta_train
  <workdir>/visualize/curves.{png,json}, epoch_XXX/           visualize
  <workdir>/prune/..., report.{json,txt}                      prune

(every training run's directory holds metrics.jsonl and tb/, TensorBoard event files)
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from metaprune_jax import modes
from metaprune_jax import sharding

# Test images are cached on the device when they take at most this many bytes (digits, CIFAR);
# larger test splits (ImageNet) are streamed from the input pipeline at every evaluation.
_CACHE_BYTES = 1 << 30


def source_dir(config, key: str, workdir: str) -> str:
  """``config.<key>`` (another run's workdir) or, when empty or absent, ``workdir``."""
  d = config.get(key, "") or ""
  return os.path.abspath(d or workdir)


def input_shape(dataset) -> tuple[int, int, int, int]:
  """NCHW shape MACs are counted at (``1 x 3 x H x W`` of the dataset's images)."""
  h, w = dataset.image_hw
  return (1, 3, int(h), int(w))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then rename): a kill never leaves half a file."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
  os.replace(tmp, path)


def jsonable(obj: Any) -> Any:
  """``obj`` after a JSON round trip (tuples -> lists, arrays -> lists), for comparisons."""
  return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                               else str(o)))


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def with_keep(schedule, keep: str):
  """A copy of a schedule section with ``keep`` ('last' | 'best') replaced."""
  d = schedule.to_dict() if hasattr(schedule, "to_dict") else dict(schedule)
  d["keep"] = keep
  return ml_collections.ConfigDict(d)


class MaskedEvaluator:
  """Test accuracy of a network under many channel masks, compiled once.

  The test split is turned into global device arrays once (when it is small enough), and the
  cached, jitted ``steps.eval_step`` of the architecture takes the masks as *arguments*, so a
  200-step pruning curve costs one compilation and 200 cheap evaluations.

  Args:
    arch: the architecture (the widths of the variables evaluated).
    dataset: the Dataset.
    batch_size: the global eval batch (divisible by the device count).
    split: 'test' or 'val' (the validation split carved from the training split).
  """

  def __init__(self, arch, dataset, batch_size: int, split: str = "test"):
    self.arch, self.dataset, self.batch_size = arch, dataset, int(batch_size)
    self.split = split
    self.mesh = sharding.make_mesh()
    sharding.check_batch_size(self.batch_size, self.mesh, "eval batch size")
    self._fn = sharding.jit_eval_step(arch, self.mesh)
    h, w = dataset.image_hw
    self._batches = None
    num = dataset.num_test if split == "test" else dataset.num_val
    if num * h * w * 3 * 4 <= _CACHE_BYTES:
      self._batches = [sharding.to_global(b, self.mesh)
                       for b in dataset.eval_batches(self.batch_size, split)]

  def _iter(self):
    if self._batches is not None:
      return iter(self._batches)
    return (sharding.to_global(b, self.mesh)
            for b in self.dataset.eval_batches(self.batch_size, self.split))

  def __call__(self, variables: Mapping, masks: Mapping | None = None) -> dict[str, float]:
    """``{'loss', 'accuracy'}`` on the evaluator's split.

    Args:
      variables: ``{'params', 'batch_stats'}`` at ``arch``'s widths.
      masks: ``{space: [width] float32}`` or None (pass masks of the same spaces every call
        to reuse one compilation; all-ones masks stand for "unpruned").
    """
    variables = sharding.replicate({"params": variables["params"],
                                    "batch_stats": variables["batch_stats"]}, self.mesh)
    masks = sharding.replicate(dict(masks), self.mesh) if masks is not None else None
    totals = None
    for batch in self._iter():
      out = self._fn(variables, masks, batch)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"loss": float(totals["loss_sum"]) / count,
            "accuracy": float(totals["correct"]) / count}


def masks_at(hist: Mapping, i: int) -> dict:
  """Step ``i`` of a ``pruning_trajectory`` history: ``{space: [width] float32}``."""
  return {s: jnp.asarray(np.asarray(h[i], np.float32)) for s, h in hist.items()}


def ones_like_masks(hist: Mapping) -> dict:
  return {s: jnp.ones((np.shape(h)[1],), jnp.float32) for s, h in hist.items()}


def run_all(config, workdir: str) -> dict:
  """The ``all`` mode: pretrain -> generate -> meta_train -> visualize -> prune.

  Stages whose input comes from another run's workdir (``config.base_workdir``,
  ``config.data_models_dir``, ``config.metanet_dir``) are skipped; with
  ``config.prune.method='group_l2'`` the meta-learning stages are skipped too.

  Returns:
    The prune report (a dict).
  """
  workdir = os.path.abspath(workdir)
  from metaprune_jax import prune_mode  # pylint: disable=g-import-not-at-top
  method = prune_mode.pruning_method(config)
  stages = []
  if not (config.get("base_workdir", "") or ""):
    stages.append("pretrain")
  if method == "metanet":
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
