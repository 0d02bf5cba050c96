"""Interrupted runs through the command line: SIGTERM, a hard kill, resuming bit-identically."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading

import orbax.checkpoint as ocp

from tests.conftest import CHECKPOINT_EVERY, assert_trees_bit_identical, latest_state
from tests.fakes import BATCH, NUM_TRAIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


def checkpoint_steps(workdir):
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()


# `python -m qreg.main`, except that the process stops itself (SIGSTOP) once it has logged the
# train metrics of step argv[1]: the test acts on a run paused at a known step, so no signal
# races the steps and checkpoints that follow, however loaded the machine.
PAUSING_MAIN = """
import os, runpy, signal, sys
from qreg import metrics
pause_after = int(sys.argv.pop(1))
write_scalars = metrics.MetricWriter.write_scalars

def write_then_pause(self, step, scalars):
  write_scalars(self, step, scalars)
  if step == pause_after and any(name.startswith("train/") for name in scalars):
    os.kill(os.getpid(), signal.SIGSTOP)

metrics.MetricWriter.write_scalars = write_then_pause
runpy.run_module("qreg.main", run_name="__main__", alter_sys=True)
"""


class Training:
  """`python -m qreg.main` on tests/fakes.py's tiny config, with its log read line by line;
  paused after step `pause_after` when given."""

  def __init__(self, idx_dir, workdir, pause_after=None):
    command = ["-m", "qreg.main"] if pause_after is None else ["-c", PAUSING_MAIN, str(pause_after)]
    self.process = subprocess.Popen(
        [sys.executable, *command, f"--config=tests/fakes.py:{idx_dir}",
         f"--workdir={workdir}", "--config.train.log_every_steps=1",
         f"--config.train.checkpoint_every_steps={CHECKPOINT_EVERY}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self._watchdog = threading.Timer(300, self.process.kill)
    self._watchdog.daemon = True
    self._watchdog.start()
    self.lines = []

  def wait_for_step(self, step):
    """Reads the log until the metrics of `step` (logged after it ran, one line per step)."""
    for line in self.process.stdout:
      self.lines.append(line)
      if re.search(rf"\] \[{step}\] train/", line):
        return
    raise AssertionError(f"Exited before step {step}:\n{self.log()}")

  def wait_until_paused(self, step):
    """Waits until the run has stopped itself after `step` (pause_after=step)."""
    self.wait_for_step(step)
    _, status = os.waitpid(self.process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"Not paused after step {step}:\n{self.log()}"

  def finish(self):
    """Waits for the exit; returns the exit status."""
    self.lines.extend(self.process.stdout)
    status = self.process.wait()
    self._watchdog.cancel()
    return status

  def log(self):
    return "".join(self.lines[-60:])


def stopped_by(signal_name, run):
  """The step a run stopped by `signal_name` says it saved."""
  stopped = re.search(rf"Stopped by {signal_name} after step (\d+) of 16; saved checkpoint (\d+)",
                      run.log())
  assert stopped, run.log()
  assert stopped.group(1) == stopped.group(2)
  return int(stopped.group(1))


def test_signals_hard_kill_and_a_second_process_then_resume_end_bit_identical(
    idx_dir, reference_run, tmp_path):
  _, reference_workdir, reference_results = reference_run
  workdir = str(tmp_path / "run")
  rng = random.Random(21)

  # SIGTERM at a random step of the first epoch: a checkpoint at the step reached, status 143.
  sigterm_step = rng.randint(1, STEPS_PER_EPOCH - 3)
  run = Training(idx_dir, workdir, pause_after=sigterm_step)
  run.wait_until_paused(sigterm_step)
  # Meanwhile (the run paused mid-training, so that it cannot finish first) a second process
  # on the same workdir stops at once, saying who holds it.
  second = subprocess.run(
      [sys.executable, "-m", "qreg.main", f"--config=tests/fakes.py:{idx_dir}",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert second.returncode == 2, second.stderr[-3000:]
  assert f"error: {workdir} is in use by process {run.process.pid}" in second.stderr
  run.process.send_signal(signal.SIGTERM)
  run.process.send_signal(signal.SIGCONT)
  assert run.finish() == 143, run.log()
  saved_step = stopped_by("SIGTERM", run)
  assert sigterm_step <= saved_step <= sigterm_step + 1  # at most the step it resumed in
  assert "Traceback" not in run.log()
  assert max(checkpoint_steps(workdir)) == saved_step, (sigterm_step, run.log())

  # Resumed, then Ctrl-C (SIGINT): the same, with status 130.
  sigint_step = rng.randint(saved_step + 1, STEPS_PER_EPOCH)
  run = Training(idx_dir, workdir, pause_after=sigint_step)
  run.wait_until_paused(sigint_step)
  run.process.send_signal(signal.SIGINT)
  run.process.send_signal(signal.SIGCONT)
  assert run.finish() == 130, run.log()
  assert f"Resumed from {workdir}/checkpoints at step {saved_step}." in run.log()
  saved_step = stopped_by("SIGINT", run)
  assert sigint_step <= saved_step <= sigint_step + 1 and "Traceback" not in run.log()
  assert max(checkpoint_steps(workdir)) == saved_step, (sigint_step, run.log())

  # Resumed, then SIGKILLed just after a step that follows a checkpoint (4k + 1), in the
  # regularized epoch: the steps since that checkpoint are lost. Paused there, it cannot have
  # written the next checkpoint.
  kill_step = rng.choice([s for s in range(saved_step + 1, TOTAL_STEPS)
                          if s % CHECKPOINT_EVERY == 1 and s > STEPS_PER_EPOCH])
  run = Training(idx_dir, workdir, pause_after=kill_step)
  run.wait_until_paused(kill_step)
  run.process.kill()
  assert run.finish() == -signal.SIGKILL
  assert f"Resumed from {workdir}/checkpoints at step {saved_step}." in run.log()
  last_checkpoint = max(checkpoint_steps(workdir))
  assert last_checkpoint < kill_step, (sigterm_step, saved_step, kill_step, run.log())

  # Rerun to the end (taking over the killed run's stale lock): the same parameters, optimizer
  # state and sweep as the uninterrupted run.
  run = Training(idx_dir, workdir)
  assert run.finish() == 0, run.log()
  assert f"Resumed from {workdir}/checkpoints at step {last_checkpoint}." in run.log()
  assert f"Taking over {workdir}/lock" in run.log()
  step, state = latest_state(workdir)
  reference_step, reference_state = latest_state(reference_workdir)
  assert step == reference_step == TOTAL_STEPS
  assert_trees_bit_identical(state, reference_state)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["rows"] == reference_results["rows"]
