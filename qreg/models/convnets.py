"""Plain BatchNorm conv nets: a small CNN for 28x28 inputs and the CIFAR-10 "VGG-like" net."""
from typing import Any

import flax.linen as nn

from qreg.models.layers import ConvBN, DenseBN, activation_tap, scaled_channels


class ConvNet(nn.Module):
  """3x3 ConvBN-ReLU layers (max-pool 2 after those marked in pool_after), FC-BN-ReLU, FC."""
  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  pool_after: tuple[bool, ...] = (True, True, False)
  hidden: int = 128
  width_multiplier: float = 1.0  # scales widths and hidden
  act_bits: int | None = None
  act_scheme: str = "asymmetric"
  act_straight_through: bool = False
  folded: bool = False
  dtype: Any = None  # the computation's dtype (model.dtype); params stay float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.pool_after) != len(self.widths):
      raise ValueError(f"pool_after {self.pool_after} must have one entry per width {self.widths}.")
    for i, (width, pool) in enumerate(zip(self.widths, self.pool_after)):
      x = ConvBN(scaled_channels(width, self.width_multiplier), folded=self.folded,
                 dtype=self.dtype,
                 name=f"conv{i + 1}")(x, train)
      x = activation_tap(self, f"act{i + 1}")(nn.relu(x))
      if pool:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = DenseBN(scaled_channels(self.hidden, self.width_multiplier), folded=self.folded,
                dtype=self.dtype,
                name="fc1")(x, train)
    x = activation_tap(self, f"act{len(self.widths) + 1}")(nn.relu(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class SmallCNN(ConvNet):
  """conv16-MP-conv32-MP-conv64-FC128-FC for 28x28 inputs, sized for CPU runs.

  Pooling early keeps most of the compute at low resolution: about 2.3 M
  multiply-adds per example.
  """


class VGGLike(ConvNet):
  """2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-FC1024-FC10, BatchNorm after each hidden layer.

  The CIFAR-10 net of the quantization literature (Alizadeh et al. 2020 and the
  binary/ternary-net papers before it).
  """
  widths: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
  pool_after: tuple[bool, ...] = (False, True) * 3
  hidden: int = 1024
