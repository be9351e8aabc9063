"""Subprocess worker for the data-parallel tests: a few train steps on the digits set.

  python tests/_dp_worker.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Runs 3 masked SGD steps of resnet_tiny at global batch 32 on every device of every process
(XLA_FLAGS may fake several CPU devices) and, on process 0, saves the final params and losses.
"""

import os
import sys

import jax

if len(sys.argv) > 2:
  jax.distributed.initialize(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from metaprune_jax.nets import cnn  # noqa: E402
from metaprune_jax.nets import zoo  # noqa: E402
from metaprune_jax.runtime import data  # noqa: E402
from metaprune_jax.runtime import optim  # noqa: E402
from metaprune_jax.runtime import sharding  # noqa: E402
from metaprune_jax.runtime import state as state_lib  # noqa: E402


def run_fit(out):
  """`train.fit` for one short epoch with checkpoints (Orbax across processes) and eval."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from metaprune_jax.runtime import train  # pylint: disable=g-import-not-at-top

  arch = zoo.get_arch("resnet_tiny", 10)
  variables = jax.jit(cnn.init_variables, static_argnums=(0, 2))(arch, jax.random.PRNGKey(0),
                                                                  (8, 8))
  schedule = ml_collections.ConfigDict(dict(epochs=1, batch_size=64, eval_batch_size=120, lr=0.1,
                                            momentum=0.9, weight_decay=5e-4, keep="last",
                                            ckpt_every_steps=10, max_to_keep=2))
  result = train.fit(schedule, arch, variables, None, data.get_dataset("digits"),
                     os.path.join(os.path.dirname(out), "fit_" + os.path.basename(out)))
  params = jax.device_get(result.variables["params"])
  if jax.process_index() == 0:
    flat = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out, test_loss=result.history[-1]["test_loss"],
             test_accuracy=result.history[-1]["test_accuracy"],
             num_devices=jax.device_count(), **flat)


def main(out):
  mesh = sharding.make_mesh()
  arch = zoo.get_arch("resnet_tiny", 10)
  variables = jax.jit(cnn.init_variables, static_argnums=(0, 2))(arch, jax.random.PRNGKey(0),
                                                                  (8, 8))
  tx, _ = optim.make_optimizer({"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, 10)
  space = arch.prunable_spaces[0]
  masks = {space: jnp.asarray(np.arange(arch.width(space)) % 2 == 0, jnp.float32)}
  state = sharding.replicate(state_lib.create_state(arch, variables, tx, jax.random.PRNGKey(1),
                                                    masks), mesh)
  step = sharding.jit_train_step(arch, tx, mesh)
  ds = data.get_dataset("digits")
  losses = []
  for batch in ds.train_batches(32, seed=0, start_step=0, num_steps=3):
    state, m = step(state, sharding.to_global(batch, mesh))
    losses.append(float(m["loss"]))
  params = jax.device_get(state.params)
  if jax.process_index() == 0:
    flat = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out, losses=np.asarray(losses), num_devices=jax.device_count(), **flat)


if __name__ == "__main__":
  if os.environ.get("DP_WORKER_FIT") == "1":
    run_fit(sys.argv[1])
  else:
    main(sys.argv[1])
