"""The ``pretrain`` mode: the base network, trained from scratch (docs/design.md section 2)."""

import json
import os

import jax
from absl import logging

from metaprune_jax.nets import cnn
from metaprune_jax.nets import zoo
from metaprune_jax.runtime import data as data_lib
from metaprune_jax.runtime import train as train_lib


def pretrain(config, workdir: str) -> train_lib.FitResult:
  """The `pretrain` mode: train the base network from scratch, evaluate, save.

  Reads `config.dataset`, `config.data_dir`, `config.arch`, `config.widths`, `config.seed` and
  the schedule `config.pretrain`; checkpoints and metrics go to `<workdir>/checkpoints` and
  `<workdir>/metrics.jsonl`, and `<workdir>/pretrain.json` gets the final test metrics.
  """
  dataset = data_lib.dataset_from_config(config)
  arch = zoo.get_arch(config.arch, dataset.num_classes, widths=config.get("widths") or None)
  init_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  # Jitted: eager Flax init of a ResNet takes seconds of op-by-op dispatch on CPU.
  init = jax.jit(cnn.init_variables, static_argnums=(0, 2))
  variables = init(arch, init_rng, tuple(dataset.image_hw))
  result = train_lib.fit(config.pretrain, arch, variables, None, dataset, workdir, seed=config.seed,
               config=config, desc="pretrain")
  last = result.history[-1] if result.history else {}
  logging.info("pretrain done: step %d, test accuracy %.4f", result.step,
               last.get("test_accuracy", float("nan")))
  if jax.process_index() == 0:
    with open(os.path.join(os.path.abspath(workdir), "pretrain.json"), "w") as f:
      json.dump({"step": result.step, "best_epoch": result.best_epoch, **last}, f, indent=1)
  return result
