"""ResNet-56 on CIFAR-10, the paper's first task; pretrain is faithful to the reference.

  tfds build cifar10 --data_dir=$DATA --file_format=array_record   # once
  python -m metaprune_jax --config=configs/resnet56_cifar10.py --workdir=$WORK \
      --config.data_dir=$DATA --config.mode=pretrain

Pretrain: SGD momentum 0.9, weight decay 5e-4 (coupled, as torch), batch 128, 200 epochs, lr 0.1
x0.1 at epochs 100/150/180 (DESIGN.md section 2); ~93.5% test accuracy expected. On one GPU
about 1 h; on this project's 2-core CPU ~ several days (see benchmarks/train_step.py).
"""

import importlib.util
import os

import ml_collections

# Base config loaded by path so the file works from any working directory.
_spec = importlib.util.spec_from_file_location(
  "_metaprune_digits_config", os.path.join(os.path.dirname(__file__), "digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = digits.get_config(arg)
  config.dataset = "cifar10"
  config.arch = "resnet56"
  config.pretrain = digits.schedule(
    epochs=200, batch_size=128, eval_batch_size=500, lr=0.1, milestones=(100, 150, 180),
    momentum=0.9, weight_decay=5e-4, keep="last", ckpt_every_steps=1000, max_to_keep=3)
  return config
