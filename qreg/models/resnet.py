"""ResNet-18 (He et al. 2016) with a CIFAR stem (3x3 conv, no pool) or an ImageNet stem (7x7/2 + max-pool)."""
from typing import Any

import flax.linen as nn

from qreg.models.layers import ConvBN, activation_tap, scaled_channels


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  act_bits: int | None = None
  act_scheme: str = "asymmetric"
  act_straight_through: bool = False
  folded: bool = False
  dtype: Any = None  # the computation's dtype (model.dtype); params stay float32

  @nn.compact
  def __call__(self, x, train: bool):
    strides = (self.strides, self.strides)
    y = ConvBN(self.features, strides=strides, folded=self.folded, dtype=self.dtype,
               name="conv1")(x, train)
    y = activation_tap(self, "act1")(nn.relu(y))
    y = ConvBN(self.features, folded=self.folded, dtype=self.dtype, name="conv2")(y, train)
    if x.shape[-1] != self.features or self.strides != 1:
      x = ConvBN(self.features, (1, 1), strides, folded=self.folded, dtype=self.dtype,
                 name="shortcut")(x, train)
    return activation_tap(self, "act2")(nn.relu(x + y))


class ResNet18(nn.Module):
  num_classes: int = 10
  stem: str = "cifar"
  widths: tuple[int, ...] = (64, 128, 256, 512)
  blocks_per_stage: int = 2
  width_multiplier: float = 1.0  # scales widths
  act_bits: int | None = None
  act_scheme: str = "asymmetric"
  act_straight_through: bool = False
  folded: bool = False
  dtype: Any = None  # the computation's dtype (model.dtype); params stay float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = [scaled_channels(width, self.width_multiplier) for width in self.widths]
    if self.stem == "cifar":
      x = ConvBN(widths[0], folded=self.folded, dtype=self.dtype, name="stem")(x, train)
      x = activation_tap(self, "stem_act")(nn.relu(x))
    elif self.stem == "imagenet":
      x = ConvBN(widths[0], (7, 7), (2, 2), folded=self.folded, dtype=self.dtype,
                 name="stem")(x, train)
      x = activation_tap(self, "stem_act")(nn.relu(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    else:
      raise ValueError(f"Unknown ResNet stem {self.stem!r}; expected 'cifar' or 'imagenet'.")
    for stage, width in enumerate(widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, self.act_bits, self.act_scheme,
                       self.act_straight_through, self.folded, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
