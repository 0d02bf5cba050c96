"""Equal-budget tuning of every method on configs/fashion_mnist_vgg.py, on the validation split:
the offline default's grids, seed and criterion (configs/tables/fashion_mnist_tuning.py).

    NET=vgg W=$W bash experiments/network_table.sh
"""
from configs import fashion_mnist_vgg
from configs.tables.fashion_mnist_tuning import (CRITERION_SETTINGS, GRIDS, MAX_FLOAT_DROP,
                                                 tuning_table)

get_config, sweep = tuning_table(fashion_mnist_vgg.get_config)
