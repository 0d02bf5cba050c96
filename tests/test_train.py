"""End to end on tiny IDX data: the command line, results.json, falling back from a damaged checkpoint."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from qreg import checkpoint, evaluate, main, train
from tests.conftest import assert_trees_bit_identical, latest_state
from tests.fakes import BATCH, BIT_SETTINGS, NUM_TEST, NUM_TRAIN, tiny_config, write_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
               "--config.quant.num_calibration_batches=1",
               "--config.quant.bit_settings=((4,4),(2,8),(None,None))"]
  result = subprocess.run(
      [sys.executable, "-m", "qreg.main", "--config=configs/fashion_mnist.py",
       f"--workdir={workdir}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  settings = [(r["weight_bits"], r["act_bits"]) for r in results["rows"]]
  assert settings == [(4, 4), (2, 8), (None, None)]  # the command line's bit settings
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])
  assert results["step"] == NUM_TRAIN // BATCH
  assert results["config"]["reg"]["lambda_w"] == 0.02
  assert results["environment"]["process_count"] == 1
  assert "| 2 | 8 |" in (workdir / "results.md").read_text()
  assert "grad_l1_weights" in result.stderr  # penalty terms are logged


def test_importing_main_defines_no_flags():
  """So that experiments, with flags of their own (--config, --workdir), can import it."""
  assert "qreg.main" not in flags.FLAGS.flags_by_module_dict()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference_run, reference_copy,
                                                                   caplog):
  config, reference_workdir, reference_results = reference_run
  assert_valid_results(reference_results)
  checkpoints = os.path.join(reference_copy, "checkpoints")
  # Step 16 damaged, and a save of step 20 cut short by a hard kill.
  for root, _, names in os.walk(os.path.join(checkpoints, "16")):
    for name in names:
      write_file(os.path.join(root, name), b"garbage")
  os.makedirs(os.path.join(checkpoints, "20.orbax-checkpoint-tmp-1795000000"))

  with caplog.at_level(logging.WARNING):
    step, _ = checkpoint.restore_variables(reference_copy)
  assert step == 12
  assert f"Checkpoint step 16 in {checkpoints} cannot be restored" in caplog.text
  assert "Ignoring unfinished checkpoint writes" in caplog.text
  assert "20.orbax-checkpoint-tmp-1795000000" in caplog.text

  # Training resumes from step 12, sets step 16 aside and redoes it bit-identically.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    results = main.train_and_evaluate(config, reference_copy)
  assert "Restored checkpoint step 12 instead of the damaged newer one(s)" in caplog.text
  [set_aside] = os.listdir(os.path.join(reference_copy, "damaged_checkpoints"))
  assert set_aside.startswith("16-")
  step, state = latest_state(reference_copy)
  reference_step, reference_state = latest_state(reference_workdir)
  assert step == reference_step == 2 * NUM_TRAIN // BATCH
  assert_trees_bit_identical(state, reference_state)
  assert results["rows"] == reference_results["rows"]

  # qreg.evaluate's path: the sweep alone, from the last checkpoint, gives the same table.
  again = evaluate.evaluate_workdir(config, reference_copy)
  assert again["rows"] == reference_results["rows"]


def test_evaluate_without_checkpoint_says_so(idx_dir, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint"):
    evaluate.evaluate_workdir(tiny_config(idx_dir), str(tmp_path / "empty"))


def test_load_run_gives_the_config_newest_checkpoint_and_model(reference_run):
  config, workdir, _ = reference_run
  run = checkpoint.load_run(workdir)
  step, state = latest_state(workdir)
  assert run.step == step
  assert run.config.to_dict() == checkpoint.read_run_config(workdir).to_dict()
  assert run.config.reg.lambda_w == config.reg.lambda_w
  assert_trees_bit_identical(run.variables, {"params": state["params"],
                                             "batch_stats": state["batch_stats"]})
  logits = run.model.apply(run.variables, np.zeros((2, 28, 28, 1), np.float32), train=False)
  assert logits.shape == (2, 10)

  other = config.copy_and_resolve_references()
  other.model.width = 2.0
  with pytest.raises(ValueError, match=r"model.width=2.0 here but 1.0 there"):
    checkpoint.load_run(workdir, other)


def test_train_returns_the_final_state_and_writes_no_results(reference_run, reference_copy):
  config, _, _ = reference_run
  os.remove(os.path.join(reference_copy, "results.json"))
  state = train.train(config, reference_copy)  # resumes at the last step: nothing left to train
  step, stored = latest_state(reference_copy)
  assert int(state.step) == step
  assert_trees_bit_identical({"params": state.params, "batch_stats": state.batch_stats},
                             {"params": stored["params"], "batch_stats": stored["batch_stats"]})
  assert not os.path.exists(os.path.join(reference_copy, "results.json"))
