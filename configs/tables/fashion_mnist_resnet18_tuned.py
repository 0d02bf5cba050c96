"""The tuned table on configs/fashion_mnist_resnet18.py: 5 methods, seeds 0-2, test set; each
method's overrides from experiments/results/resnet18/tuning/choices.json.

    NET=resnet18 W=$W bash experiments/network_table.sh
"""
import os

from configs.tables import fashion_mnist_resnet18_tuning
from configs.tables.fashion_mnist_tuned import RESULTS, tuned_table

CHOICES = os.path.join(RESULTS, "resnet18", "tuning", "choices.json")
get_config, sweep = tuned_table(fashion_mnist_resnet18_tuning.get_config, CHOICES)
