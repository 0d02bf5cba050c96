"""Building blocks shared by qreg's models.

Two things make a model usable by qreg:
- every conv/dense layer that BatchNorm follows is a `ConvBN`/`DenseBN` block,
  whose params follow qreg.quant's folding convention (`conv`/`dense` next to
  `bn`); with `folded=True` the block is the layer alone, with a bias, which is
  what qreg.quant.fold_batch_norm produces. A depthwise `ConvBN` keeps flax's
  grouped-conv kernel layout (kh, kw, 1, channels), output channel last, so
  folding, weight quantization and export treat it like any other conv;
- every activation that is quantized at evaluation passes through
  `QuantizedActivation`, which (1) adds a zero `perturbations` variable whose
  gradient is the activation gradient penalized during training, (2) records
  samples of the activation into `activation_stats` when that collection is
  mutable (calibration), (3) fake-quantizes with the ranges in `activation_ranges`
  when `bits` is set, with the model's act_scheme (asymmetric by default), or
  always symmetric at taps declared signed (see `activation_tap`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes, linear

from qreg import quant

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def scaled_channels(channels: int, width_multiplier: float) -> int:
  """A layer's channel count under a width multiplier: rounded, at least 1."""
  return max(1, round(channels * width_multiplier))


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """Depthwise 2-D convolution of NHWC x with a (kh, kw, 1, C) kernel, SAME padding.

  What lax.conv_general_dilated(..., feature_group_count=C) computes (hence
  nn.Conv(C, feature_group_count=C, padding='SAME')), written as kh * kw
  shifted elementwise products, because XLA's CPU backend runs the grouped
  convolution far slower: forward and backward on 128x14x14x144, 3.9x slower
  at stride 1 and 37x at stride 2; a whole MobileNetV2 train step, 2.3x.
  """
  kernel_size = kernel.shape[:2]
  padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, "SAME")
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_height, out_width = (-(-size // stride) for size, stride in zip(x.shape[1:3], strides))
  stride_h, stride_w = strides
  return sum(padded[:, i:i + (out_height - 1) * stride_h + 1:stride_h,
                    j:j + (out_width - 1) * stride_w + 1:stride_w, :] * kernel[i, j, 0]
             for i in range(kernel_size[0]) for j in range(kernel_size[1]))


class DepthwiseConv(nn.Module):
  """nn.Conv(C, feature_group_count=C, padding='SAME') for C input channels, by depthwise_conv.

  Same params (`kernel` (kh, kw, 1, C), optional `bias` (C,)), initializers
  and dtype promotion as that nn.Conv, so either can load the other's params.
  """
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  use_bias: bool = False
  dtype: Any = None  # None: computed in the dtype of the inputs and params

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", linear.default_kernel_init, (*self.kernel_size, 1, channels))
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,)) if self.use_bias else None
    x, kernel, bias = dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = depthwise_conv(x, kernel, self.strides)
    return y if bias is None else y + bias


class ConvBN(nn.Module):
  """Conv (no bias) followed by BatchNorm; a biased conv when folded.

  depthwise=True: one kh x kw filter per channel (features must equal the
  input channels), computed by DepthwiseConv.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  depthwise: bool = False
  folded: bool = False
  dtype: Any = None  # None: computed in the dtype of the inputs and params

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depthwise:
      if x.shape[-1] != self.features:
        raise ValueError(f"{self.path}: a depthwise conv keeps the channel count; got "
                         f"{x.shape[-1]} input channels for {self.features} features.")
      x = DepthwiseConv(self.kernel_size, self.strides, use_bias=self.folded, dtype=self.dtype,
                        name="conv")(x)
    else:
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
      # Calibration picks the range for this point's own scheme (signed taps are symmetric).
      self.sow("activation_stats", "symmetric", jnp.array([self.scheme == "symmetric"]))
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


def activation_tap(model: nn.Module, name: str, signed: bool = False) -> QuantizedActivation:
  """The model's QuantizedActivation point `name`, configured by the model's act_* fields.

  signed=True marks an activation with no ReLU before it (a linear bottleneck,
  a residual sum without ReLU): it is quantized with the 'symmetric' scheme
  whatever the model's act_scheme. Such activations are roughly centred on 0,
  where a symmetric grid (zero point 0) has about the step of an asymmetric
  one and keeps the integer arithmetic of the next layer free of zero-point
  terms. Call inside the model's compact __call__ (the new module binds to it).
  """
  scheme = "symmetric" if signed else model.act_scheme
  return QuantizedActivation(model.act_bits, scheme, model.act_straight_through, name=name)
