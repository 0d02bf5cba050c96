"""The cheapest lazy schedule's own lambdas, on the validation split: l1 with the penalty on one
step in 4 and a quarter of each batch, on the default tuning's grid shifted one step down
(its penalty gradient is noisier, README "Cheaper schedules"); the default tuning's seed,
split and criterion.

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist_lazy_tuning.py --workdir=$W/default/lazy_tuning
    python -m experiments.tune --config=configs/tables/fashion_mnist_lazy_tuning.py \
        --workdir=$W/default/lazy_tuning --out=experiments/results/fashion_mnist_lazy/tuning

configs/tables/fashion_mnist_lazy.py then adds the chosen schedule's 3 seeds as l1-k4-f0.25-retuned.
`lazy_tuning_table` builds the same tuning on any base config (experiments/lazy_parity.sh runs
it for a paper network).
"""
from configs import fashion_mnist
from configs.tables.fashion_mnist_tuning import CRITERION_SETTINGS, MAX_FLOAT_DROP, tuning_table

GRIDS = {"l1-k4-f0.25": [{"reg.norm": "l1", "reg.lambda_a": a, "reg.lambda_w": a / 10,
                          "reg.every_k_steps": 4, "reg.penalty_batch_fraction": 0.25}
                         for a in (0.001, 0.003, 0.01, 0.03)]}


def lazy_tuning_table(base_get_config):
  """(get_config, sweep): no-reg and GRIDS on base_get_config, as tuning_table runs them."""
  return tuning_table(base_get_config, grids=GRIDS)


get_config, sweep = lazy_tuning_table(fashion_mnist.get_config)
