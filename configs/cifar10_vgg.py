"""CIFAR-10, VGG-like (Alizadeh et al. 2020, Table 1: 4/4 bits 11.47% -> 85.99% with the regularizer).

The paper gives lambda; optimizer, schedule and epochs here are standard
choices for this net, not the paper's (it does not list them all).
Needs TFDS cifar10 under data.data_dir (set data.download=True to fetch it).
"""
from configs import base


def get_config():
  config = base.get_base_config()
  config.data.name = "cifar10"
  config.data.source = "tfds"
  config.model.name = "vgg_like"
  config.optim.learning_rate = 0.05
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 1
  config.train.num_epochs = 100
  config.reg.lambda_w = 0.05
  config.reg.lambda_a = 0.05
  config.reg.start_epoch = 0
  config.eval.batch_size = 1000
  return config
