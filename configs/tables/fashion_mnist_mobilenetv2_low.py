"""MobileNetV2's supplementary l1 and l2 rows at the extended grids' validation choices
(experiments/results/mobilenetv2/low/tuning/choices.json), 3 seeds, test set, beside no-reg's
runs of the pre-registered tuned table (shared by experiments/extend_grids.sh, not retrained).

    NET=mobilenetv2 EXT=low W=$W bash experiments/extend_grids.sh
"""
import os

from configs.tables import fashion_mnist_mobilenetv2_tuning
from configs.tables.fashion_mnist_tuned import RESULTS, tuned_table

CHOICES = os.path.join(RESULTS, "mobilenetv2", "low", "tuning", "choices.json")
get_config, sweep = tuned_table(fashion_mnist_mobilenetv2_tuning.get_config, CHOICES)
