"""Reads TensorBoard event files the way TensorBoard does, without tensorboard or tensorboardX's
writer: the TFRecord framing (length, masked CRC-32C of it, data, masked CRC-32C of the data,
both CRCs checked) parsed by hand, the records decoded with tensorboardX's `Event` protobuf."""

import glob
import os
import struct

import numpy as np
from tensorboardX.proto.event_pb2 import Event, SessionLog


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def events(path: str) -> list[Event]:
  """The events of one file, in order (asserts the framing and both CRCs of every record)."""
  out, raw = [], open(path, "rb").read()
  pos = 0
  while pos < len(raw):
    header = raw[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
    assert crc == _masked_crc(header), f"{path}: bad length CRC at byte {pos}"
    data = raw[pos + 12:pos + 12 + length]
    (crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
    assert len(data) == length and crc == _masked_crc(data), f"{path}: bad record at {pos}"
    out.append(Event.FromString(data))
    pos += 16 + length
  return out


def event_files(tb_dir: str) -> list[str]:
  """The event files of a directory in TensorBoard's reading order (by name)."""
  return sorted(glob.glob(os.path.join(tb_dir, "*tfevents*")))


def scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] as TensorBoard shows them: files in name order, and a
  `SessionLog.START` event at step s drops the values read so far at steps >= s."""
  out: dict[str, list[tuple[int, float]]] = {}
  for path in event_files(tb_dir):
    for e in events(path):
      if e.HasField("session_log") and e.session_log.status == SessionLog.START:
        out = {t: [(s, v) for s, v in sv if s < e.step] for t, sv in out.items()}
      for v in e.summary.value:
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


def from_records(records, step_key: str = "step") -> dict[str, list[tuple[int, float]]]:
  """What `scalars` must give for these JSON-lines records: every number but `epoch`/`step`,
  at the record's `step_key`, as float32 (TensorBoard's `simple_value`)."""
  out: dict[str, list[tuple[int, float]]] = {}
  for r in records:
    for k, v in r.items():
      if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
        out.setdefault(k, []).append((int(r[step_key]), float(np.float32(v))))
  return out
