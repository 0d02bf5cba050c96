"""Train with the gradient-l1 regularizer, then sweep post-training quantization bit-widths.

    python -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/qreg_fmnist

train_and_evaluate is the same as a function: train (qreg.train), sweep
(qreg.ptq), write results.json (qreg.report).

Rerunning the same command resumes from the workdir's last checkpoint. On
SIGTERM (SIGINT, Ctrl-C) the run saves a checkpoint and exits with status 143
(130). Several processes (TPU VM workers, one process per GPU) train one model
with --distributed, or with --coordinator_address, --num_processes and
--process_id where JAX cannot find the other processes itself.
"""
import json
import time
from typing import Any

import jax
import ml_collections
from absl import flags

from qreg import checkpoint, cli, data, models, ptq, report, train

PyTree = Any


def sweep_and_write(config: ml_collections.ConfigDict, setup: ptq.QuantSetup, model,
                    variables: PyTree, pipeline: data.InputPipeline, mesh: jax.sharding.Mesh,
                    workdir: str, step: int) -> dict[str, Any]:
  """The quantization sweep of a trained model, printed as it runs and written to workdir,
  with the environment it ran in."""
  results = report.collect_sweep(
      ptq.sweep(config, setup, model, variables["params"], variables["batch_stats"], pipeline,
                mesh), setup.describe())
  results.update(config=json.loads(config.to_json_best_effort()),
                 time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), step=step,
                 environment=report.environment())
  report.write_results(results, workdir)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: jax.sharding.Mesh | None = None,
                       pipeline: data.InputPipeline | None = None) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds a checkpoint), then runs the PTQ sweep.

  As train.train, and the sweep's setup is built before training too, so that
  a weight rule matching no kernel costs no training. Returns the results dict
  also written to workdir/results.json.
  """
  training = train.training_setup(config, mesh=mesh, pipeline=pipeline)
  model = models.build_model(config.model, training.pipeline.info.num_classes)
  setup = ptq.sweep_setup(config, model, training.pipeline.info.image_shape)
  workdir = checkpoint.prepare_workdir(config, workdir)
  with checkpoint.workdir_lock(workdir):
    state = train.train_in_workdir(training, workdir)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return sweep_and_write(config, setup, model, variables, training.pipeline, training.mesh,
                           workdir, int(state.step))


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


if __name__ == "__main__":
  # Flags are defined only when run, so that importing this module defines none.
  _CONFIG = cli.define_config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None,
                                 "Directory for checkpoints, metrics and results.", required=True)
  _DISTRIBUTED = flags.DEFINE_bool(
      "distributed", False,
      "Join a multi-process run with jax.distributed.initialize(); on Cloud TPU VMs, Slurm and "
      "Open MPI JAX finds the other processes itself.")
  _COORDINATOR_ADDRESS = flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0, for --distributed elsewhere.")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                     "This process's index in [0, num_processes).")

  def main(argv):
    del argv
    initialize_distributed(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    cli.configure_logging()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)

  cli.run(main)
