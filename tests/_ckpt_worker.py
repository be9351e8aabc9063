"""Subprocess worker of checkpoint_test: Orbax checkpoints and preemption on 2 processes.

  python tests/_ckpt_worker.py OUT_DIR COORDINATOR NUM_PROCESSES PROCESS_ID

1. Inside `process_local_checkpointing`, each process checkpoints a run of its own (its own
   directory, its own devices, a different number of saves per process), then reads it back.
2. Then every process saves and restores one run together (arrays replicated over all devices).
3. A multi-host training loop under `PreemptionGuard`: process 0 gets SIGTERM at step 5; every
   process must stop at the same step.
Writes OUT_DIR/result_<process>.json.
"""

import json
import os
import signal
import sys

import jax

jax.distributed.initialize(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from metaprune_jax.runtime import checkpoint  # noqa: E402
from metaprune_jax.runtime import sharding  # noqa: E402


def main(out):
  me = jax.process_index()
  result = {"process": me}
  # 1. per-process runs: process p saves 3 + 2p steps of its own values
  local = sharding.local_mesh()
  with checkpoint.process_local_checkpointing("ckpt_worker_local_done", 120):
    ckpt = checkpoint.Checkpointer(os.path.join(out, f"local_{me}"), max_to_keep=2,
                                   processes=(me,))
    for step in range(1, 4 + 2 * me):
      arrays = sharding.replicate({"w": jnp.full((3, 4), 10.0 * me + step),
                                   "n": jnp.asarray(step, jnp.int32)}, local)
      ckpt.save(step, arrays, {"step": step, "process": me})
    ckpt.close()
    ckpt = checkpoint.Checkpointer(os.path.join(out, f"local_{me}"), processes=(me,))
    target = sharding.replicate({"w": jnp.zeros((3, 4)), "n": jnp.asarray(0, jnp.int32)}, local)
    got, meta = ckpt.restore(target)
    raw, _ = ckpt.restore_raw()
    result["local"] = {"steps": ckpt.all_steps(), "w": float(got["w"][0, 0]), "n": int(got["n"]),
                       "meta": meta["process"], "raw_w": float(raw["w"][1, 1]),
                       "sharding_ok": got["w"].sharding == target["w"].sharding}
    ckpt.close()
  # 2. one run of every process (after per-process runs of different lengths)
  mesh = sharding.make_mesh()
  ckpt = checkpoint.Checkpointer(os.path.join(out, "global"), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, sharding.replicate({"w": jnp.arange(8.0) * step}, mesh), {"step": step})
  ckpt.close()
  ckpt = checkpoint.Checkpointer(os.path.join(out, "global"))
  got, meta = ckpt.restore(sharding.replicate({"w": jnp.zeros(8)}, mesh))
  result["global"] = {"steps": ckpt.all_steps(), "w": np.asarray(
      jax.device_get(got["w"])).tolist(), "meta": meta["step"]}
  ckpt.close()
  # 3. preemption of a multi-host loop: SIGTERM to process 0 only
  with checkpoint.PreemptionGuard() as guard:
    stopped = None
    for step in range(1, 2001):
      jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))
      if me == 0 and step == 5:
        os.kill(os.getpid(), signal.SIGTERM)
      if guard.should_stop(step):
        stopped = step
        break
  result["preempted_at"] = stopped
  with open(os.path.join(out, f"result_{me}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1])
