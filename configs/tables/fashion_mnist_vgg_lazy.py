"""configs/tables/fashion_mnist_lazy.py's comparison on VGG-like at width 1/8, with the lambdas
chosen in experiments/results/vgg/tuning, plus the k=4, f=1/4 schedule with its own lambdas
once experiments/results/vgg/lazy/tuning exists (NET=vgg W=$W bash experiments/lazy_parity.sh)."""
import os

from configs.tables import fashion_mnist_vgg_tuned
from configs.tables.fashion_mnist_lazy import lazy_table
from configs.tables.fashion_mnist_tuned import RESULTS

RETUNED = os.path.join(RESULTS, "vgg", "lazy", "tuning", "choices.json")
get_config, sweep = lazy_table(fashion_mnist_vgg_tuned.get_config, fashion_mnist_vgg_tuned.CHOICES,
                               retuned_path=RETUNED)
