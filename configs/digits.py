"""The embedded default: a small CIFAR-style ResNet on scikit-learn's digits (no download).

  python -m metaprune_jax --config=configs/digits.py --workdir=/tmp/mp_digits

runs the whole pipeline (mode `all`): pretrain `resnet8` (16/32/64 channels, 15 epochs at batch
32, test accuracy ~0.99), generate 8 data models (trained like the base network, pruned to
1.5x, finetuned), meta-train the metanetwork 30 epochs, draw the validation curves of every 5th
epoch (`visualize`, which also picks the epoch `prune` uses: `prune.metanet_epoch=0`), and prune
the base network to 6x fewer MACs; about 3.5 minutes on a 2-core CPU. The meta-training recipe
is the one the recipe search chose on validation over its four search seeds
(benchmarks/recipe_search.py, docs/recipe_search.md: recipe v5): regulariser strength 0.1, residual
ratios 0.1, AdamW lr 3e-3 decayed x0.1 after epoch 6,
cross-entropy over the whole training split at every step. One mode at a time:
`--config.mode=pretrain` (generate, meta_train, visualize, prune). Every schedule section has the
keys `metaprune_jax.runtime.train.fit` reads.
"""

import ml_collections


def schedule(**kw) -> ml_collections.ConfigDict:
  """A training/finetuning schedule section (the keys `train.fit` reads), with overrides."""
  s = ml_collections.ConfigDict(dict(
    epochs=15,             # passes over the training split
    batch_size=32,         # global batch (divisible by the device count)
    eval_batch_size=144,   # global eval batch (validation and test; padded at the end)
    optimizer="sgd",       # 'sgd' (torch coupled weight decay) | 'adamw'
    lr=0.1,                # initial learning rate
    milestones=(8, 12),    # epochs at which lr *= gamma (MultiStepLR)
    gamma=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    keep="last",           # 'last' epoch, 'best' validation-accuracy epoch, or 'best_from_start'
                           # (the same, the given network a candidate before the first epoch)
    ckpt_every_steps=0,    # extra checkpoints every N steps (0: end of each epoch only)
    max_to_keep=2,         # checkpoints kept
  ))
  s.update(kw)
  return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.mode = "all"          # pretrain | generate | meta_train | visualize | prune | all
  config.seed = 0              # root seed (init, data order, augmentation)
  config.dataset = "digits"    # digits | cifar10 | cifar100 | svhn | imagenet
  config.data_dir = ""         # tfds data dir ('' = tfds default); unused for digits
  config.val_fraction = -1.0   # share of the training split held out for validation, a fixed
                               # seeded carve (-1: the dataset's default; digits 0.2, CIFAR 0.1)
  config.arch = "resnet8"      # a zoo name (CIFAR-style ResNet-8, 16/32/64 channels)
  config.widths = ml_collections.ConfigDict()  # optional {space: width} overrides
  config.log_compiles = False  # log every XLA compilation
  config.data_workers = 0      # grain worker processes decoding/augmenting training batches
                               # (0: one prefetch thread; see benchmarks/input_pipeline.py)
  config.pretrain = schedule()

  # ---- generate: the data-model set (docs/design.md section 2) ----
  config.data_models_dir = ""  # another run's workdir holding data_models/ ('' = this one)
  config.generate = ml_collections.ConfigDict()
  config.generate.num_models = 8          # data models (the last 20% validate meta-training)
  config.generate.initial_speed_up = 1.5  # group-L2 progressive pruning target per data model
  config.generate.train = schedule()      # from scratch, trained like the base network
  config.generate.finetune = schedule(epochs=3, lr=0.01, milestones=(2,))
  # Multi-host: each process trains its own share (models p, p+P, ...) on its own devices and
  # waits for the others at the end (at most barrier_timeout_hours); False: every model
  # data parallel over all processes.
  config.generate.per_process = True
  config.generate.barrier_timeout_hours = 72.0

  # ---- metanetwork (docs/design.md section 4); node_dim / edge_dims come from the graph ----
  config.metanet = ml_collections.ConfigDict()
  config.metanet.num_layers = 3
  config.metanet.hidden = 16
  config.metanet.node_res_ratio = 0.1     # the reference: 0.01 (ResNet-56), 0.05 (VGG-19)
  config.metanet.edge_res_ratio = 0.1
  # matmul precision (metanet.matmul_precision): 'highest' where parity with the reference is
  # checked, 'default' (the backend's: bfloat16/TF32 passes on TPUs and TF32 GPUs) otherwise
  config.metanet.precision = "default"

  # ---- meta_train (docs/design.md section 5) ----
  config.metanet_dir = ""  # another run's workdir holding meta_train/ ('' = this one)
  config.meta_train = ml_collections.ConfigDict()
  config.meta_train.epochs = 30
  config.meta_train.lr = 3e-3
  config.meta_train.lr_milestones = (6,)  # epochs at which lr *= 0.1 (the reference: early too)
  config.meta_train.weight_decay = 5e-4
  config.meta_train.alpha = 16.0          # gamma base of the group-norm regulariser
  config.meta_train.reg = 0.1             # regulariser strength (the reference: 10; recipe v5)
  config.meta_train.normalizer = "max"
  config.meta_train.bn = "running"  # the data models' BatchNorm in the cross-entropy: "running"
                                   # statistics (the reference's) or "batch" (as in training)
  config.meta_train.prune_aware = 0.0  # > 1: the loss also takes the CE of each transformed
                                      # data model pruned to this speed-up over it (0: off)
  config.meta_train.prune_aware_bn = "running"  # that pruned network's BatchNorm: "running"
                                                # statistics or "batch" statistics
  config.meta_train.prune_aware_steps = 0  # > 0: that pruned network's loss after this many
                                          # SGD steps, differentiated through (a finetune)
  config.meta_train.prune_aware_lr = 0.1   # those steps' learning rate
  config.meta_train.imitate_sl = 0.0  # > 0: the loss also takes this weight times each
                                     # transformed data model's relative distance to that data
                                     # model after sparse learning (prune.sl; an extension)
  config.meta_train.imitate_on = "weights"  # that distance on the channels' "weights" (group-L2
                                            # shares), "activations" (post-ReLU signal shares)
                                            # or "both" (their sum)
  config.meta_train.reg_warmup_epochs = 0  # the strength rises linearly to `reg` over this many
                                           # epochs (0: full strength from the first step)
  # config.meta_train.reg_form = "relative": a scale-invariant per-group regulariser (see
  # metaprune_jax.regularizer and docs/recipe_search.md); unset, the reference's ("absolute")
  config.meta_train.batch_size = 64       # images per data batch (CIFAR: 500)
  config.meta_train.batches_per_model = 0  # data batches per data model and step (0: the whole
                                           # training split, faithful; low-memory: 1)
  config.meta_train.chunk_size = 100  # images per scanned forward/backward (>= batch: one)
  config.meta_train.models_per_step = 0   # data models per optimizer step (0: device count)
  config.meta_train.val_fraction = 0.2
  config.meta_train.eval_batch_size = 144
  config.meta_train.val_batches = 0       # validation batches per validation model (0: all)

  # ---- finetune schedules of visualize and prune (docs/design.md section 2) ----
  # "after metanetwork": the transform budget of every prune method (metanetwork + finetune,
  # sparse learning, or a plain finetune), keeping the last epoch.
  config.finetune_after_metanet = schedule(epochs=10, lr=0.01, milestones=(7,))
  # "after pruning": keeps the best validation-accuracy epoch.
  config.finetune_after_pruning = schedule(epochs=10, lr=0.01, milestones=(7,), keep="best")
  config.reference_compat = False  # reproduce the reference's classifier scramble (meta-training and
                                   # applying the metanetwork, docs/design.md 3.2); only to compare with it

  # ---- visualize: accuracy-vs-speed-up curves per metanetwork epoch ----
  config.visualize = ml_collections.ConfigDict()
  config.visualize.enabled = True        # run it in mode `all`
  config.visualize.epochs = ()           # metanetwork epochs to plot (empty: every saved one)
  config.visualize.every = 5             # with epochs empty: every N-th saved epoch (+ the last)
  config.visualize.data_model = 0        # which validation data model (0: the first)
  config.visualize.max_speed_up = 10.0   # curves stop at this overall speed-up
  config.visualize.steps = 200           # progressive pruning steps (the reference: 200)
  config.visualize.criterion = "l2"      # 'l2' (group L2) | 'random'
  config.visualize.normalizer = "max"    # importance normaliser: max | mean | none
  config.visualize.accuracy_threshold = 0.0  # > 0: also record the speed-up reached before
                                             # accuracy first falls below it (reference metric)
  config.visualize.eval_batch_size = 144

  # ---- prune: the user's job (base network -> pruned network + report) ----
  config.base_workdir = ""            # pretrain workdir of the base network ('' = this one)
  config.prune = ml_collections.ConfigDict()
  config.prune.method = "metanet"     # 'metanet' | 'sl' (DepGraph sparse learning) | 'group_l2'
                                      # | 'random'; every method gets the same stages and budget
  config.prune.target_speed_up = 6.0  # overall MACs speed-up vs the base network
  config.prune.initial_speed_up = 0.0  # before the metanetwork (0: generate.initial_speed_up);
                                       # finetuned with config.generate.finetune
  config.prune.metanet_epoch = 0      # metanetwork epoch: -1 the last; 0 the best on the
                                      # validation curves of `visualize` (in metanet_dir)
  config.prune.steps = 200            # progressive pruning steps per pruning (reference: 200)
  config.prune.criterion = "l2"
  config.prune.normalizer = "max"
  config.prune.round_to = 1           # kept channel counts rounded to multiples of this in the
                                      # final pruning (1: the reference's decisions; 8: faster)
  config.prune.max_pruning_ratio = 1.0  # the final pruning removes at most this share of each
                                        # group's channels (1: no limit, the reference)
  config.prune.base_state_dict = ""   # optional: a reference state dict (.npz/.pth) as the base
  config.prune.latency_batch = 128    # wall-clock inference timing: batch and runs (median)
  config.prune.latency_runs = 20
  config.prune.stage_dir = ""         # cache of finished stages ('' = <workdir>/prune/stages);
                                      # runs that share one reuse their common stages
  # DepGraph's sparse learning (method 'sl'): the group-norm regulariser of meta-training on the
  # network's own weights, trained for the transform budget (finetune_after_metanet.epochs)
  config.prune.sl = ml_collections.ConfigDict()
  config.prune.sl.reg = 1e-2          # strength (> 0)
  config.prune.sl.alpha = 16.0        # gamma's base, as meta-training's
  config.prune.sl.normalizer = "max"
  config.prune.sl.epochs = -1         # -1: the transform budget (any other value must equal it)
  config.pruning = ml_collections.ConfigDict()
  config.pruning.method = ""          # alias of prune.method ('' = use prune.method)
  return config
