"""The embedded default: a small CIFAR-style ResNet on scikit-learn's digits (no download).

  python -m metaprune_jax --config=configs/digits.py --workdir=/tmp/mp_digits \
      --config.mode=pretrain

`pretrain` trains `resnet_tiny` for 15 epochs at batch 32 (about 20 s on a 2-core CPU, test
accuracy ~0.95+). Sections for the other modes (`generate`, `meta_train`, `visualize`, `prune`)
are added by their modules' owners; every schedule section has the keys `metaprune_jax.train.fit`
reads.
"""

import ml_collections


def schedule(**kw) -> ml_collections.ConfigDict:
  """A training/finetuning schedule section (the keys `train.fit` reads), with overrides."""
  s = ml_collections.ConfigDict(dict(
    epochs=15,             # passes over the training split
    batch_size=32,         # global batch (divisible by the device count)
    eval_batch_size=120,   # global test batch (padded at the end)
    optimizer="sgd",       # 'sgd' (torch coupled weight decay) | 'adamw'
    lr=0.1,                # initial learning rate
    milestones=(8, 12),    # epochs at which lr *= gamma (MultiStepLR)
    gamma=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    keep="last",           # 'last' epoch or 'best' test-accuracy epoch
    ckpt_every_steps=0,    # extra checkpoints every N steps (0: end of each epoch only)
    max_to_keep=2,         # checkpoints kept
  ))
  s.update(kw)
  return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"     # pretrain | generate | meta_train | visualize | prune | all
  config.seed = 0              # root seed (init, data order, augmentation)
  config.dataset = "digits"    # digits | cifar10 | cifar100 | svhn | imagenet
  config.data_dir = ""         # tfds data dir ('' = tfds default); unused for digits
  config.arch = "resnet_tiny"  # a zoo name
  config.widths = ml_collections.ConfigDict()  # optional {space: width} overrides
  config.log_compiles = False  # log every XLA compilation
  config.pretrain = schedule()
  return config
