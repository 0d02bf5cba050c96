"""Train with the gradient-l1 regularizer, then sweep post-training quantization bit-widths.

    python -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/qreg_fmnist

Rerunning the same command resumes from the workdir's last checkpoint.
"""
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

from qreg import train


def run(job: Callable[..., object], workdir_help: str) -> None:
  """Parses --config and --workdir, then runs job(config, workdir).

  Flags are defined here rather than at import so that qreg.evaluate's command
  line can share them without defining the same names twice.
  """
  config = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train.configure_logging()
    job(config.value, workdir.value)

  app.run(main)


if __name__ == "__main__":
  run(train.train_and_evaluate, "Directory for checkpoints, metrics and results.")
