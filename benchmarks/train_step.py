"""Train-step throughput of ResNet-56 on CIFAR-shaped input, full width and masked.

  python benchmarks/train_step.py [--batch=128] [--steps=10] [--speed_up=2.3]

Prints one JSON object: images/s (steady state, median over `steps` timed steps after one
warm-up), compile time, the number of compilations of the step function over the run (every
timed step feeds a new batch; masks are arrays, so the masked network reuses the dense
compilation's shapes but is a separate jit here), peak host memory (ru_maxrss), and the device.
Masks are random keep-vectors per channel space with a keep fraction chosen so the MACs of the
*materialised* network would be ~1/speed_up of the dense one (masked training computes at full
width: masking does not make a step faster, materialising does).
"""

import json
import time

import _memory  # benchmarks/_memory.py (the script's folder is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from metaprune_jax.nets import cnn
from metaprune_jax.nets import macs
from metaprune_jax.nets import zoo
from metaprune_jax.runtime import optim
from metaprune_jax.runtime import sharding
from metaprune_jax.runtime import state as state_lib

_BATCH = flags.DEFINE_integer("batch", 128, "Global batch.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_SPEED_UP = flags.DEFINE_float("speed_up", 2.3, "Target MACs speed-up of the random masks.")
_ARCH = flags.DEFINE_string("arch", "resnet56", "Zoo architecture.")


def _random_masks(arch, keep, rng):
  out = {}
  for s in arch.prunable_spaces:
    w = arch.width(s)
    m = np.zeros(w, np.float32)
    m[rng.permutation(w)[: max(1, int(round(w * keep)))]] = 1.0
    out[s] = jnp.asarray(m)
  return out


def _speed_up(arch, masks):
  dense, _ = macs.count_macs(arch)
  widths = {s: int(np.asarray(m).sum()) for s, m in masks.items()}
  small, _ = macs.count_macs(arch.with_widths(widths))
  return dense / small


def _bench(arch, variables, masks, mesh, batch, steps):
  tx, _ = optim.make_optimizer({"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, 390)
  state = sharding.replicate(state_lib.create_state(arch, variables, tx, jax.random.PRNGKey(1),
                                                    masks), mesh)
  step = sharding.jit_train_step(arch, tx, mesh)
  rng = np.random.default_rng(0)

  def make_batch():
    return sharding.to_global({
      "image": rng.standard_normal((batch, 32, 32, 3), np.float32),
      "label": rng.integers(0, 10, batch).astype(np.int32)}, mesh)

  b = make_batch()
  t0 = time.perf_counter()
  compiled = step.lower(state, b).compile()
  compile_s = time.perf_counter() - t0
  del compiled
  state, m = step(state, b)  # warm-up (first call: includes the jit cache fill)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    b = make_batch()
    jax.block_until_ready(b)
    t0 = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {"step_s_median": round(med, 4), "step_s_min": round(float(np.min(times)), 4),
          "images_per_s": round(batch / med, 1), "compile_s": round(compile_s, 2),
          "compilations": step._cache_size(),  # pylint: disable=protected-access
          "final_loss": float(m["loss"])}


def main(argv):
  del argv
  host = _memory.huge_pages_first()
  mesh = sharding.make_mesh()
  arch = zoo.get_arch(_ARCH.value, 10)
  variables = jax.jit(cnn.init_variables, static_argnums=(0, 2))(arch, jax.random.PRNGKey(0),
                                                                  (32, 32))
  keep, masks = 1.0, None
  for keep in np.linspace(0.9, 0.4, 51):  # the first keep fraction reaching the speed-up
    masks = _random_masks(arch, keep, np.random.default_rng(0))
    if _speed_up(arch, masks) >= _SPEED_UP.value:
      break
  out = {
    "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
    "arch": _ARCH.value, "batch": _BATCH.value, "timed_steps": _STEPS.value,
    "full": _bench(arch, variables, None, mesh, _BATCH.value, _STEPS.value),
    "masked": dict(_bench(arch, variables, masks, mesh, _BATCH.value, _STEPS.value),
                   keep_fraction=round(float(keep), 3),
                   macs_speed_up_if_materialised=round(_speed_up(arch, masks), 3)),
    "peak_host_memory_mb": _memory.process_peak_rss_mb(),
    "reference_torch_images_per_s": 153,
    **host,
  }
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
