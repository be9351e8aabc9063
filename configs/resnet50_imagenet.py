"""ResNet-50 on ImageNet, the paper's third task, faithful to the reference (docs/design.md 2).

  # ImageNet must be downloaded by hand (tfds cannot): put ILSVRC2012_img_{train,val}.tar in
  # $DATA/downloads/manual, then
  tfds build imagenet2012 --data_dir=$DATA --file_format=array_record
  launch/gpu_node.sh configs/resnet50_imagenet.py $WORK --config.data_dir=$DATA   # 8 GPUs

Base: torchvision-style pretrained weights (import them: config.prune.base_state_dict, or
`pretrain` from scratch: 90 epochs here). Data models: those weights finetuned 30 epochs (lr 0.01,
x0.1 at 10), pruned to 1.292x, finetuned 60 epochs (x0.1 at 30), SGD wd 1e-4; 3 data models (0 and
1 meta-train, 2 for visualize and prune). Metanetwork 6 layers, hidden 16, edge kinds (49, 9, 1);
meta-training lr 0.01 decayed at epoch 2, batch 32 per device, one step per 200 iterations.
Prune: target 2.3095x, finetunes 200 epochs (x0.1 at 120/160/185), wd 1e-4.

A meta-training step holds one data model per device, so with the reference's 2 training data
models run `meta_train` on 2 devices (CUDA_VISIBLE_DEVICES=0,1 ... --config.mode=meta_train) or
generate more models; on 8 devices the config check stops the run before any work, saying so.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
  "_metaprune_resnet56_config", os.path.join(os.path.dirname(__file__), "resnet56_cifar10.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def _sched(epochs, milestones, **kw):
  """SGD momentum 0.9, wd 1e-4, lr 0.01 (overridable), global batch 256."""
  d = dict(epochs=epochs, batch_size=256, eval_batch_size=512, lr=0.01, milestones=milestones,
           momentum=0.9, weight_decay=1e-4, ckpt_every_steps=2000, max_to_keep=3)
  d.update(kw)
  return base.schedule(**d)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_config(arg)
  config.dataset = "imagenet"
  config.arch = "resnet50"
  config.pretrain = _sched(90, (30, 60, 80), lr=0.1)  # from scratch when no weights are given
  config.generate.num_models = 3
  config.generate.initial_speed_up = 1.292
  config.generate.train = _sched(30, (10,))  # finetune of the pretrained weights
  config.generate.finetune = _sched(60, (30,))
  config.metanet.num_layers = 6
  config.metanet.hidden = 16
  config.metanet.node_res_ratio = 0.0005
  config.metanet.edge_res_ratio = 0.0005
  config.meta_train.lr = 0.01
  config.meta_train.lr_milestones = (2,)
  config.meta_train.batch_size = 32 * 8
  config.meta_train.batches_per_model = 200
  config.meta_train.chunk_size = 32  # images per scanned forward/backward (memory ~ chunk)
  config.meta_train.val_fraction = 1 / 3  # 2 train, 1 validation
  config.finetune_after_metanet = _sched(200, (120, 160, 185))
  config.finetune_after_pruning = _sched(200, (120, 160, 185), keep="best")
  config.visualize.max_speed_up = 3.0
  config.visualize.accuracy_threshold = 0.0
  config.prune.target_speed_up = 2.3095
  config.prune.metanet_epoch = -1     # the reference: the user picks it from the curves (-1: last;
  config.visualize.every = 1          # 0: the best validation curve, as configs/digits.py)
  return config
