"""CIFAR-10, ResNet-18 with CIFAR stem (Alizadeh et al. 2020: 4/4 bits 82.47% -> 87.62%).

Optimizer and schedule are the standard ResNet/CIFAR recipe, not taken from the paper.
"""
from configs import base


def get_config():
  config = base.get_base_config()
  config.data.name = "cifar10"
  config.data.source = "tfds"
  config.model.name = "resnet18"
  config.model.stem = "cifar"
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 1
  config.train.num_epochs = 100
  config.reg.lambda_w = 0.05
  config.reg.lambda_a = 0.05
  config.reg.start_epoch = 0
  config.eval.batch_size = 1000
  return config
