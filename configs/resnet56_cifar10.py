"""ResNet-56 on CIFAR-10, the paper's first task, faithful to the reference (docs/design.md 2).

  tfds build cifar10 --data_dir=$DATA --file_format=array_record   # once
  python -m metaprune_jax --config=configs/resnet56_cifar10.py --workdir=$WORK \
      --config.data_dir=$DATA                      # mode 'all': the whole pipeline
  # or one mode at a time: --config.mode=pretrain | generate | meta_train | visualize | prune

Pretrain: SGD momentum 0.9, weight decay 5e-4 (coupled, as torch), batch 128, 200 epochs, lr 0.1
x0.1 at epochs 100/150/180; ~93.5% test accuracy expected. Data models: trained the same way,
pruned to 1.32x, finetuned 80 epochs (lr 0.01, x0.1 at 40/70, keep last). Metanetwork: 8 layers,
hidden 64, node dim 8, edge dim 9, residual ratios 0.01; meta-training 100 epochs AdamW lr 1e-3
x0.1 from epoch index 3, wd 5e-4, reg 10, alpha 16. Prune: to 2.3x overall (the paper also
reports 2.9x and 3.0x: --config.prune.target_speed_up=3.0), finetunes after the metanetwork 100
epochs (x0.1 at 60/90) and after pruning 140 epochs (x0.1 at 80/120), lr 0.01. Visualize curves
to 3.0x. On one GPU: pretrain ~1 h, each data model ~1.5 h, meta-training hours; on this
project's 2-core CPU several days per network (see benchmarks/train_step.py).
"""

import importlib.util
import os

import ml_collections

# Base config loaded by path so the file works from any working directory.
_spec = importlib.util.spec_from_file_location(
  "_metaprune_digits_config", os.path.join(os.path.dirname(__file__), "digits.py"))
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)
schedule = digits.schedule


def finetune(epochs, milestones, **kw) -> ml_collections.ConfigDict:
  """The reference's finetune schedules: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 128."""
  return schedule(epochs=epochs, batch_size=128, eval_batch_size=512, lr=0.01,
                  milestones=milestones, momentum=0.9, weight_decay=5e-4, ckpt_every_steps=1000,
                  max_to_keep=3, **kw)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = digits.get_config(arg)
  config.dataset = "cifar10"
  config.arch = "resnet56"
  config.pretrain = schedule(
    epochs=200, batch_size=128, eval_batch_size=512, lr=0.1, milestones=(100, 150, 180),
    momentum=0.9, weight_decay=5e-4, keep="last", ckpt_every_steps=1000, max_to_keep=3)
  # generate
  config.generate.num_models = 50      # the reference does not fix it: as many as you can afford
  config.generate.initial_speed_up = 1.32
  config.generate.train = config.pretrain.copy_and_resolve_references()
  config.generate.finetune = finetune(80, (40, 70))
  # metanetwork and meta-training
  config.metanet.num_layers = 8
  config.metanet.hidden = 64
  config.metanet.node_res_ratio = 0.01
  config.metanet.edge_res_ratio = 0.01
  config.meta_train.epochs = 100
  config.meta_train.lr = 1e-3
  config.meta_train.lr_milestones = (3,)
  config.meta_train.weight_decay = 5e-4
  config.meta_train.alpha = 16.0
  config.meta_train.reg = 10.0
  config.meta_train.batch_size = 500
  config.meta_train.batches_per_model = 100  # the whole training set (low-memory: 1)
  config.meta_train.chunk_size = 100  # images per scanned forward/backward (memory ~ chunk)
  config.meta_train.eval_batch_size = 512
  # visualize and prune
  config.finetune_after_metanet = finetune(100, (60, 90))
  config.finetune_after_pruning = finetune(140, (80, 120), keep="best")
  config.visualize.max_speed_up = 3.0
  config.visualize.accuracy_threshold = 0.925  # the reference's optional metric
  config.visualize.eval_batch_size = 512  # divisible by 8 devices
  config.prune.target_speed_up = 2.3
  config.prune.metanet_epoch = -1     # the reference: the user picks it from the curves (-1: last;
  config.visualize.every = 1          # 0: the best validation curve, as configs/digits.py)
  return config
