"""The offline default's table with validation-chosen hyperparameters, 3 seeds, on the test set.

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist_tuned.py --workdir=$W/tuned
    python -m experiments.reevaluate --workdir=$W/tuned --protocol=strong
    python -m experiments.make_tables --workdir=$W/tuned --out=experiments/results/fashion_mnist_tuned/paper
    python -m experiments.make_tables --workdir=$W/tuned --results=results_strong.json \
        --out=experiments/results/fashion_mnist_tuned/strong

Each method's overrides come from experiments/results/fashion_mnist_tuning/choices.json
(experiments.tune, on the validation split of seed 0). Training data are the same as in
tuning: the validation split stays held out, and only the test set is measured.

`tuned_table` builds the same table for any tuning config and its choices.
"""
import json
import os

from configs.tables import fashion_mnist_tuning, methods

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "results")
SEEDS = (0, 1, 2)


def read_choices(path: str) -> dict[str, dict]:
  """method -> its chosen overrides, from a choices.json of experiments.tune."""
  with open(path) as f:
    return {method: choice["overrides"] for method, choice in json.load(f)["methods"].items()}


def tuned_table(tuning_get_config, choices_path: str, seeds=SEEDS):
  """(get_config, sweep): the tuning config measured on the test set, no-reg and each method
  with the overrides chosen in choices_path, at each seed; only no-reg until they are chosen."""

  def get_config():
    config = tuning_get_config()
    config.eval.split = "test"
    return config

  def sweep():
    chosen = {"no-reg": dict(methods.NO_PENALTY)}
    if os.path.exists(choices_path):
      chosen.update(read_choices(choices_path))
    return methods.table_sweep(chosen, seeds)

  return get_config, sweep


CHOICES = os.path.join(RESULTS, "fashion_mnist_tuning", "choices.json")
get_config, sweep = tuned_table(fashion_mnist_tuning.get_config, CHOICES)
