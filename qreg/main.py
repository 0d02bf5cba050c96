"""Train with the gradient-l1 regularizer, then sweep post-training quantization bit-widths.

    python -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/qreg_fmnist

Rerunning the same command resumes from the workdir's last checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from qreg import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train.configure_logging()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
