"""The CIFAR-10 "VGG-like" network of the quantization literature.

2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-FC1024-FC10, BatchNorm after each hidden
layer (as in Alizadeh et al. 2020 and the binary/ternary-net papers before it).
"""
import flax.linen as nn

from qreg.models.layers import ConvBN, DenseBN, QuantizedActivation


class VGGLike(nn.Module):
  num_classes: int = 10
  widths: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
  hidden: int = 1024
  act_bits: int | None = None
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.widths):
      x = ConvBN(width, folded=self.folded, name=f"conv{i + 1}")(x, train)
      x = QuantizedActivation(self.act_bits, name=f"act{i + 1}")(nn.relu(x))
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = DenseBN(self.hidden, folded=self.folded, name="fc1")(x, train)
    x = QuantizedActivation(self.act_bits, name=f"act{len(self.widths) + 1}")(nn.relu(x))
    return nn.Dense(self.num_classes, name="head")(x)
