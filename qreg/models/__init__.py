"""Flax Linen models, built from a config by `build_model`; `register_model` adds your own.

A model qreg can train, fold, sweep and export (docs/models.md):
- its __call__(x, train: bool) returns logits;
- it has the fields act_bits, act_scheme, act_straight_through and folded,
  which qreg sets with `model.clone(...)` for the sweep and for QAT;
- every conv/dense layer that BatchNorm follows is a ConvBN/DenseBN block,
  built with folded=self.folded (qreg.quant.fold_batch_norm's convention);
- every activation to quantize passes through activation_tap(self, name).
"""
from collections.abc import Callable

import jax.numpy as jnp

from qreg.models.convnets import ConvNet, SmallCNN, VGGLike
from qreg.models.layers import BN_EPSILON
from qreg.models.mobilenet import STEM_STRIDES, MobileNetV2
from qreg.models.resnet import ResNet18

# model.stem's choices, for the models that have one.
STEMS = {"resnet18": ("cifar", "imagenet"), "mobilenetv2": tuple(STEM_STRIDES)}
# name -> (model_config, num_classes) -> the float, unfolded model (model.width scales channels).
_BUILDERS: dict[str, Callable] = {
    "small_cnn": lambda c, num_classes: SmallCNN(num_classes=num_classes,
                                                 width_multiplier=c.width),
    "vgg_like": lambda c, num_classes: VGGLike(num_classes=num_classes, width_multiplier=c.width),
    "resnet18": lambda c, num_classes: ResNet18(num_classes=num_classes, stem=c.stem,
                                                width_multiplier=c.width),
    "mobilenetv2": lambda c, num_classes: MobileNetV2(num_classes=num_classes, stem=c.stem,
                                                      width_multiplier=c.width),
}
MODELS = tuple(_BUILDERS)


def register_model(name: str, build: Callable) -> None:
  """Makes `model.name=name` build `build(model_config, num_classes)`."""
  global MODELS
  if name in _BUILDERS:
    raise ValueError(f"A model named {name!r} is already registered.")
  _BUILDERS[name] = build
  MODELS = tuple(_BUILDERS)


def unregister_model(name: str) -> None:
  global MODELS
  del _BUILDERS[name]
  MODELS = tuple(_BUILDERS)


def build_model(model_config, num_classes: int):
  """The float, unfolded model named by a validated model_config.name."""
  return _BUILDERS[model_config.name](model_config, num_classes)


# model.dtype: the dtype training computes in; params, optimizer state and BatchNorm
# statistics stay float32, and the quantization sweep always computes in float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def with_compute_dtype(model, dtype_name: str):
  """The model computing in DTYPES[dtype_name] (its `dtype` field), for training."""
  if dtype_name == "float32":
    return model
  if "dtype" not in getattr(model, "__dataclass_fields__", {}):
    raise ValueError(f"model.dtype={dtype_name!r} needs a model with a `dtype` field passed to "
                     f"its layers; {type(model).__name__} has none.")
  return model.clone(dtype=DTYPES[dtype_name])


__all__ = ["BN_EPSILON", "ConvNet", "DTYPES", "MODELS", "MobileNetV2", "ResNet18", "STEMS",
           "SmallCNN", "VGGLike", "build_model", "register_model", "unregister_model",
           "with_compute_dtype"]
