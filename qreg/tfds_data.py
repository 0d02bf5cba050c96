"""TensorFlow Datasets sources of qreg.data: reading, augmentation, tf.data batching.

All of qreg's TensorFlow code lives here, so that the in-memory sources run on
machines without TensorFlow. This module imports nothing from qreg (qreg.data
imports it): what it needs from the dataset table is passed in as arguments.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# TF only feeds the host; it must not reserve accelerator memory that JAX needs.
tf.config.set_visible_devices([], "GPU")

# (uint8 image, stateless seed [2]) -> augmented image of the model's input shape.
Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# uint8 image -> image of the model's input shape.
EvalTransform = Callable[[tf.Tensor], tf.Tensor]


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


def _image_transforms(name: str, image_size: int) -> tuple[Augment | None, EvalTransform | None]:
  """(train augmentation, eval transform) of dataset `name`; None leaves images as they are."""
  if name == "cifar10":
    return _pad_crop_flip, None
  if name == "imagenet2012":
    return (
      functools.partial(_random_resized_crop_flip, image_size=image_size),
      functools.partial(_resize_center_crop, image_size=image_size),
    )
  return None, None


# ----------------------------------------------------------------------------- TFDS


def load_builder(name: str, data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `name`, prepared first when `download` is set."""
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


def count_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  # Counted from the dataset rather than builder.info.splits, which is empty under
  # tfds.testing.mock_data.
  return int(builder.as_dataset(split=split).cardinality())


class TfdsSource:
  """Normalized batches of TFDS splits for one process, for a qreg.data.InputPipeline.

  Process p of P reads `tfds.split_for_jax_process` of each split. Every train
  epoch is a fresh tf.data pipeline whose randomness (file order, example order,
  augmentation) is seeded from (seed, epoch).
  """

  def __init__(
    self,
    builder: tfds.core.DatasetBuilder,
    split_names: Mapping[str, str],
    mean: Sequence[float],
    std: Sequence[float],
    shuffle_buffer: int,
    image_size: int,
  ):
    """split_names maps qreg's splits ('train', 'test', ...) to TFDS split strings."""
    self._builder = builder
    self._split_names = split_names
    self._mean = tf.constant(mean, tf.float32)
    self._std = tf.constant(std, tf.float32)
    self._shuffle_buffer = shuffle_buffer
    self._augment, self._eval_transform = _image_transforms(builder.name, image_size)

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
  ) -> Iterator[dict[str, np.ndarray]]:
    """Batches first_step, ..., num_steps - 1 of `epoch`, batch_size examples each."""
    file_order_seed, example_order_seed, *augment_seed = (
      int(word) for word in np.random.SeedSequence([seed, epoch]).generate_state(4)
    )
    examples = self._read_shard("train", process_index, process_count, file_order_seed)
    examples = examples.shuffle(self._shuffle_buffer, seed=example_order_seed)
    # Every process takes the same number of batches, even from uneven shards.
    examples = examples.take(num_steps * batch_size)
    skipped_examples = first_step * batch_size
    if self._augment is None:
      examples = examples.skip(skipped_examples)
    else:
      global_batch_size = batch_size * process_count
      epoch_augment_seed = tf.constant(augment_seed, tf.int64)

      def augment(position, example):
        # Seeded by the example's slot in the global epoch order, so no two
        # processes (and no two steps) share an augmentation.
        step, slot = position // batch_size, position % batch_size
        global_slot = step * global_batch_size + process_index * batch_size + slot
        example_seed = tf.random.experimental.stateless_fold_in(epoch_augment_seed, global_slot)
        return {**example, "image": self._augment(example["image"], example_seed)}

      examples = examples.enumerate().skip(skipped_examples)
      examples = examples.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return self._batch_and_normalize(examples, batch_size, drop_remainder=True)

  def eval_epoch(
    self, split: str, *, process_index: int, process_count: int, batch_size: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's shard of `split` in fixed order, unaugmented; the last batch may be short."""
    examples = self._read_shard(split, process_index, process_count, None)
    if self._eval_transform is not None:
      examples = examples.map(
        lambda example: {**example, "image": self._eval_transform(example["image"])},
        num_parallel_calls=tf.data.AUTOTUNE,
      )
    return self._batch_and_normalize(examples, batch_size, drop_remainder=False)

  def _read_shard(
    self, split: str, process_index: int, process_count: int, file_order_seed: int | None
  ) -> tf.data.Dataset:
    """Examples {'image': uint8, 'label': int32}; files shuffled unless seed is None."""
    examples = self._builder.as_dataset(
      split=tfds.split_for_jax_process(
        self._split_names[split], process_index=process_index, process_count=process_count
      ),
      shuffle_files=file_order_seed is not None,
      # Pipelines last one epoch, so caching their data would only cost memory.
      read_config=tfds.ReadConfig(shuffle_seed=file_order_seed, try_autocache=False),
    )
    return examples.map(
      lambda example: {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}
    )

  def _batch_and_normalize(
    self, examples: tf.data.Dataset, batch_size: int, drop_remainder: bool
  ) -> Iterator[dict[str, np.ndarray]]:
    def normalize(batch):
      image = tf.cast(batch["image"], tf.float32) / 255.0
      return {**batch, "image": (image - self._mean) / self._std}

    batches = examples.batch(batch_size, drop_remainder=drop_remainder)
    batches = batches.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
