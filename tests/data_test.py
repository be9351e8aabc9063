"""Input pipelines: determinism, resume position, eval padding, tfds mock path, errors."""

import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

from metaprune_jax import data


class DigitsTest(absltest.TestCase):

  def test_shapes_and_split(self):
    ds = data.get_dataset("digits")
    self.assertEqual((ds.num_train, ds.num_test), (1438, 359))
    b = ds.train_batch(32, seed=0, step=0)
    self.assertEqual(b["image"].shape, (32, 8, 8, 3))
    self.assertEqual(b["image"].dtype, np.float32)
    self.assertEqual(b["label"].dtype, np.int32)
    np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])  # gray replicated

  def test_batches_are_functions_of_seed_and_step(self):
    ds = data.get_dataset("digits")
    spe = ds.steps_per_epoch(32)
    run = list(ds.train_batches(32, seed=3, start_step=0, num_steps=spe + 3))
    resumed = list(ds.train_batches(32, seed=3, start_step=spe - 1, num_steps=4))
    for a, b in zip(run[spe - 1 :], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = ds.train_batch(32, seed=4, step=0)
    self.assertFalse(np.array_equal(run[0]["image"], other_seed["image"]))
    # A new epoch is a new order.
    self.assertFalse(np.array_equal(run[0]["label"], run[spe]["label"]))
    # Each epoch visits distinct examples (a permutation, no repeats within the epoch).
    labels = np.concatenate([r["label"] for r in run[:spe]])
    self.assertLen(labels, spe * 32)

  def test_eval_batches_cover_test_split_once(self):
    ds = data.get_dataset("digits")
    batches = list(ds.eval_batches(100))
    self.assertLen(batches, 4)
    self.assertEqual(sum(b["mask"].sum() for b in batches), ds.num_test)
    self.assertEqual(batches[-1]["image"].shape, (100, 8, 8, 3))

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, "Unknown dataset 'mnist'"):
      data.get_dataset("mnist")

  def test_steps_per_epoch_too_large_batch(self):
    with self.assertRaisesRegex(ValueError, "exceeds"):
      data.get_dataset("digits").steps_per_epoch(4096)


class TfdsTest(absltest.TestCase):

  def test_cifar10_through_mock_data(self):
    with tfds.testing.mock_data(num_examples=40):
      ds = data.get_dataset("cifar10")
      b = ds.train_batch(8, seed=0, step=2)
      b2 = ds.train_batch(8, seed=0, step=2)
      e = next(ds.eval_batches(16))
    self.assertEqual(b["image"].shape, (8, 32, 32, 3))
    np.testing.assert_array_equal(b["image"], b2["image"])
    self.assertEqual(e["image"].shape, (16, 32, 32, 3))
    self.assertLess(abs(float(e["image"].mean())), 3.0)

  def test_imagenet_through_mock_data(self):
    with tfds.testing.mock_data(num_examples=4):
      ds = data.get_dataset("imagenet")
      b = ds.train_batch(2, seed=0, step=0)
      e = next(ds.eval_batches(2))
    self.assertEqual(b["image"].shape, (2, 224, 224, 3))
    self.assertEqual(e["image"].shape, (2, 224, 224, 3))

  def test_not_prepared_names_dir_and_command(self):
    d = tempfile.mkdtemp()
    with self.assertRaisesRegex(data.DatasetNotPreparedError,
                                f"(?s)not prepared in {d}.*tfds build cifar100"):
      data.get_dataset("cifar100", data_dir=d)


if __name__ == "__main__":
  absltest.main()
