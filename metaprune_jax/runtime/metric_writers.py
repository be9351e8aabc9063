"""Per-epoch metrics of a run directory: JSON lines in `<dir>/metrics.jsonl` and TensorBoard
event files in `<dir>/tb/` (`tensorboard --logdir <workdir>` shows every run under a workdir;
tensorboard itself is an optional install, the files are written with `tensorboardX`).

One process writes a run's metrics (the caller decides which; the others get a writer that does
nothing). Opening a writer rewrites metrics.jsonl from the given history (on resume the
checkpoint's history is authoritative: lines of lost epochs are dropped) and starts a new event
file (at the first write) whose first records are the purge marker `tensorboardX.SummaryWriter(purge_step=...)`
writes: TensorBoard then discards the earlier files' events at steps >= `purge_step` (those of
lost epochs). Events are written synchronously (tensorboardX's `EventsWriter`, not
`SummaryWriter`, whose background thread may not have written the last event when `flush`
returns), so every `write` is on disk when it returns.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

AXIS_KEYS = ("epoch", "step")  # the x axis of a record, not TensorBoard scalars


class MetricWriter:
  """Writes records (dicts of metrics) to `<run_dir>/metrics.jsonl` and `<run_dir>/tb/`.

  Args:
    run_dir: the run's directory (created if missing).
    history: the records kept from before (a resumed run's); metrics.jsonl is rewritten to them.
    purge_step: if given, TensorBoard drops the earlier event files' events at steps >= it (the
      first step after the resumed checkpoint).
    enabled: False on the processes that do not write; every method then does nothing.
  """

  def __init__(self, run_dir: str, history: Iterable[Mapping[str, Any]] = (),
               purge_step: int | None = None, enabled: bool = True):
    self._enabled = enabled
    self._events = None
    if not enabled:
      return
    self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
    self.tb_dir = os.path.join(run_dir, "tb")
    os.makedirs(self.tb_dir, exist_ok=True)
    with open(self.jsonl_path, "w") as f:
      f.writelines(json.dumps(dict(h)) + "\n" for h in history)
    self._purge_step = purge_step

  def _open_events(self):
    """The event file, opened at the first write: reopening a finished run adds no file."""
    if self._events is None:
      # A suffix that sorts in opening order: two files opened in the same second (same name
      # otherwise) must neither overwrite each other nor be read out of order.
      self._events = EventsWriter(os.path.join(self.tb_dir, "events"),
                                  filename_suffix=f".{time.time_ns()}")
      if self._purge_step is not None:
        step = int(self._purge_step)
        self._events.write_event(Event(step=step, file_version="brain.Event:2"))
        self._events.write_event(Event(step=step,
                                       session_log=SessionLog(status=SessionLog.START)))
    return self._events

  def write(self, step: int, record: Mapping[str, Any]):
    """Appends `record` as a JSON line and its numbers (but `epoch`, `step`) as TensorBoard
    scalars at `step` (one tag per key), then flushes both."""
    if not self._enabled:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(dict(record)) + "\n")
    now, events = time.time(), self._open_events()
    for k, v in record.items():
      if k not in AXIS_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
        events.write_event(Event(wall_time=now, step=int(step),
                                 summary=tb_summary.scalar(k, float(v))))
    events.flush()

  def close(self):
    """Flushes and closes the event file (idempotent)."""
    if self._events is not None:
      self._events.close()
      self._events = None
