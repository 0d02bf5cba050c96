"""MobileNetV2's l1 and l2 grids extended downward, on the validation split. In the pre-registered
tuning (configs/tables/fashion_mnist_mobilenetv2_tuning.py) no value of either grid kept float
accuracy within 1 point of no-reg (the smallest lost 7.0 points for l1, 3.5 for l2), so the
criterion fell back to the best float accuracy for both; KURE and STE-QAT had eligible values.
The rule, as for ResNet-18's l1 (fashion_mnist_resnet18_l1_low_tuning.py): each method whose
whole grid fell back gets the next values of its own factor-~3 grid below it, here three (the
drops are larger than ResNet-18's 1.2), with the same seed, validation split, criterion and warm
start (the tuning's no-reg run, shared by experiments/extend_grids.sh). Fixed before any of them
ran. A supplementary table, reported beside the pre-registered one.

    NET=mobilenetv2 EXT=low W=$W bash experiments/extend_grids.sh
"""
from configs import fashion_mnist_mobilenetv2
from configs.tables.fashion_mnist_tuning import (CRITERION_SETTINGS, MAX_FLOAT_DROP, penalty_grid,
                                                 tuning_table)

GRIDS = {"l1": penalty_grid("l1", (0.001, 0.0003, 0.0001)),
         "l2": penalty_grid("l2", (0.16, 0.05, 0.016))}
get_config, sweep = tuning_table(fashion_mnist_mobilenetv2.get_config, GRIDS)
