"""Cross-layer equalization and bias absorption (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019), on folded params.

A ReLU commutes with a positive scale: dividing output channel i of a layer (its kernel slice
and bias) by s_i and multiplying input channel i of the next layer by s_i leaves the function
unchanged. With s_i = sqrt(r1_i / r2_i), r1_i the range (absmax) of the first kernel's output
channel i and r2_i that of the second kernel's input channel i, both become sqrt(r1_i r2_i):
a per-tensor quantizer then wastes less of its grid on the widest channel.

Which consecutive pairs qualify (`pairs`): a kernel whose output reaches the next kernel only
through a ReLU (or ReLU6, see below), max-pooling, flattening or spatial mean pooling, each of
which commutes with a positive per-channel scale.
- SmallCNN / VGG-like: every conv -> conv, the last conv -> fc1 (its rows grouped by channel
  in the flatten order), fc1 -> head.
- ResNet-18: conv1 -> conv2 inside each block. A block's output is a residual sum shared by
  the next block's two paths, so no pair crosses a block.
- MobileNetV2: expand -> depthwise -> project inside each block, the stem -> the first block's
  depthwise (unless that block is residual, as at tiny widths), and last -> head. ReLU6 commutes with a scale only if it is a ReLU (min(x/s, 6) is
  not min(x, 6)/s): with equalization the model runs with ReLU in place of ReLU6, as DFQ does
  (`model.relu6=False`); the sweep reports the float accuracy of that model.
Chains (a depthwise layer is the consumer of one pair and the producer of the next) are
equalized pair by pair, repeated until the scales settle.

Bias absorption (DFQ section 4.2): after equalization some channels carry large biases into the
next layer's activation range. For a pair with a ReLU between, c_i = max(0, beta_i - 3 gamma_i)
(beta, gamma: the BatchNorm's shift and scale, so c is 3 standard deviations below the
pre-activation's mean) is moved from the first layer's bias into the next layer's:
ReLU(x - c) = ReLU(x) - c wherever x >= c, and the next layer adds W2 c back. Exact for those
inputs when the consumer sees every input through its whole kernel: dense layers and 1x1
convolutions. A 3x3 SAME-padded consumer sees zeros at the border where it would need -c, so
absorption skips those pairs.
"""
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from qreg import quant

PyTree = Any
# How a consumer's kernel holds input channel i.
CONV, DEPTHWISE, DENSE, FLATTEN_DENSE = "conv", "depthwise", "dense", "flatten_dense"


class Pair(NamedTuple):
  """Two layers (paths of their param dicts, each with `kernel` and `bias` once folded) with a
  positive-homogeneous path between them; consumer_kind says how to find its input channel i."""
  producer: tuple[str, ...]
  consumer: tuple[str, ...]
  consumer_kind: str


def _copy(tree: PyTree) -> PyTree:
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def output_ranges(kernel: np.ndarray) -> np.ndarray:
  """absmax of each output channel (the last axis)."""
  return np.max(np.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)


def input_ranges(kernel: np.ndarray, kind: str, channels: int) -> np.ndarray:
  """absmax of each of the `channels` input channels of a consumer kernel."""
  if kind == CONV:  # (kh, kw, in, out)
    return np.max(np.abs(np.moveaxis(kernel, 2, 0).reshape(channels, -1)), axis=1)
  if kind == DEPTHWISE:  # (kh, kw, 1, C): input channel i is output channel i
    return output_ranges(kernel)
  if kind == DENSE:  # (in, out)
    return np.max(np.abs(kernel), axis=1)
  if kind == FLATTEN_DENSE:  # rows of an NHWC flatten: row r holds channel r % channels
    return np.max(np.abs(kernel.reshape(-1, channels, kernel.shape[-1])), axis=(0, 2))
  raise ValueError(f"Unknown consumer kind {kind!r}.")


def scale_input_channels(kernel: np.ndarray, kind: str, scales: np.ndarray) -> np.ndarray:
  """The consumer kernel with input channel i multiplied by scales[i]."""
  if kind == CONV:
    return kernel * scales[None, None, :, None]
  if kind == DEPTHWISE:
    return kernel * scales
  if kind == DENSE:
    return kernel * scales[:, None]
  if kind == FLATTEN_DENSE:
    shape = kernel.shape
    return (kernel.reshape(-1, scales.size, shape[-1]) * scales[None, :, None]).reshape(shape)
  raise ValueError(f"Unknown consumer kind {kind!r}.")


def input_channel_sums(kernel: np.ndarray, kind: str, channels: int) -> np.ndarray:
  """(channels, out): the consumer's output change per unit added to input channel i at every
  position it reads (the kernel summed over everything but input channel and output)."""
  if kind == CONV:
    return np.sum(kernel, axis=(0, 1))
  if kind == DENSE:
    return kernel
  if kind == FLATTEN_DENSE:
    return np.sum(kernel.reshape(-1, channels, kernel.shape[-1]), axis=0)
  raise ValueError(f"Bias absorption into a {kind!r} consumer is not exact; it is skipped.")


def equalize_pairs(folded: PyTree, pairs: Sequence[Pair], max_iterations: int = 100,
             tolerance: float = 1e-8) -> tuple[PyTree, list[np.ndarray]]:
  """Folded params with every pair equalized, repeated over the pairs until no scale moves by
  more than `tolerance` (relative); returns them and each pair's accumulated scales."""
  params = _copy(folded)
  accumulated = [None] * len(pairs)
  for _ in range(max_iterations):
    largest = 0.0
    for index, pair in enumerate(pairs):
      producer = quant.subtree(params, pair.producer)
      consumer = quant.subtree(params, pair.consumer)
      kernel1, kernel2 = np.asarray(producer["kernel"]), np.asarray(consumer["kernel"])
      r1 = output_ranges(kernel1)
      r2 = input_ranges(kernel2, pair.consumer_kind, r1.size)
      scales = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
      producer["kernel"] = np.asarray(kernel1 / scales, folded_dtype(producer))
      producer["bias"] = np.asarray(np.asarray(producer["bias"]) / scales, folded_dtype(producer))
      consumer["kernel"] = np.asarray(scale_input_channels(kernel2, pair.consumer_kind, scales),
                                       folded_dtype(consumer))
      accumulated[index] = scales if accumulated[index] is None else accumulated[index] * scales
      largest = max(largest, float(np.max(np.abs(scales - 1.0))))
    if largest <= tolerance:
      break
  return params, accumulated


def folded_dtype(layer: Mapping) -> Any:
  return np.asarray(layer["kernel"]).dtype


def absorbable(pair: Pair, consumer_kernel: np.ndarray) -> bool:
  """Whether absorbing into the consumer is exact on inputs above the absorbed amount."""
  if pair.consumer_kind in (DENSE, FLATTEN_DENSE):
    return True
  return pair.consumer_kind == CONV and consumer_kernel.shape[:2] == (1, 1)


def absorb_biases(folded: PyTree, pairs: Sequence[Pair], bn_shift: Mapping, bn_scale: Mapping,
                  scales: Sequence[np.ndarray] | None = None, num_stds: float = 3.0) -> PyTree:
  """Moves c_i = max(0, beta_i - num_stds gamma_i) from each absorbable pair's producer bias to
  its consumer's bias (c in the equalized units: divided by the pair's scales).

  bn_shift / bn_scale: {producer path: beta / gamma of the BatchNorm folded into it}, before
  equalization; scales: equalize_pairs' accumulated scales per pair (None: not equalized).
  """
  params = _copy(folded)
  for index, pair in enumerate(pairs):
    if pair.producer not in bn_shift:
      continue  # no BatchNorm statistics to bound the pre-activation by
    producer = quant.subtree(params, pair.producer)
    consumer = quant.subtree(params, pair.consumer)
    kernel2 = np.asarray(consumer["kernel"])
    if not absorbable(pair, kernel2):
      continue
    beta, gamma = np.asarray(bn_shift[pair.producer]), np.abs(np.asarray(bn_scale[pair.producer]))
    c = np.maximum(0.0, beta - num_stds * gamma)
    if scales is not None and scales[index] is not None:
      c = c / scales[index]
    producer["bias"] = np.asarray(np.asarray(producer["bias"]) - c, folded_dtype(producer))
    sums = input_channel_sums(kernel2, pair.consumer_kind, c.size)
    consumer["bias"] = np.asarray(np.asarray(consumer["bias"]) + c @ sums, folded_dtype(consumer))
  return params


def pairs(model, folded: PyTree) -> list[Pair]:
  """The equalizable pairs of a built-in model, in call order (see the module docstring)."""
  from qreg.models import convnets, mobilenet, resnet  # pylint: disable=g-import-not-at-top
  if isinstance(model, convnets.ConvNet):
    convs = [(f"conv{i + 1}", "conv") for i in range(len(model.widths))]
    found = [Pair(a, b, CONV) for a, b in zip(convs, convs[1:])]
    return found + [Pair(convs[-1], ("fc1", "dense"), FLATTEN_DENSE),
                    Pair(("fc1", "dense"), ("head",), DENSE)]
  if isinstance(model, resnet.ResNet18):
    return [Pair((block, "conv1", "conv"), (block, "conv2", "conv"), CONV)
            for block in folded if block.startswith("stage")]
  if isinstance(model, mobilenet.MobileNetV2):
    found = []
    for block in (name for name in folded if name.startswith("stage")):
      if "expand" in folded[block]:
        found.append(Pair((block, "expand", "conv"), (block, "depthwise", "conv"), DEPTHWISE))
      elif block == "stage1_block1" and (folded["stem"]["conv"]["kernel"].shape[-1]
                                         != folded[block]["project"]["conv"]["kernel"].shape[-1]):
        # Expansion 1: the stem feeds the depthwise directly, and only it when the block
        # changes the channel count (else the stem's output is also the residual's).
        found.append(Pair(("stem", "conv"), (block, "depthwise", "conv"), DEPTHWISE))
      found.append(Pair((block, "depthwise", "conv"), (block, "project", "conv"), CONV))
    return found + [Pair(("last", "conv"), ("head",), DENSE)]
  raise ValueError(f"Cross-layer equalization knows the pairs of the built-in models "
                   f"(small_cnn, vgg_like, resnet18, mobilenetv2), not {type(model).__name__}.")


def equalizable_model(model):
  """The model equalization is exact for: MobileNetV2 with ReLU in place of ReLU6."""
  return model.clone(relu6=False) if hasattr(model, "relu6") else model


def equalize_model(model, params: PyTree, folded: PyTree, equalize: bool = True,
                   absorb: bool = False) -> PyTree:
  """The folded params of `model` (built from params) equalized, then with biases absorbed."""
  found = pairs(model, folded)
  equalized, scales = equalize_pairs(folded, found) if equalize else (folded, None)
  if not absorb:
    return equalized
  blocks = {pair.producer: quant.subtree(params, pair.producer[:-1]) for pair in found}
  bn = {producer: block["bn"] for producer, block in blocks.items() if "bn" in block}
  return absorb_biases(equalized, found, {p: v["bias"] for p, v in bn.items()},
                       {p: v["scale"] for p, v in bn.items()}, scales)
