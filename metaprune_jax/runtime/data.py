"""Input pipelines: the embedded digits set and tfds image datasets, deterministic and per host.

Why one module of ~470 lines: sources, per-example transforms and :class:`Dataset` are one
pipeline whose guarantee (a batch is a pure function of seed, epoch and step, on any host) rests
on how the three index and seed each other: the validation carve-out, the seeded shuffle and the
per-example generators below. The reference's augmentations among them are small numpy
functions used only here; :func:`get_dataset` and :func:`dataset_from_config` are the public
face.

Every pipeline yields *host-local* slices of fixed-size *global* batches as numpy arrays:
`{'image': [local_batch, H, W, 3] float32 (normalised NHWC), 'label': [local_batch] int32}`.
The training batch at global step `s` is a pure function of `(seed, epoch, step_in_epoch)` with
`epoch, step_in_epoch = divmod(s, steps_per_epoch)`: the epoch's order is a seeded index shuffle
and each example's augmentation draws from a generator seeded by `(seed, epoch, position)`. A
resumed run therefore sees exactly the batches an uninterrupted run would have seen, starting at
any step in O(1).

Why `tfds.data_source` + `grain` rather than `tfds.load` / `tf.data`: the data source reads
ArrayRecord files with random access and needs no TensorFlow (not installed here); grain's
`MapDataset` composes a random-access index shuffle, a per-example seeded random map and batching,
so any batch can be built directly from its index (resume, per-host sharding) without replaying
an iterator. Each process reads only its own part of every global batch
(`jax.process_index()`-th slice of `global_batch / jax.process_count()` examples).

Augmentation and normalisation follow the reference (docs/design.md section 7): CIFAR-10/100 random
crop 32 with 4 zero pixels of padding (in [0, 1] pixel space, before normalising) + horizontal
flip; SVHN 'train' split only, crop, no flip; ImageNet random-resized-crop 224 + flip for training,
resize 256 + centre crop 224 for evaluation. The embedded default is scikit-learn's `load_digits`
(8x8 gray, 10 classes, shipped inside the package): a fixed 80/20 train/test split, gray replicated
to 3 channels, random crop with 1 pixel of padding.

Every dataset also has a *validation* split, carved from its training split by a fixed seeded
permutation (``DatasetSpec.val_fraction``: digits 20%, CIFAR/SVHN 10%, ImageNet 1%; the config's
``val_fraction`` overrides it): selections are made on it, the test split is only reported.
"""

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

from absl import flags
import grain
import jax
import numpy as np

from metaprune_jax.runtime import sharding

Batch = dict[str, np.ndarray]


class DatasetNotPreparedError(RuntimeError):
  """A tfds dataset is missing from the data directory (we never download)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static description of one dataset.

  Properties:
    name: our name (also the config value `config.dataset`).
    tfds_name: the tfds builder name; None for the embedded digits set.
    train_split / test_split: tfds split names.
    num_classes: number of classes.
    image_hw: (H, W) of the network input.
    mean / std: per-channel normalisation in [0, 1] pixel space.
    kind: 'crop' (pad + random crop, CIFAR-style) or 'imagenet' (random-resized-crop).
    pad: zero padding of the random crop ('crop' kind).
    flip: random horizontal flip in training.
    val_fraction: default share of the training split held out as the validation split.
  """

  name: str
  tfds_name: str | None
  train_split: str
  test_split: str
  num_classes: int
  image_hw: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  kind: str = "crop"
  pad: int = 4
  flip: bool = True
  val_fraction: float = 0.1


# Digits' mean/std are those of the fixed training split in [0, 1] space (computed once).
SPECS: dict[str, DatasetSpec] = {
  "digits": DatasetSpec(
    "digits", None, "train", "test", 10, (8, 8), (0.3050,) * 3, (0.3757,) * 3, pad=1, flip=False,
    val_fraction=0.2,
  ),
  "cifar10": DatasetSpec(
    "cifar10", "cifar10", "train", "test", 10, (32, 32),
    (0.4914, 0.4822, 0.4465), (0.2023, 0.2010, 0.1971),
  ),
  "cifar100": DatasetSpec(
    "cifar100", "cifar100", "train", "test", 100, (32, 32),
    (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
  ),
  "svhn": DatasetSpec(
    "svhn", "svhn_cropped", "train", "test", 10, (32, 32),
    (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), flip=False,
  ),
  "imagenet": DatasetSpec(
    "imagenet", "imagenet2012", "train", "validation", 1000, (224, 224),
    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), kind="imagenet", val_fraction=0.01,
  ),
}
SPECS["svhn_cropped"] = SPECS["svhn"]
SPECS["imagenet2012"] = SPECS["imagenet"]


class _ArraySource:
  """Random-access source over in-memory arrays (the digits set); grain's source protocol."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images = images  # [N, H, W, 3] uint8
    self._labels = labels  # [N] int

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._images[index], "label": self._labels[index]}


class _SubsetSource:
  """The examples ``indices`` of a random-access source, in that order."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


VAL_SEED = 20250  # the validation split's permutation seed: fixed, whatever the run's seed


def validation_split(num_train: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """``(train_indices, val_indices)``: a fixed, seeded carve of a training split.

  The permutation depends only on ``num_train`` (seed ``VAL_SEED``), so every run, seed and
  process holds out the same examples; both index arrays are sorted.

  Args:
    num_train: examples in the original training split.
    val_fraction: share held out, in ``[0, 1)``; 0 gives an empty validation split.

  Raises:
    ValueError: a fraction outside ``[0, 1)`` or one that leaves no training example.
  """
  if not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
  n_val = int(round(num_train * float(val_fraction)))
  if n_val >= num_train:
    raise ValueError(f"val_fraction={val_fraction} leaves no training example of {num_train}")
  perm = np.random.default_rng(VAL_SEED).permutation(num_train)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@functools.cache
def _digits_sources() -> tuple[_ArraySource, _ArraySource]:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  # Pixels are 0..16; store as uint8 0..255-scaled so every dataset shares the uint8 path.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(labels))  # the fixed split
  num_test = len(labels) // 5
  test, train = perm[:num_test], perm[num_test:]
  return _ArraySource(images[train], labels[train]), _ArraySource(images[test], labels[test])


def _tfds_source(spec: DatasetSpec, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for a missing / non-array_record dataset.
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    raise DatasetNotPreparedError(
      f"Dataset {spec.tfds_name!r} (split {split!r}) is not prepared in {where} as ArrayRecord "
      f"files; metaprune_jax never downloads. Prepare it with:\n"
      f"  tfds build {spec.tfds_name} --data_dir={data_dir or '~/tensorflow_datasets'} "
      f"--file_format=array_record\n(ImageNet needs the manual download in "
      f"<data_dir>/downloads/manual first.) Underlying error: {type(e).__name__}: {e}"
    ) from e


# ---------------------------------------------------------------------------- transforms


def _normalise(image: np.ndarray, spec: DatasetSpec) -> np.ndarray:
  return (image - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def _to_float(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image.astype(np.float32) * np.float32(1.0 / 255.0)


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  pil = Image.fromarray(np.asarray(image, np.uint8))
  return np.asarray(pil.resize((hw[1], hw[0]), Image.BILINEAR))


def _random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """torchvision RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) on uint8 HWC."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(round(np.sqrt(target * ratio)))
    ch = int(round(np.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return _resize(image[top : top + ch, left : left + cw], (size, size))
  # Fallback: central crop at the clamped aspect ratio, as torchvision does.
  in_ratio = w / h
  if in_ratio < 3 / 4:
    cw, ch = w, int(round(w / (3 / 4)))
  elif in_ratio > 4 / 3:
    ch, cw = h, int(round(h * (4 / 3)))
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return _resize(image[top : top + ch, left : left + cw], (size, size))


def _resize_centre_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  scale = resize / min(h, w)
  nh, nw = max(resize, int(round(h * scale))), max(resize, int(round(w * scale)))
  image = _resize(image, (nh, nw))
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top : top + size, left : left + size]


def _train_transform(record: dict[str, Any], rng: np.random.Generator, spec: DatasetSpec):
  """One augmented training example -> {'image': [H, W, 3] f32, 'label': i32}."""
  if spec.kind == "imagenet":
    image = _to_float(_random_resized_crop(np.asarray(record["image"]), rng, spec.image_hw[0]))
  else:
    image = _to_float(record["image"])
    h, w = image.shape[:2]
    p = spec.pad
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))
    top, left = rng.integers(0, 2 * p + 1, size=2)
    image = padded[top : top + h, left : left + w]
  if spec.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {"image": _normalise(image, spec), "label": np.int32(record["label"])}


def _eval_transform(record: dict[str, Any], spec: DatasetSpec):
  image = np.asarray(record["image"])
  if spec.kind == "imagenet":
    image = _resize_centre_crop(image, 256, spec.image_hw[0])
  return {"image": _normalise(_to_float(image), spec), "label": np.int32(record["label"])}


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------------- the dataset


class Dataset:
  """Train, validation and test pipelines of one dataset for one process of a run.

  The validation split is a fixed, seeded carve of the original training split
  (:func:`validation_split`): training batches never contain it, every selection (keep-best
  epochs, metanetwork epochs, recipes) is made on it, and the test split is only reported.

  Attributes:
    spec: the DatasetSpec.
    num_train / num_val / num_test: example counts (``num_train`` without the validation split).
  """

  def __init__(self, spec: DatasetSpec, train_source, test_source,
               shard: tuple[int, int] | None = None, val_source=None):
    self.spec = spec
    self._train = train_source
    self._test = test_source
    self._val = val_source if val_source is not None else _SubsetSource(test_source, [])
    self.num_train = len(train_source)
    self.num_val = len(self._val)
    self.num_test = len(test_source)
    self._shard = shard  # (process count, this process's position); None: all of jax's

  def for_mesh(self, mesh) -> "Dataset":
    """This dataset as read by a run on `mesh`: each of the mesh's processes reads its part.

    On a mesh over every process (the default) that is `jax.process_index()`'s part of
    `global_batch / jax.process_count()` rows; on a process-local mesh (`sharding.local_mesh()`)
    this process reads whole batches itself, the same ones a single-process run reads.
    """
    procs = list(sharding.mesh_processes(mesh))
    shard = (len(procs), procs.index(jax.process_index()))
    if shard == (jax.process_count(), jax.process_index()):
      shard = None
    if shard == self._shard:
      return self
    return Dataset(self.spec, self._train, self._test, shard, self._val)

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def image_hw(self) -> tuple[int, int]:
    return self.spec.image_hw

  def steps_per_epoch(self, global_batch: int) -> int:
    """Training steps per epoch (the last partial batch is dropped, as with drop_last)."""
    steps = self.num_train // global_batch
    if steps == 0:
      raise ValueError(f"Global batch {global_batch} exceeds the {self.num_train} examples of "
                       f"{self.spec.name!r}.")
    return steps

  def _local_batch(self, global_batch: int) -> tuple[int, int, int]:
    count, index = self._shard or (jax.process_count(), jax.process_index())
    if global_batch % count:
      raise ValueError(f"Global batch {global_batch} is not divisible by the process count "
                       f"{count}.")
    return global_batch // count, count, index

  @functools.lru_cache(maxsize=2)
  def _epoch_dataset(self, seed: int, epoch: int, local_batch: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(self._train).shuffle(seed=_epoch_seed(seed, epoch, 0))
    ds = ds.random_map(functools.partial(_train_transform_rm, spec=self.spec),
                       seed=_epoch_seed(seed, epoch, 1))
    return ds.batch(local_batch, drop_remainder=True)

  def train_batch(self, global_batch: int, seed: int, step: int) -> Batch:
    """This process's part of the training batch at global step `step`.

    Args:
      global_batch: examples per step over all processes.
      seed: the data seed.
      step: the global step (epoch = step // steps_per_epoch).

    Returns:
      {'image': [global_batch / process_count, H, W, 3] float32,
       'label': [global_batch / process_count] int32}.
    """
    local_batch, count, index = self._local_batch(global_batch)
    epoch, i = divmod(step, self.steps_per_epoch(global_batch))
    return self._epoch_dataset(seed, epoch, local_batch)[i * count + index]

  def train_batches(self, global_batch: int, seed: int, start_step: int = 0,
                    num_steps: int | None = None, prefetch: int = 2,
                    num_workers: int = 0) -> Iterator[Batch]:
    """Yields `train_batch(global_batch, seed, s)` for s = start_step, start_step + 1, ...

    A grain pipeline over the step numbers: batches are built `prefetch` steps ahead, in a
    background thread of this process (`num_workers=0`) or in `num_workers` worker processes
    (grain's `mp_prefetch`; the order is kept, each worker builds whole batches, so decoding and
    augmentation scale with the workers). Infinite when `num_steps` is None.
    """
    if int(num_workers) < 0:
      raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    # decided here, not in the workers (which may not know the process layout)
    local_batch, count, index = self._local_batch(global_batch)
    spe = self.steps_per_epoch(global_batch)
    end = start_step + num_steps if num_steps is not None else 2**62
    ds = grain.MapDataset.range(start_step, end).map(functools.partial(
        _batch_at_step, self, local_batch, count, index, spe, seed))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(
        1, prefetch)))
    if num_workers:
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags: take the defaults
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers),
                                                       per_worker_buffer_size=max(1, prefetch)))
    yield from it

  def _eval_source(self, split: str):
    if split == "test":
      return self._test
    if split == "val":
      if self.num_val == 0:
        raise ValueError(f"{self.spec.name!r} has an empty validation split "
                         "(val_fraction 0); evaluate on 'test' or hold out a validation split")
      return self._val
    raise ValueError(f"Unknown evaluation split {split!r}; choose 'val' or 'test'.")

  def num_eval_steps(self, global_batch: int, split: str = "test") -> int:
    return -(-len(self._eval_source(split)) // global_batch)

  def eval_batches(self, global_batch: int, split: str = "test") -> Iterator[Batch]:
    """An evaluation split (``'val'`` or ``'test'``) in order, padded to whole global batches.

    Yields:
      {'image': [local_batch, H, W, 3] float32, 'label': [local_batch] int32,
       'mask': [local_batch] float32 (0 for padding)}.
    """
    source = self._eval_source(split)
    num = len(source)
    local_batch, _, index = self._local_batch(global_batch)
    ds = grain.MapDataset.source(source).map(functools.partial(_eval_transform, spec=self.spec))
    for i in range(self.num_eval_steps(global_batch, split)):
      start = i * global_batch + index * local_batch
      positions = np.arange(start, start + local_batch)
      valid = positions < num
      records = [ds[int(p)] for p in np.where(valid, positions, 0)]
      yield {
        "image": np.stack([r["image"] for r in records]).astype(np.float32),
        "label": np.stack([r["label"] for r in records]).astype(np.int32),
        "mask": valid.astype(np.float32),
      }


def _batch_at_step(ds, local_batch, count, index, steps_per_epoch, seed, step):
  """`Dataset.train_batch` with the process layout given (grain workers of `train_batches`)."""
  epoch, i = divmod(step, steps_per_epoch)
  return ds._epoch_dataset(seed, epoch, local_batch)[i * count + index]  # pylint: disable=protected-access


def _train_transform_rm(record, rng, spec):
  return _train_transform(record, rng, spec)


def get_dataset(name: str, data_dir: str | None = None,
                val_fraction: float | None = None) -> Dataset:
  """Builds the pipelines of dataset `name`.

  Args:
    name: one of `SPECS` ('digits', 'cifar10', 'cifar100', 'svhn', 'imagenet').
    data_dir: tfds data directory (None: tfds's default).
    val_fraction: share of the training split held out for validation (None or < 0: the
      dataset's default, ``spec.val_fraction``; 0: none).

  Returns:
    A :class:`Dataset` over all processes (``for_mesh`` narrows it to one run's). Its batches
    are dicts of numpy arrays: ``train_batch`` gives ``{'image': [b, H, W, 3] float32
    (normalised NHWC, ``spec.image_hw``), 'label': [b] int32}``, ``eval_batches`` adds ``'mask':
    [b] float32`` (0 for the padding of the last batch), ``b`` this process's share of the
    global batch.

  Raises:
    ValueError: unknown name, a fraction outside [0, 1).
    DatasetNotPreparedError: the tfds dataset is not prepared in `data_dir`.
  """
  if name not in SPECS:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(SPECS)}.")
  spec = SPECS[name]
  if spec.tfds_name is None:
    train, test = _digits_sources()
  else:
    train = _tfds_source(spec, spec.train_split, data_dir)
    test = _tfds_source(spec, spec.test_split, data_dir)
  if val_fraction is None or float(val_fraction) < 0:
    val_fraction = spec.val_fraction
  train_idx, val_idx = validation_split(len(train), val_fraction)
  return Dataset(spec, _SubsetSource(train, train_idx), test,
                 val_source=_SubsetSource(train, val_idx))


def dataset_from_config(config) -> Dataset:
  """``get_dataset(config.dataset, config.data_dir, config.val_fraction)`` (absent: defaults)."""
  return get_dataset(config.dataset, config.get("data_dir") or None,
                     config.get("val_fraction", None))
