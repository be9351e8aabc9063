"""Orbax checkpoints of a training run: arrays, the config and the architecture, side by side.

A run directory `<dir>/checkpoints/<step>/` holds two items:

* `arrays`: `{'train': TrainState, 'best': variables}` (`best` is the best-test-accuracy
  variables so far when the schedule keeps the best epoch, `{}` otherwise), saved with
  `StandardSave`, restored onto the live shardings;
* `meta`: JSON with the run `signature` (architecture JSON, dataset, schedule, seed, ...: what
  must match for a resume to be meaningful), the full config, `arch` (`Arch.to_json()`), the
  per-epoch metric history and bookkeeping (best accuracy/epoch, finished).

Orbax writes each step into a temporary folder and renames it on commit, so a save interrupted by
SIGKILL is never seen as the latest checkpoint. Resuming a workdir that holds a run of another
signature, or a checkpoint that cannot be read, raises `CheckpointError` before anything is
written. `PreemptionGuard` turns SIGTERM into a flag that the training loop polls (agreeing over
processes) to save once more and exit.
"""

import json
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ARRAYS = "arrays"
META = "meta"


class CheckpointError(RuntimeError):
  """A checkpoint that does not belong to this run or cannot be read."""


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def diff_signatures(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Keys whose values differ between two run signatures (after a JSON round trip)."""
  saved, current = _jsonable(saved), _jsonable(current)
  return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


class Checkpointer:
  """An Orbax `CheckpointManager` for one run directory.

  Args:
    directory: the run directory; checkpoints go to `<directory>/checkpoints` (made absolute).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (call `wait()` before reading or exiting).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(directory), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(ARRAYS, META))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of `step` (default: latest). Raises CheckpointError."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {self.directory}.")
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
      return dict(out[META])
    except Exception as e:
      raise CheckpointError(
        f"The checkpoint {self._step_dir(step)} cannot be read ({type(e).__name__}: {e}); it "
        f"is corrupt or incomplete. Nothing was overwritten: move it away to resume from an "
        f"earlier step, or use another workdir.") from e

  def check_signature(self, signature: dict[str, Any], step: int | None = None) -> dict:
    """Raises CheckpointError if the run in this directory has another signature.

    Returns:
      The checkpoint's metadata.
    """
    meta = self.restore_meta(step)
    differing = diff_signatures(meta.get("signature", {}), signature)
    if differing:
      saved = _jsonable(meta.get("signature", {}))
      now = _jsonable(signature)
      detail = "; ".join(f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in differing)
      raise CheckpointError(
        f"{self.directory} holds a run of another configuration ({detail}). Nothing was "
        f"overwritten; use another workdir, or restore the original settings to resume.")
    return meta

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores arrays onto the shardings/shapes of `target` and the metadata.

    Args:
      target: a pytree like the saved arrays (concrete arrays or ShapeDtypeStructs) whose
        shardings the restored arrays take.
      step: the step (default: latest).

    Raises:
      CheckpointError: missing, corrupt, or of another structure.
    """
    step = self.latest_step() if step is None else step
    meta = self.restore_meta(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = self._manager.restore(
        step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract)}))
    except Exception as e:
      raise CheckpointError(
        f"The arrays of checkpoint {self._step_dir(step)} cannot be restored into this run's "
        f"state ({type(e).__name__}: {e}). It is corrupt, or was written by another "
        f"architecture/optimizer. Nothing was overwritten.") from e
    return out[ARRAYS], meta

  def restore_raw(self, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the saved arrays as nested dicts of numpy arrays (no target), and the meta."""
    step = self.latest_step() if step is None else step
    meta = self.restore_meta(step)
    try:
      out = self._manager.restore(
        step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore()}))
    except Exception as e:
      raise CheckpointError(
        f"The arrays of checkpoint {self._step_dir(step)} cannot be read ({type(e).__name__}: "
        f"{e}); it is corrupt or incomplete.") from e
    return jax.tree.map(np.asarray, out[ARRAYS]), meta

  def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
    """Saves (asynchronously) unless `step` is already saved."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(**{
      ARRAYS: ocp.args.StandardSave(arrays), META: ocp.args.JsonSave(_jsonable(meta))}),
      force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Context manager: SIGTERM sets a flag instead of killing the process.

  `should_stop()` is True on every process as soon as any process got SIGTERM (a cross-process
  all-gather when there are several processes), so all of them save the same step and exit.
  """

  def __init__(self):
    self._flag = False
    self._previous = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self._flag = True

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread: no handler, never preempted.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self._flag
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
    return bool(np.any(flags))
