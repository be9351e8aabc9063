"""The CLI end to end: pretrain on digits, SIGKILL / SIGTERM mid-run, resume == uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl.testing import absltest

import _tb_events
from metaprune_jax.runtime import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "metaprune_jax", f"--config={_ROOT}/configs/digits.py",
          f"--workdir={workdir}", "--config.mode=pretrain", "--config.pretrain.epochs=3",
          "--config.pretrain.batch_size=16",
          "--config.pretrain.milestones=(2,)", "--config.pretrain.ckpt_every_steps=15",
          "--config.pretrain.max_to_keep=50", *extra]


def _env():
  # Fewer XLA passes: compile time dominates these tiny runs (same flags for every run).
  return dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu",
              JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def _interrupt(workdir, sig, min_step):
  """Starts the CLI, waits for a committed checkpoint >= min_step, sends `sig`, returns rc."""
  proc = subprocess.Popen(_cmd(workdir), env=_env(), cwd=_ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    if steps and max(steps) >= min_step:
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  return proc.wait(timeout=120)


class EndToEndTest(absltest.TestCase):

  def test_interrupted_runs_resume_bit_for_bit(self):
    tmp = tempfile.mkdtemp()
    full = os.path.join(tmp, "full")
    subprocess.run(_cmd(full), env=_env(), cwd=_ROOT, check=True, timeout=300,
                   capture_output=True)
    self.assertTrue(os.path.exists(os.path.join(full, "pretrain.json")))
    _, arch, ref, ref_step = train.load_run(full)
    self.assertEqual(ref_step, 3 * 71)

    # SIGKILL mid-run, then SIGTERM during the resumed run (a last save, exit 143), then finish.
    workdir = os.path.join(tmp, "interrupted")
    last_step = 0
    for sig, expected_rc, min_step in ((signal.SIGKILL, -signal.SIGKILL, 30),
                                       (signal.SIGTERM, 143, 120)):
      rc = _interrupt(workdir, sig, min_step)
      self.assertEqual(rc, expected_rc, f"{sig.name}: the run ended before the signal")
      self.assertFalse(os.path.exists(os.path.join(workdir, "pretrain.json")))
      _, _, _, step = train.load_run(workdir)
      self.assertBetween(step, max(last_step, min_step), ref_step - 1)
      last_step = step
    subprocess.run(_cmd(workdir), env=_env(), cwd=_ROOT, check=True, timeout=300,
                   capture_output=True)
    _, arch2, got, step = train.load_run(workdir)
    self.assertEqual((arch2, step), (arch, ref_step))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    self.assertEqual([r["epoch"] for r in lines], [1, 2, 3])
    # TensorBoard shows exactly these epochs, once each (an event file per launch that
    # finished an epoch: files are opened at the first write).
    self.assertBetween(len(_tb_events.event_files(os.path.join(workdir, "tb"))), 1, 3)
    self.assertEqual(_tb_events.scalars(os.path.join(workdir, "tb")),
                     _tb_events.from_records(lines))

  def test_unknown_mode_cli(self):
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    out = subprocess.run(_cmd(workdir, "--config.mode=nope"), env=_env(), cwd=_ROOT,
                         capture_output=True, text=True, timeout=120)
    self.assertEqual(out.returncode, 2)
    self.assertStartsWith(out.stderr, "config error: config.mode='nope': unknown mode; choose ")
    self.assertEqual(out.stderr.count("\n"), 1)
    self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
