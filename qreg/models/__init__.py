"""Flax Linen models, built from a config by `build_model`."""
from qreg.models.convnets import ConvNet, SmallCNN, VGGLike
from qreg.models.layers import BN_EPSILON
from qreg.models.resnet import ResNet18

MODELS = ("small_cnn", "vgg_like", "resnet18")
RESNET_STEMS = ("cifar", "imagenet")


def build_model(model_config, num_classes: int):
  """Returns the float, unfolded model named by model_config.name."""
  name = model_config.name
  if name == "small_cnn":
    return SmallCNN(num_classes=num_classes)
  if name == "vgg_like":
    return VGGLike(num_classes=num_classes)
  if name == "resnet18":
    stem = model_config.get("stem", "cifar")
    if stem not in RESNET_STEMS:
      raise ValueError(f"Unknown model.stem {stem!r}; expected one of {RESNET_STEMS}.")
    return ResNet18(num_classes=num_classes, stem=stem)
  raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")


__all__ = ["BN_EPSILON", "ConvNet", "MODELS", "RESNET_STEMS", "ResNet18", "SmallCNN", "VGGLike", "build_model"]
