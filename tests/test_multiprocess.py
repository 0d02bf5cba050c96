"""Two processes on loopback (jax.distributed, CPU) train exactly like one process with two devices.

Each of the two `python -m qreg.main` processes reads its own contiguous shard
of the data. The reference, one process with two devices (this module run as a
script), is fed at every step the concatenation of what the two processes
read, and must reach bit-identical parameters, BatchNorm statistics and
optimizer state.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from qreg import cli, data, main, report
from tests.fakes import BATCH, NUM_TRAIN, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
# One regularized epoch of tests/fakes.py's tiny config: the penalty's gradients are over the
# global batch in both runs.
OVERRIDES = {"train.num_epochs": 1, "reg.start_epoch": 0, "reg.lambda_w": 0.02}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ProcessShardsTogether:
  """One process reading, at each step, all processes' shards of the global batch, concatenated."""

  def __init__(self, pipeline: data.InputPipeline, process_count: int):
    self._pipeline, self._process_count = pipeline, process_count
    self.info = pipeline.info
    self.steps_per_epoch = pipeline.steps_per_epoch
    self.eval_batches = pipeline.eval_batches

  def train_batches(self, global_batch_size, seed, start_step=0):
    shards = [self._pipeline.train_batches(global_batch_size, seed, start_step, process_index=p,
                                           process_count=self._process_count)
              for p in range(self._process_count)]
    for parts in zip(*shards):
      yield {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def final_state(workdir):
  """The last checkpoint, restored onto this process's first device whatever topology wrote it."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                        manager.item_metadata(step))
  return step, manager.restore(step, args=ocp.args.StandardRestore(target))


def two_process_config(idx_dir):
  config = tiny_config(idx_dir)
  for field, value in OVERRIDES.items():
    section, key = field.split(".")
    config[section][key] = value
  return config


def start(args, num_devices):
  # XLA:CPU's results depend on how many devices share the process (the reference differs in the
  # last bits with 4 fake devices), so both runs have the same two devices: one per process, or
  # both in one process.
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one_process_with_two_devices(idx_dir, tmp_path):
  workdir, reference_workdir = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  address = f"127.0.0.1:{free_port()}"
  processes = [
      start(["qreg.main", f"--config=tests/fakes.py:{idx_dir}", f"--workdir={workdir}",
             *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
             f"--coordinator_address={address}", f"--num_processes={NUM_PROCESSES}",
             f"--process_id={i}"], num_devices=1)
      for i in range(NUM_PROCESSES)]
  processes.append(start(["tests.test_multiprocess", idx_dir, reference_workdir],
                         num_devices=NUM_PROCESSES))
  logs = []
  for process in processes:
    try:
      logs.append(process.communicate(timeout=300)[0])
    finally:
      process.kill()
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log[-5000:]
  assert "2 devices in 2 process(es)" in logs[0]
  assert "2 devices in 1 process(es)" in logs[2]
  # Metrics and the sweep are reported by process 0 only.
  assert "train/loss" in logs[0] and "train/loss" not in logs[1]
  assert "accuracy (%)" in logs[0] and "accuracy (%)" not in logs[1]

  step, state = final_state(workdir)
  reference_step, reference_state = final_state(reference_workdir)
  assert step == reference_step == NUM_TRAIN // BATCH
  assert jax.tree.structure(state) == jax.tree.structure(reference_state)
  jax.tree.map(np.testing.assert_array_equal, state, reference_state)
  results, reference = (report.load_results(w) for w in (workdir, reference_workdir))
  # Float test accuracy counts the same examples; the calibration batches differ by design.
  assert (results["rows"][0]["weight_bits"], results["rows"][0]["act_bits"]) == (None, None)
  assert results["rows"][0] == reference["rows"][0]


if __name__ == "__main__":
  # python -m tests.test_multiprocess IDX_DIR WORKDIR: the reference, one process with two
  # devices fed what the two processes read.
  _, reference_idx_dir, reference_workdir_arg = sys.argv
  cli.configure_logging()
  reference_config = two_process_config(reference_idx_dir)
  main.train_and_evaluate(
      reference_config, reference_workdir_arg,
      pipeline=ProcessShardsTogether(data.build_input_pipeline(reference_config.data),
                                     NUM_PROCESSES))
