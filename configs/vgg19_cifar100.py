"""VGG-19-BN on CIFAR-100, the paper's second task, faithful to the reference (docs/design.md 2).

  tfds build cifar100 --data_dir=$DATA --file_format=array_record   # once
  python -m metaprune_jax --config=configs/vgg19_cifar100.py --workdir=$WORK \
      --config.data_dir=$DATA

As ResNet-56 (configs/resnet56_cifar10.py) except: data models pruned to 2.0x and finetuned 140
epochs (x0.1 at 80/120); metanetwork hidden 32, node dim 5, residual ratios 0.05, meta-training
LR decay at epoch 10; both finetunes of `prune` 2000 epochs (x0.1 at 1850/1950); target 8.95x;
curves to 10x, optional metric threshold 0.68.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
  "_metaprune_resnet56_config", os.path.join(os.path.dirname(__file__), "resnet56_cifar10.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config(arg)
  config.dataset = "cifar100"
  config.arch = "vgg19"
  config.generate.initial_speed_up = 2.0
  config.generate.finetune = base.finetune(140, (80, 120))
  config.metanet.hidden = 32
  config.metanet.node_res_ratio = 0.05
  config.metanet.edge_res_ratio = 0.05
  config.meta_train.lr_milestones = (10,)
  config.finetune_after_metanet = base.finetune(2000, (1850, 1950))
  config.finetune_after_pruning = base.finetune(2000, (1850, 1950), keep="best")
  config.visualize.max_speed_up = 10.0
  config.visualize.accuracy_threshold = 0.68
  config.prune.target_speed_up = 8.95
  config.prune.metanet_epoch = -1     # the reference: the user picks it from the curves (-1: last;
  config.visualize.every = 1          # 0: the best validation curve, as configs/digits.py)
  return config
