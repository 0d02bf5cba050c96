"""The paper's table on the offline default (Fashion-MNIST, small BatchNorm CNN), 3 seeds.

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist.py --workdir=workdirs/table_fmnist
    python -m experiments.make_tables --workdir=workdirs/table_fmnist --out=experiments/results/fashion_mnist

Methods act in the last of 4 epochs (fine-tuning after 3 plain epochs).
"""
from configs import fashion_mnist
from configs.tables import methods


def get_config():
  config = fashion_mnist.get_config()
  config.quant.bit_settings = methods.TABLE_BIT_SETTINGS
  return config


def sweep():
  config = get_config()
  return methods.table_sweep(methods.methods(config.reg.lambda_w, config.reg.lambda_a,
                                             l2_scale=L2_SCALE))


# Measured at the start of the regularized epoch of the default run: the l1 norms of the
# weight / activation gradients are about 30x / 8x their per-layer l2 norms summed.
L2_SCALE = 10.0
