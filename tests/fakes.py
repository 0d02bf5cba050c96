"""Fake data shared by the tests: tiny IDX files written byte by byte, independently of qreg.data."""
import gzip
import os
import struct

import numpy as np

from configs import fashion_mnist

# A tiny run of the offline default config: 8 steps an epoch, 3 bit settings.
NUM_TRAIN, NUM_TEST, BATCH = 64, 20, 8
# Fashion-MNIST's per-channel normalization (qreg.data), as published with the dataset.
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
BIT_SETTINGS = [(None, None), (4, 4), (3, None)]


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
  header = struct.pack(">HBB", 0, dtype_code, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_file(path, contents: bytes) -> str:
  with open(path, "wb") as f:
    f.write(contents)
  return str(path)


def fake_split(num_examples: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "image": rng.integers(0, 256, size=(num_examples, 28, 28), dtype=np.uint8),
      "label": rng.integers(0, 10, size=num_examples).astype(np.uint8),
  }


def write_idx_dir(directory, num_train: int, num_test: int) -> dict[str, dict[str, np.ndarray]]:
  """A Fashion-MNIST-shaped IDX directory (train files gzipped, test files not); returns the arrays."""
  splits = {"train": fake_split(num_train, seed=1), "test": fake_split(num_test, seed=2)}
  for (split, arrays), suffix in zip(splits.items(), [".gz", ""]):
    prefix = {"train": "train", "test": "t10k"}[split]
    for key, kind in [("image", "images-idx3"), ("label", "labels-idx1")]:
      contents = idx_bytes(arrays[key])
      if suffix:
        contents = gzip.compress(contents)
      write_file(os.path.join(directory, f"{prefix}-{kind}-ubyte{suffix}"), contents)
  return splits


def tiny_config(idx_dir):
  """configs/fashion_mnist.py on a write_idx_dir directory, sized to run in seconds.

  Two epochs of 8 steps, the second regularized.
  """
  config = fashion_mnist.get_config()
  config.data.data_dir = idx_dir
  config.data.batch_size = BATCH
  config.eval.batch_size = BATCH
  config.train.num_epochs = 2
  config.train.log_every_steps = 4
  config.reg.start_epoch = 1
  config.quant.bit_settings = BIT_SETTINGS
  config.quant.num_calibration_batches = 2
  return config


def get_config(idx_dir):
  """tiny_config for the command line: --config=tests/fakes.py:IDX_DIR."""
  return tiny_config(idx_dir)
