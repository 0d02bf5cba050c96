"""The paper's VGG-like (Table 1) on Fashion-MNIST at 1/8 width: the CPU-scale Table 1 row.

    python -m qreg.main --config=configs/fashion_mnist_vgg.py --workdir=workdirs/fmnist_vgg

Same depth and structure as configs/cifar10_vgg.py (six 3x3 ConvBN layers, 128-128-256-256-
512-512 channels at width 1.0, three max-pools, a hidden dense layer), at model.width = 0.125
(16-16-32-32-64-64 channels), and the offline default's data, schedule and epochs: 3 plain
epochs, then the regularizer in the last. Width 1/8 keeps a step cheap enough for the whole
tuned table (`python -m experiments.study network_table --net=vgg`) to run on 2 CPU cores
(benchmarks/results/table1_networks_cpu/step_cost.md). The lambdas are the small CNN's (not
tuned for this network); the table uses its own validation-chosen ones.
"""
from configs import fashion_mnist

WIDTH = 0.125


def get_config():
  config = fashion_mnist.get_config()
  config.model.name = "vgg_like"
  config.model.width = WIDTH
  return config
