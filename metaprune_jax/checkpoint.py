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

import asyncio
import contextlib
import itertools
import json
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import type_handlers
from orbax.checkpoint._src.futures import future as orbax_future  # process_local_checkpointing
from orbax.checkpoint._src.futures import synchronization as orbax_sync
from orbax.checkpoint._src.serialization import ocdbt_utils  # for _CallingProcessNumpyHandler
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

ARRAYS = "arrays"
META = "meta"
_BARRIERS = itertools.count()  # unique barrier names (the processes concerned count alike)


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
  """Scope in which each process checkpoints runs of its own (`Checkpointer(processes=(me,))`).

  Orbax coordinates a save through keys in the jax.distributed key-value store, named after a
  per-process count of save operations: it assumes that every process saves in lockstep.
  Processes that checkpoint independent runs would read each other's keys (and deadlock), and
  their counts drift apart. Inside this scope the keys carry the process index. On exit every
  process waits for the others (barrier `name`, up to `timeout_s`) and all continue from the
  largest count, so checkpoints over all processes afterwards are in lockstep again.
  """
  if jax.process_count() == 1:
    yield
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  contract = orbax_future.AwaitableSignalsContract
  shared_prefix = contract.awaitable_signals_contract_prefix
  contract.awaitable_signals_contract_prefix = f"{shared_prefix}_process{jax.process_index()}"
  try:
    yield
  finally:
    contract.awaitable_signals_contract_prefix = shared_prefix
  ocp.multihost.sync_global_processes(name, timeout=timeout_s,
                                      processes=set(range(jax.process_count())))
  ids = orbax_sync.OperationIdGenerator
  count = int(ids.get_current_operation_id())
  top = int(np.max(multihost_utils.process_allgather(np.asarray(count, np.int64))))
  ids._operation_id_counter = itertools.count(top)  # pylint: disable=protected-access
  ids.next_operation_id()  # now `top` on every process


class _CallingProcessNumpyHandler(type_handlers.NumpyHandler):
  """Orbax's numpy handler, writing from the calling process instead of process 0 only.

  Orbax 0.12.8's `NumpyHandler` writes replicated numpy arrays from process 0 alone, and its
  `ArrayHandler` refuses process-local jax.Arrays when there are several processes. A checkpointer
  that one process of a multi-host job uses alone (its own run on its own devices) therefore
  has no way to write through Orbax's stock handlers; this one is their numpy handler with that
  condition dropped (the loop below is theirs otherwise). Used only by such checkpointers.
  """

  async def _background_serialize(self, values, infos, args=None):
    writes = []
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=value.shape,
          dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(
              use_ocdbt=info.is_ocdbt_checkpoint,
              override_ocdbt_process_id=self._override_ocdbt_process_id),
          metadata_key=self._metadata_key)
      writes.append(self._open_and_write(value, spec.json, info.ts_context))
    await asyncio.gather(*writes)


class Checkpointer:
  """An Orbax `CheckpointManager` for one run directory.

  Args:
    directory: the run directory; checkpoints go to `<directory>/checkpoints` (made absolute).
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (call `wait()` before reading or exiting).
    processes: the processes that call this checkpointer, for a run on a subset of the
      processes of a multi-host job (e.g. one process training on its own devices); None: all
      processes (Orbax's default: every one of them takes part in every save).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True,
               processes: tuple[int, ...] | None = None):
    self.directory = os.path.join(os.path.abspath(directory), "checkpoints")
    # On a subset of the processes of a multi-host job the arrays are process-local, which
    # Orbax refuses to serialise as jax.Arrays there: they are saved and read as numpy arrays.
    everyone = set(range(jax.process_count()))
    self._host_local = processes is not None and set(processes) != everyone
    if not self._host_local:
      multi = ocp.options.MultiprocessingOptions()
      create = True
    else:
      # Orbax syncs the active processes only, and writes from their lowest; it leaves
      # creating the root directory to us in that case.
      multi = ocp.options.MultiprocessingOptions(primary_host=min(processes),
                                                 active_processes=set(processes))
      create = False
      if jax.process_index() == min(processes):
        os.makedirs(self.directory, exist_ok=True)
      ocp.multihost.sync_global_processes(
          f"metaprune_mkdir_{next(_BARRIERS)}:{self.directory}", processes=set(processes))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=async_save,
                                           multiprocessing_options=multi)
    # The item handlers must know the writing process too (they default to process 0).
    if self._host_local:
      registry = ocp.type_handlers.create_type_handler_registry(
          (np.ndarray, _CallingProcessNumpyHandler()), (jax.Array, type_handlers.ArrayHandler()))
      arrays = ocp.PyTreeCheckpointHandler(multiprocessing_options=multi,
                                           type_handler_registry=registry)
    else:
      arrays = ocp.StandardCheckpointHandler(multiprocessing_options=multi)
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
      save = ocp.args.PyTreeSave(jax.device_get(arrays))
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
  """Context manager: SIGTERM sets a flag instead of killing the process.

  `should_stop()` is True on every process as soon as any process got SIGTERM (a cross-process
  all-gather when there are several processes), so all of them save the same step and exit.
  With `local=True` (a run on this process's devices alone, which other processes do not follow
  step by step) it reads this process's flag only.
  """

  def __init__(self, local: bool = False):
    self._flag = False
    self._previous = None
    self._local = local

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
    if jax.process_count() == 1 or self._local:
      return self._flag
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
    return bool(np.any(flags))
