"""A run's workdir: its orbax checkpoints, its config.json, and the lock of the process training it.

load_run loads a trained workdir (config, variables, model) for evaluation and export;
Preempted is how training stops on SIGTERM/SIGINT once its checkpoint is saved.

    workdir/checkpoints/<step>   orbax checkpoints (TrainState: step, params, batch_stats, opt_state)
    workdir/config.json          the config the checkpoints were written with
    workdir/lock                 pid and host of the process training in it
    workdir/damaged_checkpoints/ checkpoints that failed to restore, set aside
"""
import contextlib
import json
import os
import shutil
import socket
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from qreg import data, models, report
from qreg import config as config_lib

PyTree = Any
# Config fields that a checkpoint's array shapes depend on (data.name: input channels and
# classes); a workdir's checkpoints only resume under the same values.
CHECKPOINT_SHAPE_FIELDS = ("data.name", "model.name", "model.stem", "model.width", "optim.name")


class CheckpointError(RuntimeError):
  """A workdir's checkpoints exist but none can be restored, or there is none to evaluate."""


class WorkdirBusy(RuntimeError):
  """Another live process is training in the workdir."""


class Preempted(Exception):
  """Training stopped on SIGTERM or SIGINT after checkpointing; rerunning the same command
  resumes it. `signum` is the signal received."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def checkpoint_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: PyTree | None = None):
  """The newest checkpoint that restores (onto abstract_state's structure and shardings, or
  as host arrays when None).

  A damaged or partly written checkpoint (a full disk, a copy cut short) is
  skipped with a warning in favour of the one before it. Returns None when
  there is no checkpoint; raises CheckpointError when there are some but none restores.
  """
  unfinished = [name for name in os.listdir(manager.directory) if ocp.utils.TMP_DIR_SUFFIX in name]
  if unfinished:
    logging.warning("Ignoring unfinished checkpoint writes in %s (the process died while saving): %s",
                    manager.directory, ", ".join(sorted(unfinished)))
  args = None if abstract_state is None else ocp.args.StandardRestore(abstract_state)
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=args)
    except Exception as e:  # orbax raises several types for a mismatched or damaged checkpoint
      reason = f"{type(e).__name__}: {str(e)[:500]}"
      failures.append(f"step {step}: {reason}")
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the previous one.",
                      step, manager.directory, reason)
      continue
    if failures:
      logging.warning("Restored checkpoint step %d instead of the damaged newer one(s).", step)
    return state
  if failures:
    raise CheckpointError(
        f"No checkpoint in {manager.directory} can be restored:\n  " + "\n  ".join(failures) +
        "\nThey were written by a different model/optimizer config or are damaged; use a fresh "
        "--workdir, or move the checkpoints directory away to start over.")
  return None


def set_aside_newer_checkpoints(manager: ocp.CheckpointManager, step: int, workdir: str) -> None:
  """Moves the checkpoints newer than `step` (they failed to restore) to workdir/damaged_checkpoints.

  Left in place they would shadow the checkpoints this run writes at the same steps.
  """
  newer = [s for s in manager.all_steps() if s > step]
  if not newer:
    return
  if jax.process_index() == 0:
    target_dir = os.path.join(workdir, "damaged_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    for damaged in newer:
      target = os.path.join(target_dir, f"{damaged}-{time.strftime('%Y%m%d-%H%M%S')}")
      shutil.move(os.fspath(manager.directory / str(damaged)), target)
      logging.warning("Moved the unrestorable checkpoint step %d to %s; training goes on from "
                      "step %d.", damaged, target, step)
  multihost_utils.sync_global_devices("qreg: damaged checkpoints set aside")
  manager.reload()


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError when workdir's checkpoints come from a config with other array shapes.

  Compares the fields in CHECKPOINT_SHAPE_FIELDS with workdir/config.json (written
  with the checkpoints), so the message names what differs.
  """
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:
    logging.warning("Cannot read %s (%s); not checking that its checkpoints match this config.",
                    path, e)
    return
  differences = [f"{name}={config_lib.field(config, name)!r} here but "
                 f"{config_lib.field(stored, name)!r} there"
                 for name in CHECKPOINT_SHAPE_FIELDS
                 if config_lib.field(stored, name) is not None
                 and config_lib.field(stored, name) != config_lib.field(config, name)]
  if differences:
    raise ValueError(
        f"{workdir} holds checkpoints of a different run ({'; '.join(differences)}; see {path}). "
        "They cannot be resumed with this config: pass another --workdir, or the run's own "
        "values to resume it.")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Creates workdir for training config, after checking that any checkpoints in it match;
  returns its absolute path."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory.")
  manager_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(manager_dir) and os.listdir(manager_dir):
    check_workdir_matches(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  return workdir


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """workdir/config.json: describes the checkpoints next to it (process 0 writes it)."""
  if jax.process_index() == 0:
    report.write_text_atomic(os.path.join(workdir, "config.json"),
                             config.to_json_best_effort(indent=2))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json), on top of the current defaults
  so that workdirs written before a field existed still load."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a qreg workdir?")
  with open(path) as f:
    stored = json.load(f)

  def merge(config, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
        merge(config[key], value)
      else:
        config[key] = tuple(map(tuple, value)) if key == "bit_settings" else value

  config = config_lib.base_config()
  with config.unlocked():
    merge(config, stored)
  return config


def restore_variables(workdir: str) -> tuple[int, dict[str, PyTree]]:
  """(step, {'params', 'batch_stats'}) of the workdir's newest restorable checkpoint, as host
  arrays: all that evaluation and export need, without the data or the optimizer."""
  workdir = os.path.abspath(workdir)
  state = restore_latest(checkpoint_manager(workdir))
  if state is None:
    raise CheckpointError(f"No checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                          "train first with qreg.main.")
  return int(state["step"]), {"params": state["params"], "batch_stats": state["batch_stats"]}


class Run(NamedTuple):
  """A trained workdir, loaded: its config, the step and variables of its newest restorable
  checkpoint, and the float model they belong to."""
  config: ml_collections.ConfigDict
  step: int
  variables: dict[str, PyTree]
  model: Any


def load_run(workdir: str, config: ml_collections.ConfigDict | None = None) -> Run:
  """The workdir's run, with the config it was trained with (workdir/config.json) unless
  `config` is given; a given config must have the same array shapes (check_workdir_matches)."""
  if config is None:
    config = read_run_config(workdir)
  else:
    check_workdir_matches(config, os.path.abspath(workdir))
  step, variables = restore_variables(workdir)
  return Run(config, step, variables,
             models.build_model(config.model, data.num_classes(config.data.name)))


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, under another user
    return True
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str, name: str = "lock"):
  """Holds workdir/lock (this process's pid and host) while training, so that a second process
  started on the same workdir stops at once instead of interleaving checkpoints with it.

  A lock left by a dead process on this host is taken over with a warning. With several
  processes, process 0 holds the lock for all of them and tells them whether it got it. Another
  name is another lock (experiments.run_sweep claims a whole run with workdir/claim).
  """
  path = os.path.join(workdir, name)
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  error = ""
  if jax.process_index() == 0:
    error = _acquire(path, me)
  if jax.process_count() > 1:
    error = "" if bool(multihost_utils.broadcast_one_to_all(np.int32(not error))) else (
        error or f"{workdir} is locked by another run (see {path}).")
  if error:
    raise WorkdirBusy(error)
  try:
    yield
  finally:
    if jax.process_index() == 0:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _acquire(path: str, me: dict[str, Any]) -> str:
  """Creates the lock file; returns '' on success, else why not."""
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      pid, host = holder.get("pid"), holder.get("host")
      if host == me["host"] and isinstance(pid, int) and not _process_alive(pid):
        logging.warning("Taking over %s: its process %d on %s is no longer running.", path, pid,
                        host)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      return (f"{os.path.dirname(path)} is in use by process {pid} on {host} (since "
              f"{holder.get('since')}); wait for it to finish, stop it, or pass another "
              f"--workdir. If that process is gone, delete {path}.")
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return ""
  return f"Could not take the lock {path}."
