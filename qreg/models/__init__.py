"""Flax Linen models, built from a config by `build_model`."""
from qreg.models.convnets import ConvNet, SmallCNN, VGGLike
from qreg.models.layers import BN_EPSILON
from qreg.models.mobilenet import MobileNetV2
from qreg.models.resnet import ResNet18

MODELS = ("small_cnn", "vgg_like", "resnet18", "mobilenetv2")
# model.stem of the models that have one (resnet18, mobilenetv2).
STEMS = ("cifar", "imagenet")


def build_model(model_config, num_classes: int):
  """Returns the float, unfolded model named by model_config.name, at model_config.width."""
  name = model_config.name
  width = model_config.get("width", 1.0)
  if not width > 0:
    raise ValueError(f"model.width={width!r}: expected a positive channel multiplier.")
  if name == "small_cnn":
    return SmallCNN(num_classes=num_classes, width_multiplier=width)
  if name == "vgg_like":
    return VGGLike(num_classes=num_classes, width_multiplier=width)
  if name in ("resnet18", "mobilenetv2"):
    stem = model_config.get("stem", "cifar")
    if stem not in STEMS:
      raise ValueError(f"Unknown model.stem {stem!r}; expected one of {STEMS}.")
    model_class = ResNet18 if name == "resnet18" else MobileNetV2
    return model_class(num_classes=num_classes, stem=stem, width_multiplier=width)
  raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")


__all__ = ["BN_EPSILON", "ConvNet", "MODELS", "MobileNetV2", "ResNet18", "STEMS", "SmallCNN",
           "VGGLike", "build_model"]
