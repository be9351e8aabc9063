"""metric_writers: TensorBoard events equal the JSON lines, also after a resume that lost steps."""

import json
import os

import numpy as np
from tensorboardX.proto.event_pb2 import SessionLog

import _tb_events
from metaprune_jax.runtime import metric_writers


def _jsonl(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _record(step, seed):
  rng = np.random.default_rng([step, seed])
  return {"epoch": step, "step": step, "loss": float(rng.normal()), "lr": 0.1 / step,
          "accuracy": float(rng.uniform()), "epoch_time_s": round(float(rng.uniform()), 3),
          "note": "not a number"}



def test_events_equal_json_lines(tmp_path):
  run = str(tmp_path)
  recs = [_record(s, 0) for s in (1, 2, 3)]
  w = metric_writers.MetricWriter(run, purge_step=1)
  for r in recs:
    w.write(r["step"], r)
    # flushed per write: the event of this epoch is on disk before close
    assert _tb_events.scalars(os.path.join(run, "tb")) == _tb_events.from_records(recs[:r["step"]])
  w.close()
  w.close()  # idempotent
  assert _jsonl(run) == recs
  got = _tb_events.scalars(os.path.join(run, "tb"))
  assert sorted(got) == ["accuracy", "epoch_time_s", "loss", "lr"]
  assert got == _tb_events.from_records(recs)


def test_resume_drops_lost_steps(tmp_path):
  run = str(tmp_path)
  tb = os.path.join(run, "tb")
  first = [_record(s, 0) for s in (1, 2, 3)]
  w = metric_writers.MetricWriter(run, purge_step=1)
  for r in first:
    w.write(r["step"], r)
  w.close()
  # resume from a checkpoint at step 2: step 3 is lost and written again, with other values
  again = _record(3, 1)
  w = metric_writers.MetricWriter(run, first[:2], purge_step=3)
  assert _jsonl(run) == first[:2]
  w.write(3, again)
  w.close()
  assert _jsonl(run) == first[:2] + [again]
  files = _tb_events.event_files(tb)
  assert len(files) == 2  # (likely opened in the same second) none overwritten
  head = _tb_events.events(files[1])[:3]
  assert [e.file_version for e in head] == ["brain.Event:2"] * 2 + [""]
  assert (head[2].step, head[2].session_log.status) == (3, SessionLog.START)
  got = _tb_events.scalars(tb)
  assert got == _tb_events.from_records(first[:2] + [again])
  assert got != _tb_events.from_records(first)
  # reopening the finished run (a resume with nothing left to train) adds no event file
  metric_writers.MetricWriter(run, first[:2] + [again], purge_step=4).close()
  assert _tb_events.event_files(tb) == files
  assert _jsonl(run) == first[:2] + [again]


def test_disabled_writes_nothing(tmp_path):
  run = str(tmp_path / "run")
  w = metric_writers.MetricWriter(run, [_record(1, 0)], purge_step=2, enabled=False)
  w.write(2, _record(2, 0))
  w.close()
  assert not os.path.exists(run)
