"""CIFAR-10, ResNet-18 with CIFAR stem (Alizadeh et al. 2020: 4/4 bits 82.47% -> 87.62%).

Same data, λ and schedule as configs/cifar10_vgg.py; the standard ResNet/CIFAR
learning rate, not taken from the paper.
"""
from configs import cifar10_vgg


def get_config():
  config = cifar10_vgg.get_config()
  config.model.name = "resnet18"
  config.model.stem = "cifar"
  config.optim.learning_rate = 0.1
  return config
