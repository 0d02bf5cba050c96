"""A small BatchNorm CNN for 28x28 inputs (MNIST, Fashion-MNIST), sized for CPU runs."""
import flax.linen as nn

from qreg.models.layers import ConvBN, DenseBN, QuantizedActivation


class SmallCNN(nn.Module):
  """conv16-MP-conv32-MP-conv64-FC128-FC, BatchNorm after every hidden layer.

  Max-pooling follows every conv but the last, so most of the compute runs at
  low resolution: about 2.3 M multiply-adds per 28x28 example.
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  hidden: int = 128
  act_bits: int | None = None
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.widths):
      x = ConvBN(width, folded=self.folded, name=f"conv{i + 1}")(x, train)
      x = QuantizedActivation(self.act_bits, name=f"act{i + 1}")(nn.relu(x))
      if i < len(self.widths) - 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = DenseBN(self.hidden, folded=self.folded, name="fc1")(x, train)
    x = QuantizedActivation(self.act_bits, name=f"act{len(self.widths) + 1}")(nn.relu(x))
    return nn.Dense(self.num_classes, name="head")(x)
