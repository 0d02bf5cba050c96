"""The paper's table on the offline default (Fashion-MNIST, small BatchNorm CNN), 3 seeds.

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist.py --workdir=workdirs/table_fmnist
    python -m experiments.make_tables --workdir=workdirs/table_fmnist --out=experiments/results/fashion_mnist

Methods act in the last of 4 epochs (fine-tuning after 3 plain epochs).
"""
from configs import fashion_mnist
from configs.tables import methods

# The l2 row's lambdas are l1's times this, so that both penalties start the regularized
# epoch at the same value: at the default run's epoch-3 checkpoint (5 training batches) the
# logged l1 norms were 170x (weights) and 157x (activations) the summed per-layer l2 norms.
L2_SCALE = 160.0

get_config, sweep = methods.paper_table(fashion_mnist.get_config, L2_SCALE)
