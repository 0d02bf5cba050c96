"""The paper's ResNet-18 (Table 1) on Fashion-MNIST at 1/8 width: the CPU-scale Table 1 row.

    python -m qreg.main --config=configs/fashion_mnist_resnet18.py --workdir=workdirs/fmnist_resnet18

Same depth and structure as configs/cifar10_resnet18.py (CIFAR stem, four stages of two basic
blocks, 64-128-256-512 channels at width 1.0), at model.width = 0.125 (8-16-32-64 channels),
and the offline default's data, schedule and epochs (3 plain, the regularizer in the last).
A plain step (batch 128, 28x28) costs about what VGG-like's does at the same width on the 2-core
development CPU (benchmarks/results/table1_networks_cpu/step_cost.md). The lambdas are the small
CNN's; the table uses its own validation-chosen ones.
"""
from configs import fashion_mnist

WIDTH = 0.125


def get_config():
  config = fashion_mnist.get_config()
  config.model.name = "resnet18"
  config.model.stem = "cifar"
  config.model.width = WIDTH
  return config
