"""Bad inputs: each stops the run with a message naming the mistake, and loses nothing.

Every case runs on a copy of a workdir that already holds a trained run
(checkpoints, config.json, results, metrics) and checks afterwards that all of
its files are still there, byte for byte.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from qreg import checkpoint, cli, main
from tests.fakes import fake_split, idx_bytes, tiny_config, write_file, write_idx_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(directory) -> dict[str, str]:
  """{path relative to directory: sha256 of the contents} of every file below it."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


@pytest.mark.parametrize("field,value,message", [
    ("data.name", "svhn", r"Unknown dataset 'svhn'; known datasets: \['cifar10', 'fashion_mnist'"),
    ("data.source", "csv", r"Unknown data.source 'csv'; expected 'idx' or 'tfds'"),
    ("data.data_dir", "/nonexistent/qreg-data",
     r"IDX data directory /nonexistent/qreg-data does not exist\. Install the files"),
    ("data.batch_size", 6, r"data.batch_size=6 must be a positive multiple of the number of "
                           r"devices \(4\)"),
    ("data.batch_size", 128, r"data.batch_size=128 exceeds the 64 training examples of "
                             r"fashion_mnist"),
    ("eval.batch_size", 10, r"eval.batch_size=10 must be a positive multiple of the number of "
                            r"devices \(4\)"),
    ("model.name", "alexnet", r"Unknown model 'alexnet'; expected one of \('small_cnn', "
                              r"'vgg_like', 'resnet18', 'mobilenetv2'\)"),
    ("model.stem", "tiny", r"Unknown model.stem 'tiny'; expected one of \('cifar', 'imagenet'\)"),
    ("model.dtype", "float16", r"Unknown model.dtype 'float16'; expected one of \('float32', "
                               r"'bfloat16'\)"),
    ("optim.name", "lion", r"Unknown optim.name 'lion'; expected one of \('sgd', 'adam', 'adamw'\)"),
    ("optim.schedule", "linear", r"Unknown optim.schedule 'linear'; expected one of "
                                 r"\('cosine', 'constant'\)"),
    ("optim.learning_rate", -0.1, r"optim.learning_rate=-0.1 must be a finite number > 0"),
    ("reg.lambda_w", -0.1, r"reg.lambda_w=-0.1 must be a finite number >= 0"),
    ("reg.lambda_a", float("nan"), r"reg.lambda_a=nan must be a finite number >= 0"),
    ("reg.start_epoch", -1, r"reg.start_epoch=-1 must be an integer >= 0"),
    ("reg.impl", "newton", r"Unknown reg.impl 'newton'; expected one of \('nested', 'hvp', "),
    ("reg.fd_step", 0.0, r"reg.fd_step=0.0 must be a finite number > 0"),
    ("reg.every_k_steps", 0, r"reg.every_k_steps=0 must be an integer >= 1"),
    ("reg.penalty_batch_fraction", 0.0, r"reg.penalty_batch_fraction=0.0 must be in \(0, 1\]"),
    ("reg.penalty_batch_fraction", 1.5, r"reg.penalty_batch_fraction=1.5 must be in \(0, 1\]"),
    # batch 8 on 4 devices: 2 examples each, of which a quarter is half an example.
    ("reg.penalty_batch_fraction", 0.25, r"reg.penalty_batch_fraction=0.25 of the global batch "
                                         r"\(8\) is 2 examples, which do not split into whole "
                                         r"examples over 4 devices"),
    ("reg.norm", "l3", r"Unknown reg.norm 'l3'; expected one of \('l1', 'l2'\)"),
    ("reg.lambda_kurtosis", -1.0, r"reg.lambda_kurtosis=-1.0 must be a finite number >= 0"),
    ("qat.weight_bits", 1, r"qat.weight_bits=1: expected an integer in \[2, 16\]"),
    ("train.num_epochs", 0, r"train.num_epochs=0 must be an integer >= 1"),
    ("train.log_every_steps", 0, r"train.log_every_steps=0 must be an integer >= 1"),
    ("train.checkpoints_to_keep", 1, r"train.checkpoints_to_keep=1 must be an integer >= 2"),
    ("quant.bit_settings", [(8, 8), (4, 1)], r"act_bits=1: expected an integer in \[2, 16\] or "
                                             r"None for float"),
    ("quant.bit_settings", [(17, None)], r"weight_bits=17: expected an integer in \[2, 16\]"),
    ("quant.bit_settings", [(8,)], r"quant.bit_settings entry \(8,\) must be "
                                   r"\(weight_bits, act_bits\)"),
    ("quant.sensitivity_bits", 1, r"quant.sensitivity_bits=1: expected an integer in \[2, 16\]"),
    ("quant.weight_rules", ("^conv1/=eight",), r"Weight rule '\^conv1/=eight': bits must be an "
                                               r"integer or 'float'"),
    ("quant.calibration", "kl", r"quant.calibration='kl': expected one of \('minmax', "
                                r"'percentile', 'mse'\)"),
    ("quant.weight_rules", ("conv9/.*=8",), r"quant.weight_rules \['conv9/\.\*=8'\] match no "
                                            r"kernel"),
    ("quant.bit_budgets", (3.0, 1.5), r"quant.bit_budgets entry 1.5 must be a number of bits per "
                                      r"weight in \[2, 16\]"),
    ("quant.bit_choices", (), r"quant.bit_choices is empty"),
    ("quant.budget_sensitivities", ("fisher",), r"Unknown sensitivity 'fisher'; expected one of "
                                                r"\('measured', 'bound', 'hessian'\)"),
    ("quant.budget_allocation", "ilp", r"Unknown allocation 'ilp'; expected one of "
                                       r"\('knapsack', 'greedy'\)"),
])
def test_bad_config_value(idx_dir, reference_copy, field, value, message):
  config = tiny_config(idx_dir)
  section, key = field.split(".")
  config[section][key] = value
  if field == "model.stem":
    config.model.name = "resnet18"  # the only model with a stem
  before = snapshot(reference_copy)
  with pytest.raises(ValueError if field != "data.data_dir" else FileNotFoundError, match=message):
    main.train_and_evaluate(config, reference_copy)
  assert snapshot(reference_copy) == before


def test_bad_config_value_leaves_a_new_workdir_unmade(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.quant.bit_settings = [(4, 1)]
  with pytest.raises(ValueError, match="act_bits=1"):
    main.train_and_evaluate(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


def test_a_bit_budget_the_rules_make_impossible_fails_before_training(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.quant.bit_budgets = (2.0,)
  config.quant.weight_rules = ("conv1/.*=8",)
  with pytest.raises(ValueError, match=r"A bit budget of 2 bits per weight is below the least "
                                       r"the choices allow \(2\.0"):
    main.train_and_evaluate(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


def test_truncated_idx_file(idx_dir, reference_copy, tmp_path):
  data_dir = tmp_path / "truncated"
  os.makedirs(data_dir)
  write_idx_dir(data_dir, 64, 20)
  os.remove(data_dir / "train-images-idx3-ubyte.gz")
  write_file(data_dir / "train-images-idx3-ubyte", idx_bytes(fake_split(64, seed=1)["image"])[:-100])
  before = snapshot(reference_copy)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated: expected 50176 bytes "
                                       r"of data for shape \(64, 28, 28\), found 50076"):
    main.train_and_evaluate(tiny_config(str(data_dir)), reference_copy)
  assert snapshot(reference_copy) == before


@pytest.mark.parametrize("field,value", [
    ("model.name", "vgg_like"),
    ("optim.name", "adam"),
    # Same shapes as Fashion-MNIST, so only config.json tells the checkpoints apart.
    ("data.name", "mnist"),
])
def test_workdir_holding_another_runs_checkpoints(idx_dir, reference_copy, field, value):
  config = tiny_config(idx_dir)
  section, key = field.split(".")
  config[section][key] = value
  before = snapshot(reference_copy)
  with pytest.raises(ValueError, match=(
      rf"{reference_copy} holds checkpoints of a different run \({field}='{value}' here but "
      rf"'\w+' there; see {reference_copy}/config.json\)\. They cannot be resumed")):
    main.train_and_evaluate(config, reference_copy)
  assert snapshot(reference_copy) == before


def test_all_checkpoints_damaged(idx_dir, reference_copy):
  checkpoints = os.path.join(reference_copy, "checkpoints")
  for root, _, names in os.walk(checkpoints):
    for name in names:
      write_file(os.path.join(root, name), b"garbage")
  before = snapshot(reference_copy)
  with pytest.raises(RuntimeError, match=(
      rf"No checkpoint in {checkpoints} can be restored:\n  step 16: .*\n  step 12: .*\n  "
      r"step 8: .*\nThey were written by a different model/optimizer config or are damaged")):
    main.train_and_evaluate(tiny_config(idx_dir), reference_copy)
  assert snapshot(reference_copy) == before


def test_workdir_that_is_a_file(idx_dir, tmp_path):
  path = write_file(tmp_path / "results.txt", b"precious")
  with pytest.raises(NotADirectoryError, match=rf"--workdir={path} is a file, not a directory"):
    main.train_and_evaluate(tiny_config(idx_dir), path)
  assert open(path, "rb").read() == b"precious"


def test_nan_loss_stops_without_checkpointing_it(idx_dir, reference_copy):
  # A third epoch at an absurd learning rate, resumed from the trained run's last checkpoint.
  config = tiny_config(idx_dir)
  config.train.num_epochs = 3
  config.optim.learning_rate = 1e30
  config.reg.lambda_w = config.reg.lambda_a = 0.0
  before = snapshot(reference_copy)
  with pytest.raises(FloatingPointError, match=(
      r"Non-finite training metrics at step 20: .*Training stopped before checkpointing it; "
      r"lower optim.learning_rate or reg.lambda_w / reg.lambda_a")):
    main.train_and_evaluate(config, reference_copy)
  after = snapshot(reference_copy)
  # Nothing changed; only TensorBoard's new event file for this attempt was added.
  assert {path: after[path] for path in before} == before
  assert [path for path in after if path not in before] == [
      path for path in after if path.startswith("events.out.tfevents") and path not in before]
  assert sorted(os.listdir(os.path.join(reference_copy, "checkpoints"))) == ["12", "16", "8"]


TINY = "--config=tests/fakes.py:{idx_dir}"


@pytest.mark.parametrize("args,message", [
    ([TINY, "--config.optim.learnig_rate=0.1"],
     "error: --config.optim.learnig_rate=0.1: the config has no field 'learnig_rate'. Did you "
     "mean \"learning_rate\" instead of \"learnig_rate\"?"),
    ([TINY, "--config.reg.lambda_w=-1"], "error: reg.lambda_w=-1.0 must be a finite number >= 0."),
])
def test_command_line_mistakes(idx_dir, reference_copy, args, message):
  """End to end, a mistyped flag and a config value the run rejects: each prints one line,
  `error: <what is wrong>`, no traceback, and exits with status 2."""
  before = snapshot(reference_copy)
  result = subprocess.run(
      [sys.executable, "-m", "qreg.main", f"--workdir={reference_copy}",
       *[arg.format(idx_dir=idx_dir) for arg in args]],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error.startswith(message), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert snapshot(reference_copy) == before


@pytest.mark.parametrize("args,message", [
    ([TINY, "--config.data.batch_size=eight"],
     "error: flag --config.data.batch_size=eight: invalid literal for int() with base 10: 'eight'"),
    (["--config=configs/fashion_mnsit.py"], "error: --config=configs/fashion_mnsit.py: no such file."),
])
def test_flag_mistakes(idx_dir, monkeypatch, capsys, args, message):
  """cli's flag parsing, in this process on fresh flags (main's --config and --workdir; the
  config flag reads its overrides from sys.argv)."""
  argv = ["qreg.main", "--workdir=unused", *[arg.format(idx_dir=idx_dir) for arg in args]]
  fresh = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fresh, lock_config=True)
  flags.DEFINE_string("workdir", None, "", flag_values=fresh)
  monkeypatch.setattr(flags, "FLAGS", fresh)
  monkeypatch.setattr(sys, "argv", argv)
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as exited:
    cli._parse_flags(argv)
  assert exited.value.code == 2
  assert capsys.readouterr().err.startswith(message)


def test_partial_distributed_flags():
  with pytest.raises(ValueError, match=(
      "--num_processes given without --coordinator_address, --process_id: pass all three, or "
      "only --distributed where JAX finds the processes itself")):
    main.initialize_distributed(False, None, 2, None)


def test_verbose_shows_the_traceback(idx_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "qreg.main", f"--workdir={tmp_path / 'run'}",
       TINY.format(idx_dir=idx_dir), "--config.reg.lambda_w=-1", "--verbose"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "Traceback" in result.stderr and "error: reg.lambda_w=-1.0" in result.stderr


def test_workdir_lock(tmp_path, caplog):
  workdir = str(tmp_path)
  # A live process (not this one) holds the lock: refused, and its lock file is left alone.
  with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as holder:
    lock = {"pid": holder.pid, "host": socket.gethostname(), "since": "earlier"}
    write_file(os.path.join(workdir, "lock"), json.dumps(lock).encode())
    before = snapshot(workdir)
    with pytest.raises(checkpoint.WorkdirBusy, match=rf"{workdir} is in use by process "
                                                     rf"{holder.pid} on {socket.gethostname()}"):
      with checkpoint.workdir_lock(workdir):
        pass
    assert snapshot(workdir) == before
    holder.kill()
  # Its process is gone: the lock is stale, taken over with a warning, and released after.
  with caplog.at_level("WARNING"):
    with checkpoint.workdir_lock(workdir):
      with open(os.path.join(workdir, "lock")) as f:
        assert json.load(f)["pid"] == os.getpid()
  assert f"Taking over {workdir}/lock: its process {holder.pid}" in caplog.text
  assert not os.path.exists(os.path.join(workdir, "lock"))
