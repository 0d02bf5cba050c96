"""ImageNet, MobileNetV2 with the ImageNet stem, regularized for the last 15 of 90 epochs as
the paper did for ResNet-18 (configs/imagenet_resnet18.py); weight decay 4e-5 as usual for
MobileNetV2. Needs TFDS imagenet2012 prepared under data.data_dir (manual download).
"""
from configs import imagenet_resnet18


def get_config():
  config = imagenet_resnet18.get_config()
  config.model.name = "mobilenetv2"
  config.model.stem = "imagenet"
  config.optim.weight_decay = 4e-5
  return config
