"""Test set-up: several fake CPU devices, so the sharded path runs on one machine.

The environment must be set before JAX initialises its backends, hence at
conftest import time. Below it: the fixtures and helpers shared by the tests
that train.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, inherited by the command-line
# subprocesses: each train step compiles once, not once per process (30 s saved per run).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="qreg-test-jax-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the environment is set)
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

from tests.fakes import NUM_TEST, NUM_TRAIN, tiny_config, write_idx_dir  # noqa: E402

# Checkpoints of the reference run: every 4 steps, the last 3 kept (steps 8, 12, 16).
CHECKPOINT_EVERY = 4


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("idx")
  write_idx_dir(directory, NUM_TRAIN, NUM_TEST)
  return str(directory)


@pytest.fixture(scope="session")
def reference_run(idx_dir, tmp_path_factory):
  """(config, workdir, results) of one uninterrupted tiny_config run, shared by the tests that
  resume, damage or misuse a trained workdir; copy the workdir before changing it."""
  from qreg import main  # pylint: disable=g-import-not-at-top  (JAX starts after the flags above)

  config = tiny_config(idx_dir)
  config.train.checkpoint_every_steps = CHECKPOINT_EVERY
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  results = main.train_and_evaluate(config, workdir)
  return config, workdir, results


@pytest.fixture
def reference_copy(reference_run, tmp_path):
  """A private copy of the reference run's workdir."""
  _, workdir, _ = reference_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


def latest_state(workdir):
  """(step, state) of a workdir's newest checkpoint."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  return manager.latest_step(), manager.restore(manager.latest_step())


def assert_trees_bit_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def jit_init(model, shape, seed=0, dtype=None):
  """model.init(key, zeros(shape), train=False), compiled: a deep model's eager init dispatches
  op by op (MobileNetV2's took ~20 s)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda key: model.init(key, jnp.zeros(shape, dtype or jnp.float32),
                                        train=False))(jax.random.key(seed))


# MobileNetV2's three first stages (5 inverted residual blocks, two of them residual, with every
# kind of layer and tap): the whole network's 17 blocks cost ~30 s a test in compilation alone.
SHORT_MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2))
