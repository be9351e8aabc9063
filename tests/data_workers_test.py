"""`Dataset.train_batches` on grain's prefetching: threads and worker processes, same batches."""

import numpy as np
import pytest

from metaprune_jax.runtime import data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_batches_equal_train_batch_at_every_step(num_workers):
  ds = data.get_dataset("digits")
  spe = ds.steps_per_epoch(32)
  got = list(ds.train_batches(32, seed=3, start_step=spe - 2, num_steps=5,
                              num_workers=num_workers))
  assert len(got) == 5
  for k, b in enumerate(got):
    want = ds.train_batch(32, 3, spe - 2 + k)
    np.testing.assert_array_equal(b["image"], want["image"])
    np.testing.assert_array_equal(b["label"], want["label"])


def test_infinite_stream_and_bad_worker_count():
  ds = data.get_dataset("digits")
  it = ds.train_batches(16, seed=0, start_step=7)
  first = [next(it) for _ in range(3)]
  np.testing.assert_array_equal(first[2]["image"], ds.train_batch(16, 0, 9)["image"])
  with pytest.raises(ValueError, match="num_workers must be >= 0"):
    next(ds.train_batches(16, seed=0, num_workers=-1))
