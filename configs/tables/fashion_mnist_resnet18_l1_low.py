"""ResNet-18's supplementary l1 row at the extended grid's validation choice
(experiments/results/resnet18/l1_low/tuning/choices.json), 3 seeds, test set, beside no-reg's
runs of the pre-registered tuned table (shared by experiments/extend_grids.sh, not retrained).

    NET=resnet18 EXT=l1_low W=$W bash experiments/extend_grids.sh
"""
import os

from configs.tables import fashion_mnist_resnet18_tuning
from configs.tables.fashion_mnist_tuned import RESULTS, tuned_table

CHOICES = os.path.join(RESULTS, "resnet18", "l1_low", "tuning", "choices.json")
get_config, sweep = tuned_table(fashion_mnist_resnet18_tuning.get_config, CHOICES)
