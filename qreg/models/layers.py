"""Building blocks shared by qreg's models.

Two things make a model usable by qreg:
- every conv/dense layer that BatchNorm follows is a `ConvBN`/`DenseBN` block,
  whose params follow qreg.quant's folding convention (`conv`/`dense` next to
  `bn`); with `folded=True` the block is the layer alone, with a bias, which is
  what qreg.quant.fold_batch_norm produces;
- every activation that is quantized at evaluation passes through
  `QuantizedActivation`, which (1) adds a zero `perturbations` variable whose
  gradient is the activation gradient penalized during training, (2) records
  samples of the activation into `activation_stats` when that collection is
  mutable (calibration), (3) fake-quantizes with the ranges in `activation_ranges`
  when `bits` is set (asymmetric by default; symmetric for signed activations).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qreg import quant

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class ConvBN(nn.Module):
  """Conv (no bias) followed by BatchNorm; a biased conv when folded."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  folded: bool = False
  dtype: Any = None  # None: computed in the dtype of the inputs and params

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding="SAME",
                use_bias=self.folded, dtype=self.dtype, name="conv")(x)
    if self.folded:
      return x
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(x)


class DenseBN(nn.Module):
  """Dense (no bias) followed by BatchNorm; a biased dense when folded."""
  features: int
  folded: bool = False
  dtype: Any = None  # None: computed in the dtype of the inputs and params

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, use_bias=self.folded, dtype=self.dtype, name="dense")(x)
    if self.folded:
      return x
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=self.dtype, name="bn")(x)


class QuantizedActivation(nn.Module):
  """A point where an activation is perturbed (training) and quantized (evaluation)."""
  bits: int | None = None
  scheme: str = "asymmetric"
  # QAT: quantize with this batch's own min-max range and pass gradients straight through.
  straight_through: bool = False
  # Calibration keeps this many evenly strided values of each batch's activation.
  num_samples: int = 4096

  @nn.compact
  def __call__(self, x):
    x = self.perturb("activation", x)
    if self.is_mutable_collection("activation_stats"):
      flat = x.reshape(-1)
      stride = max(1, flat.size // self.num_samples)
      # The exact extremes join the samples, so min-max calibration is exact.
      self.sow("activation_stats", "samples",
               jnp.concatenate([flat[::stride][:self.num_samples], jnp.stack([flat.min(), flat.max()])]))
    if self.bits is None:
      return x
    if self.straight_through:
      low, high = jax.lax.stop_gradient((jnp.min(x), jnp.max(x)))
      return quant.straight_through(x, quant.quantize_activation(x, low, high, self.bits,
                                                                 self.scheme))
    if not self.has_variable("activation_ranges", "min"):
      raise ValueError(
          f"{self.path}: activation quantization to {self.bits} bits needs calibrated "
          "ranges; pass an 'activation_ranges' collection (see qreg.evaluate).")
    low = self.get_variable("activation_ranges", "min")
    high = self.get_variable("activation_ranges", "max")
    return quant.quantize_activation(x, low, high, self.bits, self.scheme)


def activation_tap(model: nn.Module, name: str) -> QuantizedActivation:
  """The model's QuantizedActivation point `name`, configured by the model's act_* fields.

  Call inside the model's compact __call__ (the new module binds to it).
  """
  return QuantizedActivation(model.act_bits, model.act_scheme, model.act_straight_through,
                             name=name)
