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
written. `PreemptionGuard` tells the training loop when to save once more and exit after a
preemption notice (SIGTERM).

Only Orbax's public API is used (`orbax.checkpoint` and its public modules `options`, `args`,
`type_handlers`, `multihost`):

* every manager creates its step directories synchronously
  (`AsyncOptions(create_directories_asynchronously=False)`; the arrays are still written in the
  background). Asynchronous creation coordinates the processes through keys named after a
  process-wide count of save operations, which assumes that every process saves in lockstep;
  the per-process runs below break that assumption, the synchronous path never uses the keys.
* A run on one process's devices inside a multi-host job (`processes=(me,)`) gets a manager of
  its own: `MultiprocessingOptions(primary_host=None, active_processes={me},
  barrier_sync_key_prefix=...)` (every process is the primary of its own directory, as in
  Orbax's per-process local checkpointing), and its arrays are written by Orbax's
  `ArrayHandler(primary_host=None, replica_id=None)`, which writes the first replica this process
  holds. Orbax's writers refuse arrays that live on one process's devices when there are
  several processes, so those arrays are handed over as replicated arrays over every device of
  the job (`jax.make_array_from_single_device_arrays` from this process's copies; nothing is
  computed on them) and read back as numpy arrays.
"""

import contextlib
import json
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

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


@contextlib.contextmanager
def process_local_checkpointing(name: str, timeout_s: int):
  """Scope in which each process runs and checkpoints runs of its own (`processes=(me,)`).

  Such checkpointers coordinate nothing across processes (see the module docstring), so the
  scope only waits, on exit, for every process to finish its share: barrier `name` (unique per
  use) over all processes, up to `timeout_s` seconds (Orbax's `multihost.sync_global_processes`
  on the jax.distributed barrier).
  """
  yield
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, timeout=timeout_s,
                                        processes=set(range(jax.process_count())))


def _as_job_array(x, mesh: jax.sharding.Mesh) -> jax.Array:
  """This process's copy of `x` as an array replicated over `mesh` (every device of the job).

  Orbax writes arrays of a multi-host job from the processes that hold them, and refuses arrays
  held by one process alone; this hands it this process's own value (the copies on the other
  processes' devices are never read: the writer takes this process's first replica).
  """
  value = np.asarray(x)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  local = [jax.device_put(value, d) for d in sharding.addressable_devices]
  return jax.make_array_from_single_device_arrays(value.shape, sharding, local)


class Checkpointer:
  """An Orbax `CheckpointManager` for one run directory.

  Args:
    directory: the run directory; checkpoints go to `<directory>/checkpoints` (made absolute).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (call `wait()` before reading or exiting).
    processes: the processes that call this checkpointer: None (or all of them) for a run of
      every process (each takes part in every save); `(jax.process_index(),)` for a run of
      this process alone inside a multi-host job (its own devices, its own directory; see the
      module docstring).

  Raises:
    ValueError: `processes` names a subset of several processes, or not the calling one.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True,
               processes: tuple[int, ...] | None = None):
    self.directory = os.path.join(os.path.abspath(directory), "checkpoints")
    everyone = set(range(jax.process_count()))
    self._host_local = processes is not None and set(processes) != everyone
    # Synchronous directory creation (see the module docstring); the writes stay asynchronous.
    async_options = ocp.options.AsyncOptions(create_directories_asynchronously=False)
    if not self._host_local:
      multi = ocp.options.MultiprocessingOptions()
      arrays = ocp.StandardCheckpointHandler(multiprocessing_options=multi)
    else:
      if set(processes) != {jax.process_index()}:
        raise ValueError(f"A checkpointer of a subset of the processes runs on one process, the "
                         f"calling one ({jax.process_index()}), not on {sorted(processes)}.")
      me = jax.process_index()
      multi = ocp.options.MultiprocessingOptions(
          primary_host=None, active_processes={me}, barrier_sync_key_prefix=f"metaprune_p{me}")
      registry = ocp.type_handlers.create_type_handler_registry(
          (np.ndarray, ocp.type_handlers.NumpyHandler()),  # reads only (restore_type)
          (jax.Array, ocp.type_handlers.ArrayHandler(primary_host=None, replica_id=None,
                                                     use_replica_parallel=False)))
      arrays = ocp.PyTreeCheckpointHandler(multiprocessing_options=multi,
                                           type_handler_registry=registry)
      self._job_mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("job",))
      os.makedirs(self.directory, exist_ok=True)  # Orbax leaves it to us with active_processes
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not self._host_local,
                                           enable_async_checkpointing=async_save,
                                           multiprocessing_options=multi,
                                           async_options=async_options)
    handlers = {ARRAYS: arrays, META: ocp.JsonCheckpointHandler(multiprocessing_options=multi)}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

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
    if self._host_local:
      abstract = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = self._manager.restore(
        step, args=ocp.args.Composite(**{ARRAYS: self._restore_args(abstract)}))
      if self._host_local:
        out = {ARRAYS: jax.tree.map(
            lambda x, t: jax.device_put(x, t.sharding) if hasattr(t, "sharding") else x,
            out[ARRAYS], target)}
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
      # numpy targets from the saved shapes: readable on any topology (a run saved on 8
      # devices is read on 1)
      saved = self._manager.item_metadata(step)[ARRAYS]
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved.tree)
      out = self._manager.restore(
        step, args=ocp.args.Composite(**{ARRAYS: self._restore_args(target)}))
    except Exception as e:
      raise CheckpointError(
        f"The arrays of checkpoint {self._step_dir(step)} cannot be read ({type(e).__name__}: "
        f"{e}); it is corrupt or incomplete.") from e
    return jax.tree.map(np.asarray, out[ARRAYS]), meta

  def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
    """Saves (asynchronously) unless `step` is already saved."""
    if step in self._manager.all_steps():
      return
    if self._host_local:
      host = jax.device_get(arrays)
      save = ocp.args.PyTreeSave(jax.tree.map(lambda x: _as_job_array(x, self._job_mesh), host))
    else:
      save = ocp.args.StandardSave(arrays)
    self._manager.save(step, args=ocp.args.Composite(**{
      ARRAYS: save, META: ocp.args.JsonSave(_jsonable(meta))}), force=True)

  def _restore_args(self, abstract):
    if not self._host_local:
      return ocp.args.StandardRestore(abstract)
    return ocp.args.PyTreeRestore(abstract, restore_args=jax.tree.map(
        lambda x: ocp.RestoreArgs(restore_type=np.ndarray), abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Context manager around a training loop: when to save once more and exit after SIGTERM.

  Call `should_stop(step)` after every training step; when it returns True, save `step` and exit.

  * A multi-host run (`local=False` with several processes) uses JAX's preemption service:
    `jax.distributed` turns SIGTERM into a preemption notice that reaches every process, and
    `multihost_utils.reached_preemption_sync_point(step)` is True on all of them at the same
    step (the largest step any process had reached, plus one), so all save that step. No
    collective runs per step (the service talks to the coordinator in the background only once
    a notice arrived); Orbax's `CheckpointManager.save` reports its steps to the same service.
    Step ids are the run's training steps, the same on every process (JAX's requirement).
  * One process, or a run on this process's devices alone (`local=True`: the other processes
    do not follow it step by step, so there is no step to agree on): a SIGTERM handler of this
    process sets a flag, read without any communication. The previous Python handler is put
    back on exit. (In a multi-host job this takes SIGTERM from JAX's notifier for the rest of the
    process: a later multi-host run then ends on SIGTERM at once and resumes from its last
    checkpoint.)
  """

  def __init__(self, local: bool = False):
    self._flag = False
    self._previous = None
    self._installed = False
    self._jax_service = jax.process_count() > 1 and not local

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self._flag = True

  def __enter__(self):
    if self._jax_service:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._installed = True
    except ValueError:  # not the main thread: no handler, never preempted.
      self._installed = False
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False
    return False

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` (the number of training steps taken) and exit."""
    if not self._jax_service:
      return self._flag
    try:
      reached = multihost_utils.reached_preemption_sync_point(int(step))
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False
    if reached:
      logging.warning("Preemption notice: saving a checkpoint at step %d and exiting.", step)
    return reached
