"""Checks a run config before any work: one clear error naming the field and the fix.

`python -m metaprune_jax` calls :func:`check_config` after parsing its flags and before anything
is written, and prints a :class:`ConfigError` as one line on stderr (exit status 2), e.g.::

  config error: config.pretrain.batch_size=0: must be a positive integer

What is checked (the rest is left to the modes, which raise their own errors):

* names: ``mode``, ``dataset``, ``arch``, ``metanet.precision``, every schedule's ``optimizer`` and ``keep``,
  ``prune.method`` (and its alias ``pruning.method``), the ``normalizer`` and ``criterion``
  fields of ``meta_train``, ``visualize`` and ``prune``; with ``prune.method='sl'`` (or
  ``meta_train.imitate_sl`` > 0, whose targets sparse learning makes), its strength (> 0) and
  epochs (not 0, and equal to the transform budget every method gets);
* sizes: ``prune.round_to`` (>= 1), ``meta_train.reg_warmup_epochs`` (0 to the epochs), ``meta_train.prune_aware`` (0 or > 1), ``meta_train.prune_aware_steps`` (>= 0), ``meta_train.prune_aware_lr`` (> 0), ``meta_train.imitate_sl`` (>= 0), ``prune.max_pruning_ratio`` (in (0, 1]), ``data_workers`` (>= 0), ``epochs``, ``batch_size``, ``eval_batch_size`` of every schedule section (any section
  holding both ``epochs`` and ``batch_size``) and the other batch/step counts, positive integers;
* sharding: the global batches of the data-parallel schedules (and the evaluation batches of
  ``visualize`` and ``finetune_after_pruning``, ``meta_train.models_per_step``) divisible by the
  device count, and at least that many training data models (``generate.num_models`` less
  the validation share) when the run meta-trains; the ``generate`` schedules, which a multi-host job trains on each process's own
  devices (``generate.per_process``), by the local device count there.
"""

from collections.abc import Mapping
from typing import Any

PRUNE_METHODS = ("metanet", "group_l2", "sl", "random", "metanet_sl")
OPTIMIZERS = ("sgd", "adamw")
KEEP = ("last", "best", "best_from_start")  # as train.KEEP
CRITERIA = ("l2", "random")
NORMALIZERS = ("max", "mean", "none")
PRECISIONS = ("default", "high", "highest", "fastest", "bfloat16", "tensorfloat32", "float32")
# (jax.lax.Precision's names, as metanet.PRECISIONS; config_check does not import jax)

# The schedule sections that `train.fit` runs data parallel over a mesh, by path.
_FIT_SCHEDULES = ("pretrain", "generate.train", "generate.finetune", "finetune_after_metanet",
                  "finetune_after_pruning")


class ConfigError(ValueError):
  """An invalid config field; `str(e)` is ``config.<field>=<value>: <what to do>``.

  Attributes:
    field: the dotted field name below ``config`` (e.g. ``pretrain.batch_size``).
    value: its value.
    fix: what is wrong and how to fix it.
  """

  def __init__(self, field: str, value: Any, fix: str):
    self.field, self.value, self.fix = field, value, fix
    super().__init__(f"config.{field}={value!r}: {fix}")


def _get(config, path: str, default=None):
  node = config
  for key in path.split("."):
    if not isinstance(node, Mapping) and not hasattr(node, "get"):
      return default
    if key not in node:
      return default
    node = node[key]
  return node


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _positive(field: str, value) -> int:
  if not _is_int(value) or value <= 0:
    raise ConfigError(field, value, "must be a positive integer")
  return value


def _one_of(field: str, value, known, what: str = "") -> None:
  if value not in known:
    raise ConfigError(field, value, f"unknown {what or field.split('.')[-1]}; choose one of "
                      f"{', '.join(repr(k) for k in known)}")


def _divisible(field: str, value: int, devices: int, which: str) -> None:
  if value % devices:
    multiple = max(devices, value - value % devices)
    raise ConfigError(field, value, f"must be divisible by the {which} device count {devices}; "
                      f"use a multiple of {devices} (e.g. {multiple})")


def _sections(config, prefix: str = ""):
  """(path, section) of every sub-ConfigDict, depth first."""
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and hasattr(value, "items"):
      path = f"{prefix}{key}"
      yield path, value
      yield from _sections(value, path + ".")


def check_config(config, *, num_devices: int | None = None,
                 num_local_devices: int | None = None, num_processes: int | None = None) -> None:
  """Raises ConfigError for the first invalid field of `config` (see the module docstring).

  Args:
    config: the run's ConfigDict (as `configs/*.py` build it).
    num_devices: the global device count (default: `jax.device_count()`).
    num_local_devices: this process's device count (default: `jax.local_device_count()`).
    num_processes: the process count (default: `jax.process_count()`).

  Raises:
    ConfigError: the first invalid field, naming it and the fix.
  """
  from metaprune_jax import modes  # pylint: disable=g-import-not-at-top
  from metaprune_jax.nets import zoo  # pylint: disable=g-import-not-at-top

  _one_of("mode", _get(config, "mode"), sorted(modes.MODES), "mode")
  dataset = _get(config, "dataset")
  if dataset is not None:
    from metaprune_jax.runtime import data  # pylint: disable=g-import-not-at-top
    _one_of("dataset", dataset, sorted(data.SPECS), "dataset")
  arch = _get(config, "arch")
  if arch is not None and (not isinstance(arch, str) or arch.lower() not in zoo.names()):
    _one_of("arch", arch, zoo.names(), "architecture")

  # Sections with epochs and a batch size: the schedules and meta_train.
  for path, section in _sections(config):
    if "epochs" in section and "batch_size" in section:
      _positive(f"{path}.epochs", section["epochs"])
      _positive(f"{path}.batch_size", section["batch_size"])
      if "eval_batch_size" in section:
        _positive(f"{path}.eval_batch_size", section["eval_batch_size"])
      if "optimizer" in section:
        _one_of(f"{path}.optimizer", section["optimizer"], OPTIMIZERS, "optimizer")
      if "keep" in section:
        _one_of(f"{path}.keep", section["keep"], KEEP, "keep")
      for key in ("ckpt_every_steps",):
        if key in section and (not _is_int(section[key]) or section[key] < 0):
          raise ConfigError(f"{path}.{key}", section[key], "must be an integer >= 0")

  for field in ("meta_train.chunk_size",
                "meta_train.eval_batch_size", "visualize.steps", "visualize.eval_batch_size",
                "prune.steps", "prune.latency_batch", "prune.latency_runs",
                "generate.num_models"):
    value = _get(config, field)
    if value is not None:
      _positive(field, value)
  for field in ("meta_train.models_per_step", "meta_train.val_batches",
                "meta_train.batches_per_model"):
    value = _get(config, field)
    if value is not None and (not _is_int(value) or value < 0):
      raise ConfigError(field, value, "must be an integer >= 0 (0: the default; "
                        "batches_per_model 0: the whole training split)")

  value = _get(config, "prune.round_to")
  if value is not None:
    _positive("prune.round_to", value)
  value = _get(config, "prune.max_pruning_ratio")
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not 0.0 < float(value) <= 1.0):
    raise ConfigError("prune.max_pruning_ratio", value, "must be a number in (0, 1] (the "
                      "largest share of a group's channels the final pruning may remove; 1: no "
                      "limit, the reference)")
  value = _get(config, "data_workers")
  if value is not None and (not _is_int(value) or value < 0):
    raise ConfigError("data_workers", value, "must be an integer >= 0 (0: prefetch in a thread "
                      "of this process; N: N grain worker processes)")
  value = _get(config, "metanet.precision")
  if value is not None:
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
      _one_of("metanet.precision", value, PRECISIONS, "matmul precision")
  for section in ("meta_train", "visualize", "prune"):
    value = _get(config, f"{section}.normalizer")
    if value is not None:
      _one_of(f"{section}.normalizer", value, NORMALIZERS, "normalizer")
  value = _get(config, "meta_train.reg_form")
  if value is not None and value not in ("absolute", "relative"):
    # regularizer.parse_form's rule, without importing jax here
    share = value.split(":", 1)[1] if isinstance(value, str) and value.startswith("share:") else ""
    try:
      ok = 0.0 < float(share) < 1.0
    except ValueError:
      ok = False
    if not ok:
      raise ConfigError("meta_train.reg_form", value, "unknown regulariser form; choose one of "
                        "'absolute', 'relative' or 'share:Q' with 0 < Q < 1")
  value = _get(config, "meta_train.prune_aware")
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not (value == 0 or value > 1)):
    raise ConfigError("meta_train.prune_aware", value, "must be 0 (off) or a speed-up > 1 over "
                      "the data models")
  value = _get(config, "meta_train.imitate_on")
  if value is not None:
    _one_of("meta_train.imitate_on", value, ("weights", "activations", "both"),
            "imitation distance")
  value = _get(config, "meta_train.bn")
  if value is not None:
    _one_of("meta_train.bn", value, ("running", "batch"), "BatchNorm mode")
  value = _get(config, "meta_train.prune_aware_bn")
  if value is not None:
    _one_of("meta_train.prune_aware_bn", value, ("running", "batch"), "BatchNorm mode")
  value = _get(config, "meta_train.prune_aware_steps")
  if value is not None and (not _is_int(value) or value < 0):
    raise ConfigError("meta_train.prune_aware_steps", value, "must be an integer >= 0 (0: the "
                      "pruned network's loss as it is; N: after N differentiated SGD steps)")
  value = _get(config, "meta_train.prune_aware_lr")
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not value > 0):
    raise ConfigError("meta_train.prune_aware_lr", value, "must be a learning rate > 0")
  value = _get(config, "meta_train.reg_warmup_epochs")
  if value is not None:
    epochs = _get(config, "meta_train.epochs")
    if not _is_int(value) or value < 0:
      raise ConfigError("meta_train.reg_warmup_epochs", value, "must be an integer >= 0 (0: no "
                        "warm-up)")
    if _is_int(epochs) and value > epochs:
      raise ConfigError("meta_train.reg_warmup_epochs", value, f"longer than meta_train.epochs="
                        f"{epochs}: the regulariser would never reach its strength; use at most "
                        "the epochs")
  for section in ("visualize", "prune"):
    value = _get(config, f"{section}.criterion")
    if value is not None:
      _one_of(f"{section}.criterion", value, CRITERIA, "criterion")
  method = _get(config, "prune.method")
  if method is not None:
    _one_of("prune.method", method, PRUNE_METHODS, "pruning method")
  alias = _get(config, "pruning.method")
  if alias:
    _one_of("pruning.method", alias, PRUNE_METHODS + ("",), "pruning method")
  imitate = _get(config, "meta_train.imitate_sl")
  if imitate is not None and (isinstance(imitate, bool) or not isinstance(imitate, (int, float))
                              or not imitate >= 0):
    raise ConfigError("meta_train.imitate_sl", imitate, "must be a weight >= 0 (0: off; > 0: "
                      "meta-training also pulls each transformed data model towards its "
                      "sparse-learning-trained version)")
  # sparse learning runs in the transform budget every method gets (and makes the targets of
  # meta_train.imitate_sl)
  if (alias or method) in ("sl", "metanet_sl") or (imitate or 0) > 0:
    reg = _get(config, "prune.sl.reg", 1e-2)
    if not isinstance(reg, (int, float)) or not reg > 0:
      raise ConfigError("prune.sl.reg", reg, "the sparse-learning strength must be > 0")
    epochs = _get(config, "prune.sl.epochs", -1)
    budget = _get(config, "finetune_after_metanet.epochs")
    if epochs == 0:
      raise ConfigError("prune.sl.epochs", epochs, "sparse learning needs epochs: -1 (the "
                        "transform budget, finetune_after_metanet.epochs) or that budget")
    if _is_int(epochs) and epochs > 0 and budget is not None and epochs != budget:
      raise ConfigError("prune.sl.epochs", epochs, f"cannot be matched to the transform budget "
                        f"every method gets (finetune_after_metanet.epochs={budget}); use -1")

  # The device counts: the last check, the only one that starts jax's backend.
  if num_devices is None or num_local_devices is None or num_processes is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_local_devices = (jax.local_device_count() if num_local_devices is None
                         else num_local_devices)
    num_processes = jax.process_count() if num_processes is None else num_processes
  per_process = num_processes > 1 and bool(_get(config, "generate.per_process", True))
  for path in _FIT_SCHEDULES:
    section = _get(config, path)
    if not section or "batch_size" not in section:
      continue
    local = per_process and path.startswith("generate.")
    devices, which = (num_local_devices, "local") if local else (num_devices, "global")
    _divisible(f"{path}.batch_size", section["batch_size"], devices, which)
    if "eval_batch_size" in section:
      _divisible(f"{path}.eval_batch_size", section["eval_batch_size"], devices, which)
  value = _get(config, "visualize.eval_batch_size")
  if value is not None:
    _divisible("visualize.eval_batch_size", value, num_devices, "global")
  value = _get(config, "meta_train.models_per_step")
  if value:
    _divisible("meta_train.models_per_step", value, num_devices, "global")
  _check_meta_train_models(config, num_devices)


def _check_meta_train_models(config, num_devices: int) -> None:
  """A meta-training step holds ``models_per_step`` training data models (default: one per
  device), so there must be at least that many; checked when the run meta-trains."""
  if _get(config, "mode") not in ("all", "meta_train") or (_get(config, "metanet_dir") or ""):
    return
  if _get(config, "mode") == "all" and (_get(config, "prune.method") or "metanet") not in (
      "metanet", "metanet_sl") and not _get(config, "pruning.method"):
    return
  num = _get(config, "generate.num_models")
  if not _is_int(num):
    return
  n_val = int(round(num * float(_get(config, "meta_train.val_fraction", 0.2))))
  n_train = num - n_val
  per_step = _get(config, "meta_train.models_per_step") or num_devices
  if n_train >= 1 and per_step > n_train:
    raise ConfigError(
        "meta_train.models_per_step", _get(config, "meta_train.models_per_step"),
        f"a meta-training step needs {per_step} training data models (one per device of "
        f"{num_devices}) but generate.num_models={num} leaves {n_train} after the validation "
        f"share; generate at least {per_step + n_val} models, or meta-train on "
        f"at most {n_train} device(s) (CUDA_VISIBLE_DEVICES, --config.mode=meta_train)")
