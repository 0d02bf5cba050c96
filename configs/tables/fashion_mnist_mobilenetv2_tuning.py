"""Equal-budget tuning of every method on configs/fashion_mnist_mobilenetv2.py, on the
validation split: the offline default's grids, seed and criterion
(configs/tables/fashion_mnist_tuning.py).

    NET=mobilenetv2 W=$W bash experiments/network_table.sh
"""
from configs import fashion_mnist_mobilenetv2
from configs.tables.fashion_mnist_tuning import (CRITERION_SETTINGS, GRIDS, MAX_FLOAT_DROP,
                                                 tuning_table)

get_config, sweep = tuning_table(fashion_mnist_mobilenetv2.get_config)
