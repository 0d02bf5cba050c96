"""The offline default's table with validation-chosen hyperparameters, 3 seeds, on the test set.

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist_tuned.py --workdir=$W/tuned
    python -m experiments.reevaluate --workdir=$W/tuned --protocol=strong
    python -m experiments.make_tables --workdir=$W/tuned --out=experiments/results/fashion_mnist_tuned/paper
    python -m experiments.make_tables --workdir=$W/tuned --results=results_strong.json \
        --out=experiments/results/fashion_mnist_tuned/strong

Each method's overrides come from experiments/results/fashion_mnist_tuning/choices.json
(experiments.tune, on the validation split of seed 0). Training data are the same as in
tuning: the validation split stays held out, and only the test set is measured.
"""
import json
import os

from configs.tables import fashion_mnist_tuning, methods

CHOICES = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results",
                       "fashion_mnist_tuning", "choices.json")
SEEDS = (0, 1, 2)


def get_config():
  config = fashion_mnist_tuning.get_config()
  config.eval.split = "test"
  return config


def sweep():
  """no-reg and each tuned method at SEEDS; only no-reg until experiments.tune has chosen."""
  chosen = {"no-reg": dict(methods.NO_PENALTY)}
  if os.path.exists(CHOICES):
    with open(CHOICES) as f:
      chosen.update({method: choice["overrides"]
                     for method, choice in json.load(f)["methods"].items()})
  return methods.table_sweep(chosen, SEEDS)
