"""Input pipelines: per-process, deterministic, resumable batches of images.

Two sources feed one tf.data pipeline:
- 'idx': the original MNIST / Fashion-MNIST IDX files, read into memory;
- 'tfds': any dataset in `_DATASETS` through TensorFlow Datasets.

Every epoch is a fresh pipeline whose randomness (file order, example order,
augmentation) is seeded from (seed, epoch), so the batch at a global step
depends only on (seed, step) and resuming never replays earlier epochs.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import itertools
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# TF only feeds the host; it must not reserve accelerator memory that JAX needs.
tf.config.set_visible_devices([], "GPU")

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UNSIGNED_BYTE = 0x08
_IDX_IMAGE_SIZE = (28, 28)
_IDX_MISSING_HINT = (
  "Install the files (`apt-get install dataset-fashion-mnist` puts Fashion-MNIST in "
  f"{DEFAULT_IDX_DIR}), set data.data_dir, or use data.source='tfds'."
)
_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the preprocessed model input
  num_train: int  # examples in the train split (whole dataset, all processes)
  num_eval: int  # examples in the eval split


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
  num_classes: int
  mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
  std: tuple[float, ...]
  tfds_eval_split: str = "test"


_DATASETS = {
  "mnist": _DatasetSpec(10, (0.1307,), (0.3081,)),
  "fashion_mnist": _DatasetSpec(10, (0.2860,), (0.3530,)),
  "cifar10": _DatasetSpec(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  # TFDS's imagenet2012 'test' split has no labels; 'validation' is the held-out set.
  "imagenet2012": _DatasetSpec(
    1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), tfds_eval_split="validation"
  ),
}
_IDX_DATASETS = ("mnist", "fashion_mnist")

# A function (split, process_index, process_count, file_order_seed) -> this process's
# examples {'image': uint8 [H, W, C], 'label': int32 []} in a fixed order, or with files
# shuffled by file_order_seed when it is not None.
ReadShard = Callable[[str, int, int, int | None], tf.data.Dataset]
# (uint8 image, stateless seed [2]) -> augmented image of the model's input shape.
Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# uint8 image -> image of the model's input shape.
EvalTransform = Callable[[tf.Tensor], tf.Tensor]


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (gzipped or not) into an array of its shape."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
  if len(raw) < 4:
    raise ValueError(f"{path}: truncated: expected a 4-byte IDX header, found {len(raw)} bytes")
  zeros, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  if zeros != 0:
    raise ValueError(f"{path}: bad magic number {raw[:4].hex()}: an IDX file starts with 0x0000")
  if dtype_code != _IDX_UNSIGNED_BYTE:
    raise ValueError(
      f"{path}: unsupported IDX data type 0x{dtype_code:02x}; only 0x08 (unsigned byte) is read"
    )
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise ValueError(
      f"{path}: truncated: expected a {header_size}-byte header for {ndim} dimensions, "
      f"found {len(raw)} bytes"
    )
  shape = struct.unpack(f">{ndim}I", raw[4:header_size])
  expected, found = math.prod(shape), len(raw) - header_size
  if found < expected:
    raise ValueError(
      f"{path}: truncated: expected {expected} bytes of data for shape {shape}, found {found}"
    )
  if found > expected:
    raise ValueError(
      f"{path}: {found - expected} trailing bytes after the {expected} bytes of data "
      f"for shape {shape}"
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx_file(data_dir: str, name: str) -> str:
  candidates = [os.path.join(data_dir, name + ".gz"), os.path.join(data_dir, name)]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f"IDX file not found: looked for {' and '.join(candidates)}. {_IDX_MISSING_HINT}"
  )


def load_idx_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
  """Loads split 'train' or 'test': {'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}."""
  if split not in _IDX_FILES:
    raise ValueError(f"Unknown IDX split {split!r}; expected one of {list(_IDX_FILES)}")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"IDX data directory {data_dir} does not exist. {_IDX_MISSING_HINT}")
  image_path, label_path = (_find_idx_file(data_dir, name) for name in _IDX_FILES[split])
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim != 3 or images.shape[1:] != _IDX_IMAGE_SIZE:
    raise ValueError(f"{image_path}: expected images of shape [N, 28, 28], found {images.shape}")
  if labels.ndim != 1:
    raise ValueError(f"{label_path}: expected labels of shape [N], found {labels.shape}")
  if len(images) != len(labels):
    raise ValueError(
      f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
    )
  return {"image": images[..., np.newaxis], "label": labels.astype(np.int32)}


# ----------------------------------------------------------------------------- Preprocessing


def _crop_and_flip_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  return crop_seed, flip_seed


def _pad_crop_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """CIFAR augmentation: zero-pad by 4, random crop back to size, random horizontal flip."""
  crop_seed, flip_seed = _crop_and_flip_seeds(seed)
  padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
  image = tf.image.stateless_random_crop(padded, size=image.shape, seed=crop_seed)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _resize_center_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """ImageNet eval: resize the short side to image_size / 0.875 (256 for 224), crop the center."""
  resize_size = round(image_size / 0.875)
  height_width = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize_size / tf.reduce_min(height_width)
  resized_shape = tf.cast(tf.round(height_width * scale), tf.int32)
  image = tf.image.resize(image, resized_shape, method="bicubic")
  return tf.image.resize_with_crop_or_pad(image, image_size, image_size)


def _random_resized_crop_flip(image: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  """ImageNet train augmentation, as in the Flax examples/imagenet input pipeline."""
  crop_seed, flip_seed = _crop_and_flip_seeds(seed)
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.shape(image),
    bounding_boxes=whole_image,
    seed=crop_seed,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  # The sampler returns the whole image when no box fits within max_attempts; as in
  # Flax, take the eval crop then rather than squashing the whole image to a square.
  sampling_failed = tf.reduce_all(size == tf.shape(image))
  image = tf.cond(
    sampling_failed,
    lambda: _resize_center_crop(image, image_size),
    lambda: tf.image.resize(tf.slice(image, begin, size), [image_size] * 2, method="bicubic"),
  )
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _image_transforms(
  name: str, image_size: int
) -> tuple[tuple[int, int, int], Augment | None, EvalTransform | None]:
  """(model input shape, train augmentation, eval transform) of dataset `name`."""
  if name == "cifar10":
    return (32, 32, 3), _pad_crop_flip, None
  if name == "imagenet2012":
    return (
      (image_size, image_size, 3),
      functools.partial(_random_resized_crop_flip, image_size=image_size),
      functools.partial(_resize_center_crop, image_size=image_size),
    )
  return (28, 28, 1), None, None


# ----------------------------------------------------------------------------- Pipeline


@dataclasses.dataclass(frozen=True)
class _ProcessShare:
  """This process's share of each global batch."""

  process_index: int
  process_count: int
  batch_size: int  # examples per process per step


def _process_share(
  global_batch_size: int, process_index: int | None, process_count: int | None
) -> _ProcessShare:
  """Validates the share of a global batch, defaulting to JAX's process index and count."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} must be a positive multiple of "
      f"process_count {process_count}"
    )
  return _ProcessShare(process_index, process_count, global_batch_size // process_count)


class InputPipeline:
  """Batches of one dataset for one process; see `build_input_pipeline`."""

  def __init__(
    self,
    name: str,
    read_shard: ReadShard,
    num_train: int,
    num_eval: int,
    shuffle_buffer: int,
    image_size: int,
  ):
    spec = _DATASETS[name]
    image_shape, self._augment, self._eval_transform = _image_transforms(name, image_size)
    self.info = DatasetInfo(name, spec.num_classes, image_shape, num_train, num_eval)
    self._read_shard = read_shard
    self._shuffle_buffer = shuffle_buffer
    self._mean = tf.constant(spec.mean, tf.float32)
    self._std = tf.constant(spec.std, tf.float32)

  def steps_per_epoch(self, global_batch_size: int) -> int:
    steps = self.info.num_train // global_batch_size
    if steps == 0:
      raise ValueError(
        f"data.batch_size={global_batch_size} exceeds the {self.info.num_train} "
        f"training examples of {self.info.name}."
      )
    return steps

  def train_batches(
    self,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite augmented batches {'image': float32 [B/P, H, W, C], 'label': int32 [B/P]}.

    Element k is this process's part of the global batch at step start_step + k.
    """
    share = _process_share(global_batch_size, process_index, process_count)
    steps_per_epoch = self.steps_per_epoch(global_batch_size)
    first_epoch, first_step_in_epoch = divmod(start_step, steps_per_epoch)

    def batches():
      for epoch in itertools.count(first_epoch):
        first_step = first_step_in_epoch if epoch == first_epoch else 0
        epoch_batches = self._train_epoch(seed, epoch, steps_per_epoch, first_step, share)
        yield from epoch_batches.as_numpy_iterator()

    return batches()

  def _train_epoch(
    self,
    seed: int,
    epoch: int,
    steps_per_epoch: int,
    first_step: int,
    share: _ProcessShare,
  ) -> tf.data.Dataset:
    """Batches first_step, ..., steps_per_epoch - 1 of `epoch` for this process."""
    file_order_seed, example_order_seed, *augment_seed = (
      int(word) for word in np.random.SeedSequence([seed, epoch]).generate_state(4)
    )
    batch_size = share.batch_size
    examples = self._read_shard("train", share.process_index, share.process_count, file_order_seed)
    examples = examples.shuffle(self._shuffle_buffer, seed=example_order_seed)
    # Every process takes the same number of batches, even from uneven shards.
    examples = examples.take(steps_per_epoch * batch_size)
    skipped_examples = first_step * batch_size
    if self._augment is None:
      examples = examples.skip(skipped_examples)
    else:
      global_batch_size = batch_size * share.process_count
      epoch_augment_seed = tf.constant(augment_seed, tf.int64)

      def augment(position, example):
        # Seeded by the example's slot in the global epoch order, so no two
        # processes (and no two steps) share an augmentation.
        step, slot = position // batch_size, position % batch_size
        global_slot = step * global_batch_size + share.process_index * batch_size + slot
        example_seed = tf.random.experimental.stateless_fold_in(epoch_augment_seed, global_slot)
        return {**example, "image": self._augment(example["image"], example_seed)}

      examples = examples.enumerate().skip(skipped_examples)
      examples = examples.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return self._batch_and_normalize(examples, batch_size)

  def eval_batches(
    self,
    global_batch_size: int,
    split: str = "test",
    num_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Batches {'image', 'label', 'mask'} of `split` in a fixed order, without augmentation.

    The last batch is padded with mask 0.0 so that every example of the split is
    counted once over all processes, which all yield the same number of batches.
    """
    share = _process_share(global_batch_size, process_index, process_count)
    num_examples = {"train": self.info.num_train, "test": self.info.num_eval}.get(split)
    if num_examples is None:
      raise ValueError(f"Unknown split {split!r}; expected one of {list(_SPLITS)}")
    # Even shards hold at most ceil(N / P) <= ceil(N / B) * B / P examples, so every
    # process's examples fit in the same number of batches.
    steps = -(-num_examples // global_batch_size)
    if num_batches is not None:
      steps = min(steps, num_batches)

    examples = self._read_shard(split, share.process_index, share.process_count, None)
    if self._eval_transform is not None:
      examples = examples.map(
        lambda example: {**example, "image": self._eval_transform(example["image"])},
        num_parallel_calls=tf.data.AUTOTUNE,
      )
    examples = examples.map(lambda example: {**example, "mask": tf.constant(1.0)})
    padding = tf.nest.map_structure(
      lambda spec: tf.zeros(spec.shape, spec.dtype), examples.element_spec
    )
    examples = examples.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    examples = examples.take(steps * share.batch_size)
    return self._batch_and_normalize(examples, share.batch_size).as_numpy_iterator()

  def _batch_and_normalize(self, examples: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    def normalize(batch):
      image = tf.cast(batch["image"], tf.float32) / 255.0
      return {**batch, "image": (image - self._mean) / self._std}

    batches = examples.batch(batch_size, drop_remainder=True)
    batches = batches.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- Sources


def _array_reader(splits: Mapping[str, Mapping[str, np.ndarray]]) -> ReadShard:
  """Reads in-memory splits; process p gets the p-th of P even contiguous slices."""

  def read_shard(split, process_index, process_count, file_order_seed):
    del file_order_seed  # One in-memory "file": the example shuffle does all the mixing.
    shard = {
      key: np.array_split(values, process_count)[process_index]
      for key, values in splits[split].items()
    }
    return tf.data.Dataset.from_tensor_slices(shard)

  return read_shard


def _tfds_reader(builder: tfds.core.DatasetBuilder, split_names: Mapping[str, str]) -> ReadShard:
  """Reads TFDS splits; process p gets `tfds.split_for_jax_process` of the split."""

  def read_shard(split, process_index, process_count, file_order_seed):
    examples = builder.as_dataset(
      split=tfds.split_for_jax_process(
        split_names[split], process_index=process_index, process_count=process_count
      ),
      shuffle_files=file_order_seed is not None,
      # Pipelines last one epoch, so caching their data would only cost memory.
      read_config=tfds.ReadConfig(shuffle_seed=file_order_seed, try_autocache=False),
    )
    return examples.map(
      lambda example: {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}
    )

  return read_shard


def _tfds_builder(name: str, data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, data_dir=data_dir)
  if download:
    builder.download_and_prepare()
  elif not builder.is_prepared():
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared: looked in {builder.data_dir} "
      f"(data.data_dir={data_dir!r}). Set data.download=True to download and prepare it, "
      f"or prepare it there yourself (`tfds build {name} --data_dir=...`)."
    )
  return builder


def pipeline_from_arrays(
  name: str,
  splits: Mapping[str, Mapping[str, np.ndarray]],
  image_size: int = 224,
) -> InputPipeline:
  """A pipeline over in-memory splits {'train'|'test': {'image': uint8 [N,H,W,C], 'label': [N]}}.

  Serves the IDX source, and injects fake data in tests. Shuffles the whole train split.
  """
  int32_splits = {
    split: {"image": splits[split]["image"], "label": np.asarray(splits[split]["label"], np.int32)}
    for split in _SPLITS
  }
  num_train, num_eval = (len(int32_splits[split]["label"]) for split in _SPLITS)
  return InputPipeline(
    name, _array_reader(int32_splits), num_train, num_eval, num_train, image_size
  )


def check_config(data_config) -> None:
  """Raises ValueError (FileNotFoundError for a missing directory) for a data section that
  names no known dataset or source, before any data is read."""
  name, source = data_config.name, data_config.source
  if name not in _DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {sorted(_DATASETS)}")
  if source not in ("idx", "tfds"):
    raise ValueError(f"Unknown data.source {source!r}; expected 'idx' or 'tfds'")
  if source == "idx":
    if name not in _IDX_DATASETS:
      raise ValueError(f"data.source='idx' only serves {list(_IDX_DATASETS)}, not {name!r}")
    if data_config.data_dir is None and name != "fashion_mnist":
      # MNIST and Fashion-MNIST share file names; never read one as the other.
      raise ValueError(
        f"Set data.data_dir to the {name} IDX files; {DEFAULT_IDX_DIR} holds Fashion-MNIST."
      )
    data_dir = data_config.data_dir or DEFAULT_IDX_DIR
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"IDX data directory {data_dir} does not exist. {_IDX_MISSING_HINT}")


def num_classes(name: str) -> int:
  """Classes of dataset `name`, known without reading any data."""
  return _DATASETS[name].num_classes


def build_input_pipeline(data_config) -> InputPipeline:
  """The pipeline that `data_config` (the config's `data` section) describes."""
  check_config(data_config)
  name = data_config.name
  if data_config.source == "idx":
    data_dir = data_config.data_dir or DEFAULT_IDX_DIR
    splits = {split: load_idx_split(data_dir, split) for split in _SPLITS}
    return pipeline_from_arrays(name, splits)

  builder = _tfds_builder(name, data_config.data_dir, data_config.download)
  split_names = {"train": "train", "test": _DATASETS[name].tfds_eval_split}
  # Counted from the datasets rather than builder.info.splits, which is empty under
  # tfds.testing.mock_data.
  num_train, num_eval = (
    int(builder.as_dataset(split=split_names[split]).cardinality()) for split in _SPLITS
  )
  return InputPipeline(
    name,
    _tfds_reader(builder, split_names),
    num_train,
    num_eval,
    data_config.shuffle_buffer,
    data_config.image_size,
  )
