"""MobileNetV2's supplementary l1 row at the extended grid's validation choice
(experiments/results/mobilenetv2/l1_low/tuning/choices.json), 3 seeds, test set, beside no-reg's
runs of the pre-registered tuned table (shared by experiments/l1_low.sh, not retrained).

    NET=mobilenetv2 W=$W bash experiments/l1_low.sh
"""
import os

from configs.tables import fashion_mnist_mobilenetv2_tuning
from configs.tables.fashion_mnist_tuned import RESULTS, tuned_table

CHOICES = os.path.join(RESULTS, "mobilenetv2", "l1_low", "tuning", "choices.json")
get_config, sweep = tuned_table(fashion_mnist_mobilenetv2_tuning.get_config, CHOICES)
