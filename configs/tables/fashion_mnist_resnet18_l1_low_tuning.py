"""ResNet-18's l1 grid extended downward, on the validation split: the pre-registered tuning
(configs/tables/fashion_mnist_resnet18_tuning.py) found no l1 value within 1 float point of
no-reg (0.003, the grid's smallest, lost 1.20), so its criterion fell back to the best float
accuracy. These are the next two values of the same factor-~3 grid, with the same seed,
validation split, criterion and warm start (the tuning's no-reg run, shared by
experiments/extend_grids.sh). A supplementary row, reported beside the pre-registered table.

    NET=resnet18 EXT=l1_low W=$W bash experiments/extend_grids.sh
"""
from configs import fashion_mnist_resnet18
from configs.tables.fashion_mnist_tuning import (CRITERION_SETTINGS, MAX_FLOAT_DROP, penalty_grid,
                                                 tuning_table)

GRIDS = {"l1": penalty_grid("l1", (0.001, 0.0003))}
get_config, sweep = tuning_table(fashion_mnist_resnet18.get_config, GRIDS)
