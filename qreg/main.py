"""Train with the gradient-l1 regularizer, then sweep post-training quantization bit-widths.

    python -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/qreg_fmnist

Rerunning the same command resumes from the workdir's last checkpoint. On
SIGTERM (SIGINT, Ctrl-C) the run saves a checkpoint and exits with status 143
(130). Several processes (TPU VM workers, one process per GPU) train one model
with --distributed, or with --coordinator_address, --num_processes and
--process_id where JAX cannot find the other processes itself.
"""
import jax
from absl import flags

from qreg import cli, train

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.",
                               required=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Join a multi-process run with jax.distributed.initialize(); on Cloud TPU VMs, Slurm and "
    "Open MPI JAX finds the other processes itself.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for --distributed elsewhere.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def initialize_distributed(distributed: bool, coordinator_address: str | None,
                           num_processes: int | None, process_id: int | None) -> None:
  """jax.distributed.initialize() when asked; must run before anything starts a JAX backend."""
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) < len(explicit):
    missing = [name for name in explicit if name not in given]
    raise ValueError(
        f"{', '.join(given)} given without {', '.join(missing)}: pass all three, or only "
        "--distributed where JAX finds the processes itself (Cloud TPU VMs, Slurm, Open MPI).")
  if not (distributed or given):
    return
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, TypeError, RuntimeError) as e:
    raise ValueError(
        f"jax.distributed.initialize() failed: {str(e).rstrip('.')}. Outside Cloud TPU VMs, "
        "Slurm and Open MPI pass --coordinator_address=HOST:PORT (process 0's machine), "
        "--num_processes and --process_id.") from e


def main(argv):
  del argv
  initialize_distributed(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  cli.configure_logging()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
