"""configs/tables/fashion_mnist_lazy.py's comparison on VGG-like at width 1/8, with the lambdas
chosen in experiments/results/vgg/tuning (NET=vgg W=$W bash experiments/lazy_parity.sh)."""
from configs.tables import fashion_mnist_vgg_tuned
from configs.tables.fashion_mnist_lazy import lazy_table

get_config, sweep = lazy_table(fashion_mnist_vgg_tuned.get_config, fashion_mnist_vgg_tuned.CHOICES)
