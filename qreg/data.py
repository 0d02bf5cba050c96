"""Input pipelines: per-process, deterministic, resumable batches of images.

Two sources feed one InputPipeline:
- in-memory arrays (the original MNIST / Fashion-MNIST IDX files, or arrays
  injected by tests), shuffled with numpy;
- TensorFlow Datasets, through tf.data in qreg.tfds_data (the only user of TensorFlow).

Every epoch's randomness is seeded from (seed, epoch), so the batch at a global
step depends only on (seed, step) and resuming never replays earlier epochs.
data.validation_size holds out the last examples of the train split, whatever
the number of processes, as the 'validation' split.
"""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import Protocol

import jax
import numpy as np

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
_SPLITS = ("train", "validation", "test")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the preprocessed model input
  num_train: int  # training examples (whole dataset, all processes), validation excluded
  num_eval: int  # examples in the test split
  num_validation: int = 0  # examples held out of the train split (data.validation_size)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  num_classes: int
  mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
  std: tuple[float, ...]
  # Model input (H, W, C); None for square crops of data.image_size, RGB.
  image_shape: tuple[int, int, int] | None
  tfds_eval_split: str = "test"


DATASETS = {
  "mnist": DatasetSpec(10, (0.1307,), (0.3081,), (28, 28, 1)),
  "fashion_mnist": DatasetSpec(10, (0.2860,), (0.3530,), (28, 28, 1)),
  "cifar10": DatasetSpec(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (32, 32, 3)),
  # TFDS's imagenet2012 'test' split has no labels; 'validation' is the held-out set.
  "imagenet2012": DatasetSpec(
    1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None, tfds_eval_split="validation"
  ),
}
# Datasets trained without augmentation, which the numpy (in-memory) source serves.
_IN_MEMORY_DATASETS = ("mnist", "fashion_mnist")


def _spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
  return DATASETS[name]


def num_classes(name: str) -> int:
  return _spec(name).num_classes


def image_shape(name: str, image_size: int) -> tuple[int, int, int]:
  """(H, W, C) of the model input; image_size is the crop size of ImageNet-like datasets."""
  return _spec(name).image_shape or (image_size, image_size, 3)


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


class Source(Protocol):
  """Where an InputPipeline's batches come from: _ArraySource or qreg.tfds_data.TfdsSource.

  Both yield this process's numpy batches {'image': float32 normalized, 'label': int32}.
  """

  def train_epoch(
    self,
    seed: int,
    epoch: int,
    num_steps: int,
    first_step: int,
    *,
    process_index: int,
    process_count: int,
    batch_size: int,
  ) -> Iterator[Batch]:
    """Batches first_step, ..., num_steps - 1 of `epoch`, batch_size examples each."""

  def eval_epoch(
    self, split: str, *, process_index: int, process_count: int, batch_size: int
  ) -> Iterator[Batch]:
    """This process's shard of `split` in fixed order, unaugmented; the last batch may be short."""


def _padded_with_mask(batch: Batch, batch_size: int) -> Batch:
  """`batch` with 'mask' 1.0, padded to batch_size with zero examples of mask 0.0."""
  batch = {**batch, "mask": np.ones(len(batch["label"]), np.float32)}
  missing = batch_size - len(batch["label"])
  if not missing:  # Full batches, all but the last, pass through uncopied.
    return batch
  return {
    key: np.pad(values, [(0, missing)] + [(0, 0)] * (values.ndim - 1))
    for key, values in batch.items()
  }


class InputPipeline:
  """Batches of one dataset for one process; see `build_input_pipeline`."""

  def __init__(self, info: DatasetInfo, source: Source):
    self.info = info
    self._source = source

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
  ) -> Iterator[Batch]:
    """Infinite augmented batches {'image': float32 [B/P, H, W, C], 'label': int32 [B/P]}.

    Element k is this process's part of the global batch at step start_step + k.
    """
    share = _process_share(global_batch_size, process_index, process_count)
    steps_per_epoch = self.steps_per_epoch(global_batch_size)
    first_epoch, first_step_in_epoch = divmod(start_step, steps_per_epoch)

    def batches():
      for epoch in itertools.count(first_epoch):
        first_step = first_step_in_epoch if epoch == first_epoch else 0
        yield from self._source.train_epoch(
          seed, epoch, steps_per_epoch, first_step, **dataclasses.asdict(share)
        )

    return batches()

  def eval_batches(
    self,
    global_batch_size: int,
    split: str = "test",
    num_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[Batch]:
    """Batches {'image', 'label', 'mask'} of `split` in a fixed order, without augmentation.

    The last batch is padded with mask 0.0 so that every example of the split is
    counted once over all processes, which all yield the same number of batches.
    """
    share = _process_share(global_batch_size, process_index, process_count)
    num_examples = self._num_examples(split)
    # Even shards hold at most ceil(N / P) <= ceil(N / B) * B / P examples, so every
    # process's examples fit in the same number of batches.
    steps = -(-num_examples // global_batch_size)
    if num_batches is not None:
      steps = min(steps, num_batches)
    no_examples = {
      "image": np.zeros((0, *self.info.image_shape), np.float32),
      "label": np.zeros((0,), np.int32),
    }
    batches = itertools.chain(
      self._source.eval_epoch(split, **dataclasses.asdict(share)), itertools.repeat(no_examples)
    )
    return (
      _padded_with_mask(batch, share.batch_size) for batch in itertools.islice(batches, steps)
    )

  def _num_examples(self, split: str) -> int:
    if split not in _SPLITS:
      raise ValueError(f"Unknown split {split!r}; expected one of {list(_SPLITS)}")
    if split == "validation" and self.info.num_validation == 0:
      raise ValueError("split='validation' needs data.validation_size > 0 held-out examples")
    return {
      "train": self.info.num_train,
      "validation": self.info.num_validation,
      "test": self.info.num_eval,
    }[split]


# ----------------------------------------------------------------------------- Sources


class _ArraySource:
  """In-memory splits; process p reads the p-th of P even contiguous slices of each."""

  def __init__(self, splits: Mapping[str, Batch], mean: tuple[float, ...], std: tuple[float, ...]):
    self._splits = splits
    self._mean = np.asarray(mean, np.float32)
    self._std = np.asarray(std, np.float32)

  def train_epoch(
    self, seed, epoch, num_steps, first_step, *, process_index, process_count, batch_size
  ) -> Iterator[Batch]:
    images, labels = self._shard("train", process_index, process_count)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    # Every process takes the same number of batches, even from uneven shards.
    order = rng.permutation(len(labels))[: num_steps * batch_size]
    for step in range(first_step, num_steps):
      ids = order[step * batch_size : (step + 1) * batch_size]
      yield self._normalized(images[ids], labels[ids])

  def eval_epoch(self, split, *, process_index, process_count, batch_size) -> Iterator[Batch]:
    images, labels = self._shard(split, process_index, process_count)
    for start in range(0, len(labels), batch_size):
      yield self._normalized(images[start : start + batch_size], labels[start : start + batch_size])

  def _shard(
    self, split: str, process_index: int, process_count: int
  ) -> tuple[np.ndarray, np.ndarray]:
    return tuple(
      np.array_split(self._splits[split][key], process_count)[process_index]
      for key in ("image", "label")
    )

  def _normalized(self, images: np.ndarray, labels: np.ndarray) -> Batch:
    return {"image": (images.astype(np.float32) / 255.0 - self._mean) / self._std, "label": labels}


def _check_in_memory(name: str) -> None:
  if name not in _IN_MEMORY_DATASETS:
    raise ValueError(
      f"data.source='idx' only serves {list(_IN_MEMORY_DATASETS)}, not {name!r}; "
      "its augmentation runs through data.source='tfds'"
    )


def _check_validation_size(validation_size: int, num_train_split: int, name: str) -> None:
  if not (isinstance(validation_size, int) and 0 <= validation_size < num_train_split):
    raise ValueError(
      f"data.validation_size={validation_size!r} must be an integer >= 0 and smaller than "
      f"the {num_train_split} examples of {name}'s train split."
    )


def pipeline_from_arrays(
  name: str,
  splits: Mapping[str, Mapping[str, np.ndarray]],
  image_size: int = 224,
  validation_size: int = 0,
) -> InputPipeline:
  """A pipeline over in-memory splits {'train'|'test': {'image': uint8 [N,H,W,C], 'label': [N]}}.

  Serves the IDX source, and injects fake data in tests. Shuffles the whole train
  split but its last validation_size examples, which form the 'validation' split.
  """
  _check_in_memory(name)
  train, test = (
    {"image": np.asarray(arrays["image"]), "label": np.asarray(arrays["label"], np.int32)}
    for arrays in (splits["train"], splits["test"])
  )
  _check_validation_size(validation_size, len(train["label"]), name)
  num_train = len(train["label"]) - validation_size
  arrays = {
    "train": {key: values[:num_train] for key, values in train.items()},
    "validation": {key: values[num_train:] for key, values in train.items()},
    "test": test,
  }
  spec = DATASETS[name]
  info = DatasetInfo(
    name, spec.num_classes, image_shape(name, image_size), num_train, len(test["label"]),
    validation_size,
  )
  return InputPipeline(info, _ArraySource(arrays, spec.mean, spec.std))


def check_config(data_config) -> None:
  """Raises ValueError (FileNotFoundError for a missing directory) for a data section that
  cannot work, before any data is read."""
  name, source, validation_size = data_config.name, data_config.source, data_config.validation_size
  _spec(name)
  if source not in ("idx", "tfds"):
    raise ValueError(f"Unknown data.source {source!r}; expected 'idx' or 'tfds'")
  if isinstance(validation_size, bool) or not isinstance(validation_size, int) \
      or validation_size < 0:
    raise ValueError(f"data.validation_size={validation_size!r} must be an integer >= 0.")
  if source == "idx":
    _check_in_memory(name)
    if data_config.data_dir is None and name != "fashion_mnist":
      # MNIST and Fashion-MNIST share file names; never read one as the other.
      raise ValueError(
        f"Set data.data_dir to the {name} IDX files; {DEFAULT_IDX_DIR} holds Fashion-MNIST."
      )
    data_dir = data_config.data_dir or DEFAULT_IDX_DIR
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"IDX data directory {data_dir} does not exist. {_IDX_MISSING_HINT}")


def build_input_pipeline(data_config) -> InputPipeline:
  """The pipeline that `data_config` (the config's `data` section) describes."""
  check_config(data_config)
  name, validation_size = data_config.name, data_config.validation_size
  spec = _spec(name)
  if data_config.source == "idx":
    data_dir = data_config.data_dir or DEFAULT_IDX_DIR
    splits = {split: load_idx_split(data_dir, split) for split in _IDX_FILES}
    return pipeline_from_arrays(name, splits, data_config.image_size, validation_size)

  # TensorFlow is an optional dependency needed only for TFDS sources.
  from qreg import tfds_data  # pylint: disable=g-import-not-at-top

  builder = tfds_data.load_builder(name, data_config.data_dir, data_config.download)
  num_train_split = tfds_data.count_examples(builder, "train")
  _check_validation_size(validation_size, num_train_split, name)
  split_names = {"train": "train", "test": spec.tfds_eval_split}
  if validation_size:
    split_names.update(
      train=f"train[:-{validation_size}]", validation=f"train[-{validation_size}:]"
    )
  info = DatasetInfo(
    name,
    spec.num_classes,
    image_shape(name, data_config.image_size),
    num_train_split - validation_size,
    tfds_data.count_examples(builder, split_names["test"]),
    validation_size,
  )
  return InputPipeline(
    info,
    tfds_data.TfdsSource(
      builder, split_names, spec.mean, spec.std, data_config.shuffle_buffer, data_config.image_size
    ),
  )
