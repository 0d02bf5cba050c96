"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with linear bottlenecks.

Three stems, which differ only in strides (STEM_STRIDES):
- 'imagenet': the paper's network for 224x224 inputs, total stride 32 (7x7 final map);
- 'cifar': for 28x28 / 32x32 inputs, the stem conv and the first stride-2 stage
  (24 channels) at stride 1, as in kuangliu/pytorch-cifar: total stride 8, so
  32x32 and 28x28 inputs both end in a 4x4 map;
- 'stride16': the ImageNet stem conv (stride 2) and the 24-channel stage at stride 1:
  total stride 16, 28x28 inputs end in a 2x2 map (the ImageNet stem would reach 1x1 maps
  two stages early, where a 3x3 depthwise kernel sees only padding off its centre tap),
  at about a quarter of the cifar stem's cost (configs/fashion_mnist_mobilenetv2.py).
Every conv is a ConvBN block (the depthwise ones too), so BatchNorm folds away
as in the other models. Activations are tapped after each ReLU6 (unsigned:
the model's act_scheme) and at each linear bottleneck output and residual sum
(signed: always symmetric), the points an integer MobileNetV2 requantizes.
No dropout before the head, like qreg's other models.
"""
from typing import Any

import flax.linen as nn

from qreg.models.layers import ConvBN, activation_tap

# (expansion t, output channels c, blocks n, stride s of the first block):
# Sandler et al. 2018, table 2.
INVERTED_RESIDUAL_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# stem -> (the stem conv's stride, the stages whose first block runs at stride 1 instead of
# the table's 2, as indices into the stages).
STEM_STRIDES = {"cifar": (1, (1,)), "stride16": (2, (1,)), "imagenet": (2, ())}
CHANNEL_DIVISOR = 8


def make_divisible(channels: float, divisor: int = CHANNEL_DIVISOR) -> int:
  """channels rounded to the nearest multiple of divisor (at least divisor), and never down by
  more than 10%: the rule of the reference implementations (TF-slim's and torchvision's
  _make_divisible) for width-scaled channel counts."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
  """1x1 expand ConvBN-ReLU6, 3x3 depthwise ConvBN-ReLU6, 1x1 project ConvBN (linear bottleneck),
  plus the input when the shape is unchanged. No expand layer when expansion is 1."""
  features: int
  expansion: int
  strides: int = 1
  act_bits: int | None = None
  act_scheme: str = "asymmetric"
  act_straight_through: bool = False
  folded: bool = False
  dtype: Any = None  # the computation's dtype (model.dtype); params stay float32
  relu6: bool = True  # False: ReLU, for cross-layer equalization (qreg.equalize)

  @nn.compact
  def __call__(self, x, train: bool):
    act = nn.relu6 if self.relu6 else nn.relu
    y = x
    if self.expansion != 1:
      y = ConvBN(x.shape[-1] * self.expansion, (1, 1), folded=self.folded, dtype=self.dtype,
                 name="expand")(y, train)
      y = activation_tap(self, "expand_act")(act(y))
    y = ConvBN(y.shape[-1], strides=(self.strides, self.strides), depthwise=True,
               folded=self.folded, dtype=self.dtype, name="depthwise")(y, train)
    y = activation_tap(self, "depthwise_act")(act(y))
    y = ConvBN(self.features, (1, 1), folded=self.folded, dtype=self.dtype,
               name="project")(y, train)
    y = activation_tap(self, "project_act", signed=True)(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = activation_tap(self, "residual_act", signed=True)(x + y)
    return y


class MobileNetV2(nn.Module):
  num_classes: int = 10
  stem: str = "cifar"
  stages: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUAL_STAGES  # (t, c, n, s) rows
  # Scales every channel count, rounded to a multiple of 8; the last conv's only above 1 (the
  # paper's rule).
  width_multiplier: float = 1.0
  act_bits: int | None = None
  act_scheme: str = "asymmetric"
  act_straight_through: bool = False
  folded: bool = False
  dtype: Any = None  # the computation's dtype (model.dtype); params stay float32
  relu6: bool = True  # False: ReLU in its place, for cross-layer equalization (qreg.equalize)

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = nn.relu6 if self.relu6 else nn.relu
    if self.stem not in STEM_STRIDES:
      raise ValueError(f"Unknown MobileNetV2 stem {self.stem!r}; expected one of "
                       f"{tuple(STEM_STRIDES)}.")
    stem_stride, stride_1_stages = STEM_STRIDES[self.stem]
    x = ConvBN(make_divisible(STEM_CHANNELS * self.width_multiplier),
               strides=(stem_stride, stem_stride),
               folded=self.folded, dtype=self.dtype, name="stem")(x, train)
    x = activation_tap(self, "stem_act")(act(x))
    for stage, (expansion, channels, num_blocks, strides) in enumerate(self.stages):
      if stage in stride_1_stages:
        strides = 1
      for block in range(num_blocks):
        x = InvertedResidual(make_divisible(channels * self.width_multiplier), expansion,
                             strides if block == 0 else 1, self.act_bits, self.act_scheme,
                             self.act_straight_through, self.folded, self.dtype, self.relu6,
                             name=f"stage{stage + 1}_block{block + 1}")(x, train)
    last_channels = (make_divisible(LAST_CHANNELS * self.width_multiplier)
                     if self.width_multiplier > 1.0 else LAST_CHANNELS)
    x = ConvBN(last_channels, (1, 1), folded=self.folded, dtype=self.dtype, name="last")(x, train)
    x = activation_tap(self, "last_act")(act(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
