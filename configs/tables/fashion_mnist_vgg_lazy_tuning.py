"""configs/tables/fashion_mnist_lazy_tuning.py on VGG-like at width 1/8: the k=4, f=1/4 schedule's
own lambdas on the validation split, on the same grid, seed and criterion, warm-started from the
VGG tuning's no-reg run (NET=vgg W=$W bash experiments/lazy_parity.sh links it in)."""
from configs.tables import fashion_mnist_vgg_tuning
from configs.tables.fashion_mnist_lazy_tuning import (CRITERION_SETTINGS, GRIDS, MAX_FLOAT_DROP,
                                                      lazy_tuning_table)

get_config, sweep = lazy_tuning_table(fashion_mnist_vgg_tuning.get_config)
