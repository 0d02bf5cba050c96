"""The tuned table on configs/fashion_mnist_mobilenetv2.py: 5 methods, seeds 0-2, test set; each
method's overrides from experiments/results/mobilenetv2/tuning/choices.json.

    NET=mobilenetv2 W=$W bash experiments/network_table.sh
"""
import os

from configs.tables import fashion_mnist_mobilenetv2_tuning
from configs.tables.fashion_mnist_tuned import RESULTS, tuned_table

CHOICES = os.path.join(RESULTS, "mobilenetv2", "tuning", "choices.json")
get_config, sweep = tuned_table(fashion_mnist_mobilenetv2_tuning.get_config, CHOICES)
