"""Config errors: caught before any work, one line on stderr, exit status 2, nothing written."""

import importlib.util
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from metaprune_jax.modes import config_check

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_config():
  spec = importlib.util.spec_from_file_location("_digits_cfg",
                                                os.path.join(_ROOT, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _cli(workdir, *flags, devices=1):
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "metaprune_jax",
                         f"--config={_ROOT}/configs/digits.py", f"--workdir={workdir}", *flags],
                        env=env, cwd=_ROOT, capture_output=True, text=True, timeout=120)


class CheckConfigTest(parameterized.TestCase):

  def _check(self, devices=1, **overrides):
    config = _digits_config()
    for path, value in overrides.items():
      *parents, key = path.split("__")
      node = config
      for p in parents:
        node = node[p]
      node[key] = value
    config_check.check_config(config, num_devices=devices, num_local_devices=devices,
                              num_processes=1)

  def test_shipped_configs_pass(self):
    for name in ("digits", "resnet56_cifar10", "vgg19_cifar100", "resnet50_imagenet"):
      spec = importlib.util.spec_from_file_location(
          f"_cfg_{name}", os.path.join(_ROOT, "configs", f"{name}.py"))
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      for devices in (1, 8):
        config = module.get_config()
        if devices == 8 and name in ("digits", "resnet50_imagenet"):
          # 6 (digits) and 2 (ImageNet) training data models: a meta-training step holds one
          # model per device, so 8 devices are refused before any work
          with self.assertRaisesRegex(config_check.ConfigError,
                                      "meta-training step needs 8 training data models"):
            config_check.check_config(config, num_devices=8, num_local_devices=8,
                                      num_processes=1)
          config.mode = "pretrain"  # the other modes run on 8 devices
        config_check.check_config(config, num_devices=devices, num_local_devices=devices,
                                  num_processes=1)

  @parameterized.parameters(
      ("pretrain__batch_size", 0, "config.pretrain.batch_size=0: must be a positive integer"),
      ("pretrain__epochs", -1, "config.pretrain.epochs=-1: must be a positive integer"),
      ("generate__finetune__eval_batch_size", 0, "config.generate.finetune.eval_batch_size=0"),
      ("finetune_after_pruning__epochs", 0, "config.finetune_after_pruning.epochs=0"),
      ("meta_train__batch_size", 0, "config.meta_train.batch_size=0"),
      ("meta_train__epochs", 0, "config.meta_train.epochs=0"),
      ("mode", "nope", "config.mode='nope': unknown mode"),
      ("dataset", "mnist", "config.dataset='mnist': unknown dataset"),
      ("arch", "resnet57", "config.arch='resnet57': unknown architecture"),
      ("pretrain__optimizer", "adam", "config.pretrain.optimizer='adam': unknown optimizer"),
      ("generate__train__keep", "first", "config.generate.train.keep='first': unknown keep"),
      ("prune__method", "magnitude", "config.prune.method='magnitude': unknown pruning method"),
      ("pruning__method", "x", "config.pruning.method='x': unknown pruning method"),
      ("meta_train__normalizer", "sum", "config.meta_train.normalizer='sum': unknown norm"),
      ("meta_train__reg_form", "l1", "config.meta_train.reg_form='l1': unknown regulariser form"),
      ("meta_train__reg_form", "share:1.5", "config.meta_train.reg_form='share:1.5': unknown "
       "regulariser form"),
      ("meta_train__reg_warmup_epochs", -1, "config.meta_train.reg_warmup_epochs=-1: must be "
       "an integer >= 0"),
      ("meta_train__reg_warmup_epochs", 31, "config.meta_train.reg_warmup_epochs=31: longer "
       "than meta_train.epochs=30"),
      ("meta_train__bn", "train", "config.meta_train.bn='train': unknown BatchNorm mode"),
      ("meta_train__imitate_sl", -1.0, "config.meta_train.imitate_sl=-1.0: must be a weight "
       ">= 0"),
      ("meta_train__imitate_on", "signals", "config.meta_train.imitate_on='signals': unknown "
       "imitation distance"),
      ("meta_train__prune_aware", 0.5, "config.meta_train.prune_aware=0.5: must be 0 (off) or "
       "a speed-up > 1"),
      ("meta_train__prune_aware", -2.0, "config.meta_train.prune_aware=-2.0: must be 0"),
      ("meta_train__prune_aware_steps", -1, "config.meta_train.prune_aware_steps=-1: must be "
       "an integer >= 0"),
      ("meta_train__prune_aware_lr", 0.0, "config.meta_train.prune_aware_lr=0.0: must be a "
       "learning rate > 0"),
      ("visualize__criterion", "l1", "config.visualize.criterion='l1': unknown criterion"),
      ("prune__normalizer", "l2", "config.prune.normalizer='l2': unknown normalizer"),
      ("prune__round_to", 0, "config.prune.round_to=0: must be a positive integer"),
      ("prune__round_to", -8, "config.prune.round_to=-8: must be a positive integer"),
      ("prune__max_pruning_ratio", 0.0, "config.prune.max_pruning_ratio=0.0: must be a number "
       "in (0, 1]"),
      ("prune__max_pruning_ratio", 1.5, "config.prune.max_pruning_ratio=1.5: must be a number "
       "in (0, 1]"),
      ("data_workers", -1, "config.data_workers=-1: must be an integer >= 0"),
      ("metanet__precision", "float16",
       "config.metanet.precision='float16': unknown matmul precision"),
  )
  def test_invalid_field(self, field, value, message):
    with self.assertRaises(config_check.ConfigError) as ctx:
      self._check(**{field: value})
    self.assertStartsWith(str(ctx.exception), message)
    self.assertEqual(ctx.exception.field, field.replace("__", "."))
    self.assertIsInstance(ctx.exception, ValueError)

  @parameterized.parameters(
      (dict(prune__sl__reg=0.0), "config.prune.sl.reg=0.0: the sparse-learning strength"),
      (dict(prune__sl__reg=-1e-3), "config.prune.sl.reg=-0.001: the sparse-learning strength"),
      (dict(prune__sl__epochs=0), "config.prune.sl.epochs=0: sparse learning needs epochs"),
      (dict(prune__sl__epochs=3), "config.prune.sl.epochs=3: cannot be matched"),
  )
  def test_bad_sparse_learning(self, overrides, message):
    with self.assertRaises(config_check.ConfigError) as ctx:
      self._check(prune__method="sl", **overrides)
    self.assertStartsWith(str(ctx.exception), message)
    with self.assertRaises(config_check.ConfigError):
      self._check(prune__method="metanet_sl", **overrides)
    self._check(prune__method="group_l2", **overrides)  # only sl reads them
    with self.assertRaises(config_check.ConfigError):  # and the targets of imitate_sl
      self._check(prune__method="group_l2", meta_train__imitate_sl=10.0, **overrides)

  @parameterized.parameters("metanet", "group_l2", "sl", "random", "metanet_sl")
  def test_pruning_methods(self, method):
    self._check(prune__method=method)

  def test_names_match_the_library(self):
    # config_check keeps its own copies (it imports no jax): they must be the library's
    from metaprune_jax.modes import prune  # pylint: disable=g-import-not-at-top
    from metaprune_jax.runtime import train  # pylint: disable=g-import-not-at-top
    self.assertEqual(config_check.KEEP, train.KEEP)
    self.assertEqual(set(config_check.PRUNE_METHODS), set(prune.METHODS))
    self._check(finetune_after_pruning__keep="best_from_start")

  def test_batches_the_devices_do_not_divide(self):
    self._check(devices=4)
    with self.assertRaisesRegex(config_check.ConfigError,
                                r"^config\.pretrain\.batch_size=30: must be divisible by the "
                                r"global device count 4; use a multiple of 4 \(e\.g\. 28\)$"):
      self._check(devices=4, pretrain__batch_size=30)
    with self.assertRaisesRegex(config_check.ConfigError, "visualize.eval_batch_size=90"):
      self._check(devices=4, visualize__eval_batch_size=90)
    with self.assertRaisesRegex(config_check.ConfigError, "meta_train.models_per_step=3"):
      self._check(devices=2, meta_train__models_per_step=3)

  def test_meta_training_needs_a_training_data_model_per_device(self):
    msg = (r"^config\.meta_train\.models_per_step=0: a meta-training step needs 8 training data "
           r"models \(one per device of 8\) but generate\.num_models=8 leaves 6 after the "
           r"validation share; generate at least 10 models")
    with self.assertRaisesRegex(config_check.ConfigError, msg):
      self._check(devices=8)
    with self.assertRaisesRegex(config_check.ConfigError, "models_per_step=8: a meta-training"):
      self._check(devices=8, mode="meta_train", meta_train__models_per_step=8)
    self._check(devices=8, generate__num_models=10)
    self._check(devices=8, metanet_dir="/elsewhere")  # not meta-trained here
    self._check(devices=8, prune__method="sl")  # `all` without the metanetwork
    self._check(devices=8, mode="generate")

  def test_generate_per_process_divides_by_local_devices(self):
    config = _digits_config()
    config.mode = "generate"  # (meta-training on 8 devices needs more data models)
    config.generate.train.batch_size = 8  # 2 processes x 4 devices: 8 global, 4 local
    config.pretrain.batch_size = 8
    config_check.check_config(config, num_devices=8, num_local_devices=4, num_processes=2)
    config.generate.finetune.batch_size = 4
    config_check.check_config(config, num_devices=8, num_local_devices=4, num_processes=2)
    config.generate.per_process = False
    with self.assertRaisesRegex(config_check.ConfigError, "generate.finetune.batch_size=4"):
      config_check.check_config(config, num_devices=8, num_local_devices=4, num_processes=2)


class CliTest(parameterized.TestCase):

  @parameterized.parameters(
      (("--config.pretrain.batch_size=0",), 1,
       "config error: config.pretrain.batch_size=0: must be a positive integer"),
      (("--config.generate.train.epochs=0",), 1,
       "config error: config.generate.train.epochs=0: must be a positive integer"),
      (("--config.pretrain.batch_size=33",), 2,
       "config error: config.pretrain.batch_size=33: must be divisible by the global device "
       "count 2; use a multiple of 2 (e.g. 32)"),
      (("--config.mode=nope",), 1, "config error: config.mode='nope': unknown mode; choose"),
      (("--config.dataset=mnist",), 1, "config error: config.dataset='mnist': unknown dataset"),
      (("--config.prune.method=magnitude",), 1,
       "config error: config.prune.method='magnitude': unknown pruning method"),
      (("--config.pretrain.batch_size=abc",), 1, "config error: flag --config.pretrain.batch_"),
      (("--config.no_such_field=1",), 1, "config error: a --config.<field> flag names no field"),
      (("pretrain",), 1, "config error: unexpected arguments ['pretrain']"),
  )
  def test_exit_2_one_line_nothing_written(self, flags, devices, message):
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    out = _cli(workdir, *flags, devices=devices)
    self.assertEqual(out.returncode, 2, out.stderr)
    self.assertEqual(out.stderr.count("\n"), 1, out.stderr)
    self.assertStartsWith(out.stderr, message)
    self.assertEqual(out.stdout, "")
    self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
