"""Equal-budget tuning on the offline default: each method's hyperparameter on a 4-point grid,
one tuning seed, every run measured on the validation split (never the test set).

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist_tuning.py --workdir=$W/tuning
    python -m experiments.tune --workdir=$W/tuning --out=experiments/results/fashion_mnist_tuning

The last 5,000 training images are held out as the validation split; every
method acts in the last of 4 epochs, warm-started from the same no-reg run at
epoch 3. experiments.tune picks each method's value by CRITERION and writes
choices.json, which configs/tables/fashion_mnist_tuned.py reads.

`tuning_table` builds the same tuning for any base config (the paper networks' tables,
configs/tables/fashion_mnist_{vgg,resnet18,mobilenetv2}_tuning.py).
"""
from configs import fashion_mnist
from configs.tables import methods, protocols

TUNING_SEED = 0
VALIDATION_SIZE = 5000
# Each method's grid: 4 values a factor ~3 apart. l1/l2 keep the default run's ratio
# lambda_w = lambda_a / 10; l2's grid is l1's times ~160 (the ratio of the logged l1 to l2 norms,
# configs/tables/fashion_mnist.py). STE-QAT's hyperparameter is its target bit-width.
def penalty_grid(norm: str, lambdas_a) -> list[dict]:
  """The gradient-norm penalty (norm l1 or l2) at each lambda_a, with lambda_w = lambda_a / 10."""
  return [{"reg.norm": norm, "reg.lambda_a": a, "reg.lambda_w": a / 10} for a in lambdas_a]


GRIDS = {
    "l1": penalty_grid("l1", (0.003, 0.01, 0.03, 0.1)),
    "l2": penalty_grid("l2", (0.5, 1.6, 5.0, 16.0)),
    "kure": [{**methods.NO_PENALTY, "reg.lambda_kurtosis": k} for k in (0.1, 0.3, 1.0, 3.0)],
    "ste-qat": [{**methods.NO_PENALTY, "qat.weight_bits": b, "qat.act_bits": b}
                for b in (3, 4, 5, 6)],
}
# How experiments.tune chooses: the best mean validation accuracy over these settings among
# the values whose float validation accuracy is within MAX_FLOAT_DROP points of no-reg's.
CRITERION_SETTINGS = ((4, 4), (3, 3))
MAX_FLOAT_DROP = 1.0


def tuning_table(base_get_config, grids=None):
  """(get_config, sweep) of the tuning on a base config: its model, data, schedule and
  reg.start_epoch, the validation split held out and measured, grids (default GRIDS) at
  TUNING_SEED."""
  grids = GRIDS if grids is None else grids

  def get_config():
    config = base_get_config()
    config.seed = TUNING_SEED
    config.data.validation_size = VALIDATION_SIZE
    config.eval.split = "validation"
    config.quant.bit_settings = protocols.LOW_BIT_SETTINGS
    return config

  def sweep():
    runs = [{"name": "no-reg", "labels": {"method": "no-reg", "seed": TUNING_SEED},
             "overrides": dict(methods.NO_PENALTY), "warm_start": None}]
    for method, grid in grids.items():
      for i, overrides in enumerate(grid):
        runs.append({"name": f"{method}/{i}",
                     "labels": {"method": method, "value": i, "seed": TUNING_SEED},
                     "overrides": overrides, "warm_start": "no-reg"})
    return runs

  return get_config, sweep


get_config, sweep = tuning_table(fashion_mnist.get_config)
