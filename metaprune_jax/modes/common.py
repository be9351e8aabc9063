"""What the run modes share: workdir paths, JSON files, masked evaluation, the metanetwork runs.

The modes (``pretrain``, ``generate``, ``meta_train``, ``visualize``, ``prune``, ``all``) never
import each other: what one of them reads of another's outputs lives here (the meta_train
checkpoints: :func:`load_metanet`; the visualize curves: :func:`select_epoch`; the method a
config names: :func:`pruning_method`), and a mode that runs another goes through the registry
(:mod:`metaprune_jax.modes`).

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

from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.nets.arch import Arch
from metaprune_jax.runtime import checkpoint as ckpt_lib
from metaprune_jax.runtime import sharding

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
  """A copy of a schedule section with ``keep`` (one of ``train.KEEP``) replaced."""
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


# The methods whose transform starts from the metanetwork's output (they need a meta_train run),
# and those that train with the sparse-learning regulariser (``config.prune.sl``).
METANET_METHODS = ("metanet", "metanet_sl")
SPARSE_METHODS = ("sl", "metanet_sl")


def pruning_method(config) -> str:
  """``config.pruning.method`` when set (the issue's spelling), else ``config.prune.method``."""
  alias = config.get("pruning", {}).get("method", "") if config.get("pruning") else ""
  return alias or config.prune.get("method", "metanet")


# ---- the metanetwork runs (meta_train's outputs) ----
META_DIR = "meta_train"


def metanet_config_for(config, arch: Arch) -> ml_collections.ConfigDict:
  """``config.metanet`` with the node/edge dims of ``arch``'s graph filled in and checked."""
  mc = metanet_lib.make_metanet_config(
      config.metanet.num_layers, config.metanet.hidden, graph_lib.node_dim(arch),
      graph_lib.edge_kinds(arch), config.metanet.node_res_ratio, config.metanet.edge_res_ratio,
      config.metanet.get("precision", "default"),
      bool(config.metanet.get("importance_input", False)))
  for key, want in (("node_dim", mc.node_dim), ("edge_dims", mc.edge_dims)):
    given = config.metanet.get(key, None)
    if given not in (None, 0, ()) and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(want)):
      raise ValueError(f"config.metanet.{key}={given} does not fit {arch.name}'s graph ({want})")
  return mc


def split_models(num: int, val_fraction: float) -> tuple[list[int], list[int]]:
  """Positions of the train/validation data models: the last ``val_fraction`` validate."""
  n_val = int(round(num * val_fraction))
  n_train = num - n_val
  if n_val < 1 or n_train < 1:
    raise ValueError(f"{num} data models cannot be split {1 - val_fraction:.0%}/"
                     f"{val_fraction:.0%} into non-empty train and validation sets; generate "
                     f"at least {int(np.ceil(2 / max(min(val_fraction, 1 - val_fraction), 1e-9)))}")
  return list(range(n_train)), list(range(n_train, num))


def metanet_epochs(workdir: str) -> list[int]:
  """Epochs with a saved metanetwork under ``<workdir>/meta_train``.

  Args:
    workdir: the run's workdir (the one passed to the ``meta_train`` mode).

  Returns:
    The saved epochs as a sorted list of ints; ``[]`` when there is no such run (never raises
    for a missing directory).
  """
  d = os.path.join(os.path.abspath(workdir), META_DIR)
  if not os.path.isdir(os.path.join(d, "checkpoints")):
    return []
  c = ckpt_lib.Checkpointer(d, max_to_keep=None, async_save=False)
  try:
    return sorted(c.all_steps())
  finally:
    c.close()


def load_metanet(workdir: str, epoch: int | None = None, arch: Arch | None = None):
  """``(metanet_config, params, epoch)`` of a meta_train run (``epoch`` None or -1: the last).

  Args:
    workdir: the run's workdir.
    epoch: the saved epoch to read (:func:`metanet_epochs`); None or negative: the last.
    arch: optional; check that the metanetwork was trained for this architecture (name, node
      width and edge kinds).

  Returns:
    ``(metanet_config, params, epoch)``: the ``ConfigDict`` of :func:`make_metanet_config`'s
    fields (``edge_dims`` a tuple), the params pytree as jax arrays (as
    :func:`init_metanet`'s, ``convs`` leaves with a leading ``[L, ...]`` layer axis), and the
    epoch read (int).

  Raises:
    ckpt_lib.CheckpointError: no such run or epoch.
    ValueError: ``arch`` given and the metanetwork was trained for another architecture.
  """
  d = os.path.join(os.path.abspath(workdir), META_DIR)
  epochs = metanet_epochs(workdir)
  if not epochs:
    raise ckpt_lib.CheckpointError(f"no metanetwork checkpoint in {d}; run `meta_train` first")
  if epoch is None or epoch < 0:
    epoch = epochs[-1]
  if epoch not in epochs:
    raise ckpt_lib.CheckpointError(f"no metanetwork checkpoint for epoch {epoch} in {d}; "
                                   f"available: {epochs}")
  c = ckpt_lib.Checkpointer(d, max_to_keep=None, async_save=False)
  try:
    arrays, meta = c.restore_raw(epoch)
  finally:
    c.close()
  mc = ml_collections.ConfigDict(meta["metanet_config"])
  mc.edge_dims = tuple(mc.edge_dims)
  if arch is not None:
    trained_for = Arch.from_json(meta["arch"])
    if (trained_for.name != arch.name or graph_lib.edge_kinds(arch) != tuple(mc.edge_dims)
        or graph_lib.node_dim(arch) != mc.node_dim):
      raise ValueError(f"the metanetwork in {d} was trained for {trained_for.name} "
                       f"(node dim {mc.node_dim}, edge kinds {tuple(mc.edge_dims)}), not for "
                       f"{arch.name}")
  params = jax.tree_util.tree_map(jnp.asarray, arrays["params"])
  return mc, params, int(epoch)


# ---- the validation curves (visualize's outputs) ----
BASELINE = "baseline"
DIRNAME = "visualize"


def curve_score(curve: dict, lo: float, hi: float, points: int = 50) -> float:
  """Mean accuracy of a pruning curve on an even grid of speed-ups in ``[lo, hi]`` (each grid
  point takes the accuracy of the last step not past it): the area under the curve, per unit."""
  s, a = np.asarray(curve["speed_ups"]), np.asarray(curve["accuracies"])
  grid = np.linspace(lo, hi, points)
  idx = np.clip(np.searchsorted(s, grid, side="right") - 1, 0, len(a) - 1)
  return float(np.mean(a[idx]))


def select_epoch(workdir: str) -> tuple[int, dict]:
  """The metanetwork epoch whose *validation* pruning curve (``visualize``) is best.

  The score of a curve is its mean validation accuracy, without finetuning, over the speed-ups
  from the data model's own to ``max_speed_up`` (:func:`curve_score`); the baseline's score
  (no metanetwork) is returned beside the epochs' for comparison.

  Args:
    workdir: the run whose ``visualize/curves.json`` holds the curves.

  Returns:
    ``(epoch, {'scores': {key: score}, 'baseline': score, 'range': [lo, hi]})``.

  Raises:
    FileNotFoundError: no curves (run the ``visualize`` mode first).
  """
  path = os.path.join(os.path.abspath(workdir), DIRNAME, "curves.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"choosing the metanetwork epoch on validation needs {path}: run "
                            "the `visualize` mode first (or set config.prune.metanet_epoch)")
  stored = read_json(path)
  curves = stored["curves"]
  lo = float(stored["data_model_speed_up"])
  hi = min(float(c["speed_ups"][-1]) for c in curves.values())
  scores = {k: curve_score(c, lo, hi) for k, c in curves.items()}
  epochs = {k: int(c["epoch"]) for k, c in curves.items() if k != BASELINE}
  if not epochs:
    raise FileNotFoundError(f"{path} holds no metanetwork epoch's curve")
  best = max(epochs, key=lambda k: (scores[k], -epochs[k]))
  return epochs[best], {"scores": scores, "baseline": scores.get(BASELINE), "range": [lo, hi],
                        "by": "mean validation accuracy of the no-finetune pruning curve"}
