"""MobileNetV2's l1 grid extended downward, on the validation split: in the pre-registered tuning
(configs/tables/fashion_mnist_mobilenetv2_tuning.py) even the grid's smallest l1 value (0.003)
lost 7 float points on validation, so its criterion falls back to the best float accuracy.
These are the next three values of the same factor-~3 grid (three, not ResNet-18's two: the
smallest value lost six times more here), fixed before any of them ran, with the same seed,
validation split, criterion and warm start (the tuning's no-reg run, shared by
experiments/l1_low.sh). A supplementary row, reported beside the pre-registered table.

    NET=mobilenetv2 W=$W bash experiments/l1_low.sh
"""
from configs import fashion_mnist_mobilenetv2
from configs.tables.fashion_mnist_tuning import (CRITERION_SETTINGS, MAX_FLOAT_DROP, l1_grid,
                                                 tuning_table)

GRIDS = {"l1": l1_grid((0.001, 0.0003, 0.0001))}
get_config, sweep = tuning_table(fashion_mnist_mobilenetv2.get_config, GRIDS)
