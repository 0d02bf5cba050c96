"""CIFAR-10, MobileNetV2 with the CIFAR stem (KURE's network; the textbook case where
per-tensor PTQ breaks: folded depthwise kernels have per-channel ranges that differ by orders
of magnitude).

Same data, λ and schedule as configs/cifar10_vgg.py, with the weight decay usual for
MobileNetV2 (4e-5); not taken from a paper's table.
"""
from configs import cifar10_vgg


def get_config():
  config = cifar10_vgg.get_config()
  config.model.name = "mobilenetv2"
  config.model.stem = "cifar"
  config.optim.weight_decay = 4e-5
  return config
