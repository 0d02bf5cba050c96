"""End to end on tiny IDX data: the command line, results.json, checkpoints and resuming."""
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qreg import train
from tests.fakes import BATCH, BIT_SETTINGS, NUM_TEST, NUM_TRAIN, tiny_config, write_idx_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("idx")
  write_idx_dir(directory, NUM_TRAIN, NUM_TEST)
  return str(directory)


def latest_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  return manager.latest_step(), manager.restore(manager.latest_step())


def assert_valid_results(results):
  rows = results["rows"]
  assert [(r["weight_bits"], r["act_bits"]) for r in rows] == BIT_SETTINGS
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0
    assert r["accuracy"] * NUM_TEST == pytest.approx(round(r["accuracy"] * NUM_TEST))


def test_command_line_trains_and_writes_results(idx_dir, tmp_path):
  workdir = tmp_path / "run"
  overrides = [f"--config.data.data_dir={idx_dir}", f"--config.data.batch_size={BATCH}",
               f"--config.eval.batch_size={BATCH}", "--config.train.num_epochs=1",
               "--config.reg.start_epoch=0", "--config.reg.lambda_w=0.02",
               "--config.quant.num_calibration_batches=1"]
  result = subprocess.run(
      [sys.executable, "-m", "qreg.main", "--config=configs/fashion_mnist.py",
       f"--workdir={workdir}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  settings = [(r["weight_bits"], r["act_bits"]) for r in results["rows"]]
  assert settings == [(None, None), (8, 8), (6, 6), (5, 5), (4, 4), (4, None), (None, 4), (3, 3)]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])
  assert results["step"] == NUM_TRAIN // BATCH
  assert results["config"]["reg"]["lambda_w"] == 0.02
  assert "| 4 | 4 |" in (workdir / "results.md").read_text()
  assert "grad_l1_weights" in result.stderr  # penalty terms are logged


def test_interrupted_run_resumes_to_the_same_parameters(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  full = str(tmp_path / "full")
  results = train.train_and_evaluate(config, full)
  assert_valid_results(results)
  steps_per_epoch = NUM_TRAIN // BATCH

  # An interruption after the first epoch: the second epoch's checkpoint never got written.
  interrupted = str(tmp_path / "interrupted")
  shutil.copytree(full, interrupted)
  shutil.rmtree(os.path.join(interrupted, "checkpoints", str(2 * steps_per_epoch)))
  os.remove(os.path.join(interrupted, "results.json"))
  resumed = train.train_and_evaluate(config, interrupted)

  step_full, state_full = latest_state(full)
  step_resumed, state_resumed = latest_state(interrupted)
  assert step_full == step_resumed == 2 * steps_per_epoch
  chex.assert_trees_all_close(state_resumed, state_full, rtol=1e-6, atol=1e-6)
  assert resumed["rows"] == results["rows"]

  # qreg.evaluate's path: the sweep alone, from the last checkpoint, gives the same table.
  again = train.evaluate_checkpoint(config, interrupted)
  assert again["rows"] == results["rows"]


def test_damaged_checkpoint_gives_a_clear_error(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.train.num_epochs = 1
  config.reg.start_epoch = 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  step_dir = os.path.join(workdir, "checkpoints", str(NUM_TRAIN // BATCH))
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(RuntimeError, match="Could not restore checkpoint"):
    train.evaluate_checkpoint(config, workdir)


def test_evaluate_without_checkpoint_says_so(idx_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    train.evaluate_checkpoint(tiny_config(idx_dir), str(tmp_path / "empty"))


@pytest.mark.parametrize("field,value,message", [
    ("reg.lambda_w", -0.1, "lambda_w"),
    ("reg.lambda_a", float("nan"), "lambda_a"),
    ("reg.impl", "newton", "Unknown reg.impl 'newton'; expected one of .*'hvp'"),
    ("reg.fd_step", 0.0, "reg.fd_step=0.0 must be"),
    ("data.batch_size", 6, "multiple of the number of devices"),
    ("model.name", "alexnet", "Unknown model"),
    ("optim.name", "lion", "Unknown optim.name"),
    ("data.name", "svhn", "svhn"),
])
def test_bad_config_is_rejected_before_training(idx_dir, tmp_path, field, value, message):
  config = tiny_config(idx_dir)
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_bad_bit_setting_is_rejected(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.quant.bit_settings = [(4, 1)]
  with pytest.raises(ValueError, match="act_bits=1"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_nan_loss_stops_training_without_checkpointing_it(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.optim.learning_rate = 1e30
  workdir = tmp_path / "run"
  with pytest.raises(FloatingPointError, match="Non-finite training metrics"):
    train.train_and_evaluate(config, str(workdir))
  assert not os.listdir(workdir / "checkpoints")
