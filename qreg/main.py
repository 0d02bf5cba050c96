"""Train with the gradient-l1 regularizer, then sweep post-training quantization bit-widths.

    python -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/qreg_fmnist

Rerunning the same command resumes from the workdir's last checkpoint. On
SIGTERM the run saves a checkpoint and exits with status 143. Several processes
(TPU VM workers, one process per GPU) train one model with --distributed, or
with --coordinator_address, --num_processes and --process_id where JAX cannot
find the other processes itself.
"""
import os
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qreg import train

# What a shell reports for a process killed by SIGTERM: the run is not finished;
# rerunning resumes it (and `until` loops and job schedulers retry it).
PREEMPTED_EXIT_STATUS = 128 + 15


def initialize_distributed(distributed: bool, coordinator_address: str | None,
                           num_processes: int | None, process_id: int | None) -> None:
  """jax.distributed.initialize() when asked; must run before anything starts a JAX backend."""
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) < len(explicit):
    missing = [name for name in explicit if name not in given]
    raise app.UsageError(
        f"{', '.join(given)} given without {', '.join(missing)}: pass all three, or only "
        "--distributed where JAX finds the processes itself (Cloud TPU VMs, Slurm, Open MPI).")
  if not (distributed or given):
    return
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, TypeError, RuntimeError) as e:
    raise app.UsageError(
        f"jax.distributed.initialize() failed: {str(e).rstrip('.')}. Outside Cloud TPU VMs, Slurm and Open MPI "
        "pass --coordinator_address=HOST:PORT (process 0's machine), --num_processes and "
        "--process_id.") from e


def _innermost_message(error: BaseException) -> str:
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with --config.FIELD errors reported without a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = _innermost_message(e)
    field = message.splitlines()[0].strip("'\"")
    culprits = [arg for arg in argv[1:]
                if arg.startswith("--config.") and field in arg.split("=")[0].split(".")]
    hint = " ".join(message.splitlines()[1:])
    sys.exit(f"FATAL Flags parsing error: {' '.join(culprits) or 'a --config override'}: the "
             f"config has no field {field!r}. {hint}".rstrip())
  except OSError as e:  # a --config.FIELD override of a config file that did not load
    sys.exit(f"FATAL Flags parsing error: {e}")


def run(job: Callable[..., object], workdir_help: str) -> None:
  """Parses --config, --workdir and the multi-process flags, then runs job(config, workdir).

  Flags are defined here rather than at import so that qreg.evaluate's command
  line can share them without defining the same names twice.
  """
  config = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  distributed = flags.DEFINE_bool(
      "distributed", False,
      "Join a multi-process run with jax.distributed.initialize(); on Cloud TPU VMs, Slurm and "
      "Open MPI JAX finds the other processes itself.")
  coordinator_address = flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0, for --distributed elsewhere.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # As config_flags reads it: PATH or PATH:ARGUMENT (the argument of get_config).
    config_file = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]
    if not os.path.isfile(config_file):
      raise app.UsageError(f"--config={config_file}: no such file.")
    initialize_distributed(distributed.value, coordinator_address.value, num_processes.value,
                           process_id.value)
    train.configure_logging()
    try:
      job(config.value, workdir.value)
    except train.Preempted as e:
      logging.warning("%s", e)
      sys.exit(PREEMPTED_EXIT_STATUS)

  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run(train.train_and_evaluate, "Directory for checkpoints, metrics and results.")
