"""ImageNet, ResNet-18 (Alizadeh et al. 2020: 4/4 bits 0.30% -> 55.32%, lambda=0.05 for the last 15 epochs).

Needs TFDS imagenet2012 prepared under data.data_dir (manual download).
"""
from configs import base


def get_config():
  config = base.get_base_config()
  config.data.name = "imagenet2012"
  config.data.source = "tfds"
  config.data.batch_size = 256
  config.data.image_size = 224
  config.model.name = "resnet18"
  config.model.stem = "imagenet"
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 1e-4
  config.optim.warmup_epochs = 5
  config.train.num_epochs = 90
  config.train.log_every_steps = 500
  config.reg.lambda_w = 0.05
  config.reg.lambda_a = 0.05
  config.reg.start_epoch = 75
  config.quant.num_calibration_batches = 20
  config.eval.batch_size = 1000
  return config
