"""Input-pipeline throughput: the ImageNet-shaped training pipeline per grain worker, on mock data.

  python benchmarks/input_pipeline.py [--workers 0 1 2] [--batch 64] [--batches 12]

``tfds.testing.mock_data`` stands in for a prepared ``imagenet2012`` (no download, no files):
its data source is replaced by one whose records hold ImageNet-sized JPEGs (500x375, quality 90,
decoded with Pillow on every read, as the real ArrayRecord source decodes them), so a batch costs
what a real one costs here: JPEG decode, random-resized-crop to 224, flip, normalise
(``data._train_transform``). ``Dataset.train_batches(..., num_workers=N)`` builds whole batches
in N grain worker processes (0: one background thread of the main process).

Prints JSON: images/s for each worker count after a warm-up batch, images/s per worker, and the
machine's cores. Size an accelerator host's workers as (images/s the step consumes) / (images/s
per worker), within its cores: e.g. 8 GPUs at 3,000 images/s each need 24,000 images/s.
"""

import argparse
import io
import json
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from metaprune_jax.runtime import data

_W, _H = 500, 375  # ImageNet's most common training-image size


class JpegSource:
  """``n`` records ``{'image': uint8 [375, 500, 3] (decoded on read), 'label'}``. Picklable."""

  def __init__(self, n: int, distinct: int = 8):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    self.n = n
    rng = np.random.default_rng(0)
    self.jpegs = []
    for _ in range(distinct):
      # smooth random content (a photo compresses like this, white noise does not)
      small = rng.integers(0, 256, (_H // 25 + 1, _W // 25 + 1, 3), dtype=np.uint8)
      img = Image.fromarray(small).resize((_W, _H), Image.BILINEAR)
      buf = io.BytesIO()
      img.save(buf, format="JPEG", quality=90)
      self.jpegs.append(buf.getvalue())

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    index = int(index)
    img = np.asarray(Image.open(io.BytesIO(self.jpegs[index % len(self.jpegs)])).convert("RGB"))
    return {"image": img, "label": np.int64(index % 1000)}


def measure(workers: int, batch: int, batches: int, n: int) -> dict:
  source = JpegSource(n)
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: source):
    ds = data.get_dataset("imagenet")
  it = ds.train_batches(batch, seed=0, num_steps=batches + 1, prefetch=2, num_workers=workers)
  t0 = time.perf_counter()
  first = next(it)  # workers start, first batch
  t1 = time.perf_counter()
  count = 0
  for b in it:
    count += b["image"].shape[0]
  t2 = time.perf_counter()
  assert first["image"].shape == (batch, 224, 224, 3)
  ips = count / (t2 - t1)
  return {"workers": workers, "images_per_s": round(ips, 1),
          "images_per_s_per_worker": round(ips / max(workers, 1), 1),
          "first_batch_s": round(t1 - t0, 2), "timed_batches": batches}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=12)
  args = p.parse_args()
  n = args.batch * (args.batches + 2)
  t = time.perf_counter()
  one = JpegSource(8)
  decode = [one[i] for i in range(8)]
  decode_ms = (time.perf_counter() - t) / 8 * 1e3  # includes the 8 encodes: an upper bound
  out = {"cores": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
         "image_hw": [_H, _W], "batch": args.batch, "decode_plus_encode_ms": round(decode_ms, 2),
         "runs": [measure(w, args.batch, args.batches, n) for w in args.workers]}
  assert decode[0]["image"].shape == (_H, _W, 3)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
