"""Checkpoints through `train.fit`: round trip, resume of a finished run, load_run, bad workdirs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import ml_collections
import numpy as np
from absl.testing import absltest

import _xla_env
from metaprune_jax import modes
from metaprune_jax.nets import cnn
from metaprune_jax.nets import zoo
from metaprune_jax.runtime import checkpoint as ckpt_lib
from metaprune_jax.runtime import data
from metaprune_jax.runtime import train

jax.config.update("jax_disable_most_optimizations", True)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schedule(**kw):
  s = ml_collections.ConfigDict(dict(epochs=1, batch_size=32, eval_batch_size=120, lr=0.05,
                                     milestones=(1,), momentum=0.9, weight_decay=5e-4,
                                     keep="best", ckpt_every_steps=20, max_to_keep=2))
  s.update(kw)
  return s


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = fh.read()
  return out


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class CheckpointTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.arch = zoo.get_arch("resnet_tiny", 10)
    cls.variables = jax.jit(cnn.init_variables, static_argnums=(0, 2))(
      cls.arch, jax.random.PRNGKey(0), (8, 8))
    cls.ds = data.get_dataset("digits")
    cls.workdir = tempfile.mkdtemp()
    cls.config = ml_collections.ConfigDict({"mode": "pretrain", "note": "test"})
    cls.result = train.fit(_schedule(), cls.arch, cls.variables, None, cls.ds, cls.workdir,
                           config=cls.config)

  def test_round_trip_and_finished_resume(self):
    self.assertLen(self.result.history, 1)
    before = _snapshot(self.workdir)
    again = train.fit(_schedule(), self.arch, self.variables, None, self.ds, self.workdir,
                      config=self.config)  # finished: restores, trains nothing
    _assert_trees_equal(self.result.variables, again.variables)
    self.assertEqual(again.history, self.result.history)
    self.assertEqual(_snapshot(os.path.join(self.workdir, "checkpoints")),
                     {k[len("checkpoints/"):]: v for k, v in before.items()
                      if k.startswith("checkpoints/")})

  def test_load_run(self):
    config, arch, variables, step = train.load_run(self.workdir)
    self.assertEqual(arch, self.arch)
    self.assertEqual(step, self.ds.steps_per_epoch(32))
    self.assertEqual(config.note, "test")
    _assert_trees_equal(self.result.variables, variables)

  def test_workdir_of_another_config(self):
    before = _snapshot(self.workdir)
    with self.assertRaisesRegex(ckpt_lib.CheckpointError,
                                r"(?s)another configuration.*schedule.*Nothing was overwritten"):
      train.fit(_schedule(lr=0.2), self.arch, self.variables, None, self.ds, self.workdir)
    other_arch = zoo.get_arch("resnet20", 10)
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, "another configuration.*arch"):
      train.fit(_schedule(), other_arch, self.variables, None, self.ds, self.workdir)
    self.assertEqual(_snapshot(self.workdir), before)

  def test_corrupt_checkpoint(self):
    bad = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, bad)
    step_dir = os.path.join(bad, "checkpoints", str(self.result.step), ckpt_lib.ARRAYS)
    for root, _, files in os.walk(step_dir):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
    before = _snapshot(bad)
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, "cannot be restored|cannot be read"):
      train.fit(_schedule(), self.arch, self.variables, None, self.ds, bad)
    self.assertEqual(_snapshot(bad), before)

  def test_interrupted_save_is_ignored(self):
    # A save killed mid-write leaves Orbax's temporary folder, never a step folder: the restore
    # takes the last committed step.
    run = os.path.join(tempfile.mkdtemp(), "run")
    shutil.copytree(self.workdir, run)
    step = self.result.step
    partial = os.path.join(run, "checkpoints", f"{step + 7}.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(partial, ckpt_lib.ARRAYS))
    with open(os.path.join(partial, ckpt_lib.ARRAYS, "junk"), "wb") as f:
      f.write(b"half a checkpoint")
    _, _, variables, got = train.load_run(run)
    self.assertEqual(got, step)
    _assert_trees_equal(self.result.variables, variables)

  def test_preemption_guard_one_process(self):
    # One process: SIGTERM sets a flag (no communication); the previous handler comes back.
    previous = signal.getsignal(signal.SIGTERM)
    with ckpt_lib.PreemptionGuard() as guard:
      self.assertFalse(guard.should_stop(1))
      os.kill(os.getpid(), signal.SIGTERM)
      self.assertTrue(guard.should_stop(2))
    self.assertEqual(signal.getsignal(signal.SIGTERM), previous)

  def test_best_from_start(self):
    # keep='best_from_start': the given network is a candidate before the first epoch. At lr 1
    # both epochs end below it on validation, so it is returned bit for bit (and by load_run and
    # a finished run's resume); keep='best' must return an epoch's network instead.
    start = self.result.variables
    start_val = train.evaluate(self.arch, start, None, self.ds, 120, split="val")["accuracy"]
    wild = dict(lr=1.0, epochs=2, milestones=())
    workdir = tempfile.mkdtemp()
    res = train.fit(_schedule(keep="best_from_start", **wild), self.arch, start, None, self.ds,
                    workdir)
    self.assertLess(max(h["val_accuracy"] for h in res.history), start_val)
    self.assertEqual(res.best_epoch, train.START_EPOCH)
    _assert_trees_equal(start, res.variables)
    _assert_trees_equal(start, train.load_run(workdir)[2])
    again = train.fit(_schedule(keep="best_from_start", **wild), self.arch, start, None, self.ds,
                      workdir)
    self.assertEqual(again.best_epoch, train.START_EPOCH)
    _assert_trees_equal(start, again.variables)
    best = train.fit(_schedule(keep="best", **wild), self.arch, start, None, self.ds,
                     tempfile.mkdtemp())
    self.assertEqual(best.best_epoch, int(np.argmax([h["val_accuracy"] for h in best.history])))
    self.assertFalse(all(np.array_equal(a, b) for a, b in
                         zip(jax.tree.leaves(start), jax.tree.leaves(best.variables))))
    # an epoch strictly better than the start is kept (lr 0.05, as the start was trained)
    mild = train.fit(_schedule(keep="best_from_start", lr=0.05, epochs=2, milestones=()),
                     self.arch, start, None, self.ds, tempfile.mkdtemp())
    vals = [h["val_accuracy"] for h in mild.history]
    self.assertGreater(max(vals), start_val)
    self.assertEqual(mild.best_epoch, int(np.argmax(vals)))
    with self.assertRaisesRegex(ValueError, "schedule.keep must be one of"):
      train.fit(_schedule(keep="first"), self.arch, start, None, self.ds, tempfile.mkdtemp())

  def test_missing_checkpoint(self):
    with self.assertRaisesRegex(ckpt_lib.CheckpointError, "No checkpoint"):
      train.load_run(tempfile.mkdtemp())

  def test_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, "Unknown mode 'train'.*pretrain"):
      modes.get("train")

  def test_batch_not_divisible_by_devices(self):
    class _Mesh8:
      devices = np.zeros(8)
    with self.assertRaisesRegex(ValueError, "not divisible by the number of devices 8"):
      train.fit(_schedule(batch_size=36), self.arch, self.variables, None, self.ds,
                tempfile.mkdtemp(), mesh=_Mesh8())


class TwoProcessTest(absltest.TestCase):

  def test_per_process_and_shared_checkpoints_and_preemption(self):
    """2 processes (tests/_ckpt_worker.py): runs of their own (different numbers of saves),
    then one run of both, then SIGTERM to one process of a multi-host loop."""
    import portpicker  # pylint: disable=g-import-not-at-top

    out = tempfile.mkdtemp()
    port = portpicker.pick_unused_port()
    env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=_xla_env.xla_flags("--xla_force_host_platform_device_count=1"))
    worker = os.path.join(_ROOT, "tests", "_ckpt_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, out, f"127.0.0.1:{port}", "2", str(i)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    self.assertEqual([p.returncode for p in procs], [0, 0], errs[0][-3000:] + errs[1][-3000:])
    results = []
    for i in range(2):
      with open(os.path.join(out, f"result_{i}.json")) as f:
        results.append(json.load(f))
    for i, r in enumerate(results):
      last = 3 + 2 * i  # process i saved steps 1..3+2i of its own run, keeping 2
      self.assertEqual(r["local"], {"steps": [last - 1, last], "w": 10.0 * i + last, "n": last,
                                    "meta": i, "raw_w": 10.0 * i + last, "sharding_ok": True})
      self.assertEqual(r["global"], {"steps": [1, 2], "w": [2.0 * k for k in range(8)],
                                     "meta": 2})
    # both processes stop at the same step, after process 0's SIGTERM at step 5
    self.assertEqual(results[0]["preempted_at"], results[1]["preempted_at"])
    self.assertGreater(results[0]["preempted_at"], 5)


if __name__ == "__main__":
  absltest.main()
