"""ONNX export: the folded, quantized model as a QDQ graph that onnxruntime runs.

    python -m qreg.export --format=onnx --workdir=<dir> --weight_bits=4 --act_bits=4 --out=m.onnx

- Weights are integer initializers (int8, or uint8 for the asymmetric scheme, holding b-bit
  codes) followed by DequantizeLinear, per tensor or per output channel (`axis`), at each
  kernel's own bit-width (quant.weight_rules, quant.first_last_bits); biases stay float32.
- Each activation tap is QuantizeLinear -> DequantizeLinear at its calibrated scale and zero
  point, with the tap's own scheme (uint8 for asymmetric, int8 for symmetric, signed taps
  symmetric). Where the container's range is wider than the b-bit grid (below 8 bits, and the
  symmetric grid's -127..127 in int8's -128..127), a Clip to the grid's float range comes first,
  so that the codes are the sweep's: clip(round(x / scale) + zero_point, qmin, qmax).
- The graph takes NHWC images like qreg's models and transposes them to ONNX's NCHW once.
- Opset 21; int8/uint8 weight containers, or with int4=True int4/uint4 ones for kernels of 4
  bits or fewer (half the bytes; onnxruntime's CPU DequantizeLinear runs them, not every
  runtime's does).

The graph is built per layer with onnx.helper by one builder per model family, mirroring its
Flax __call__ (ConvNet: SmallCNN and VGG-like; ResNet18; MobileNetV2, depthwise convolutions as
grouped Conv). Building it by hand, rather than converting the jaxpr, keeps QuantizeLinear /
DequantizeLinear at the tap points, where a runtime fuses them into integer kernels; a converted
jaxpr would carry the fake quantization as float arithmetic. Rounding: ONNX's QuantizeLinear
rounds half to even, like jnp.round.
"""
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qreg import quant

PyTree = Any
OPSET = 21


def _same_pads(height: int, width: int, window: tuple[int, int], strides: tuple[int, int]):
  """SAME padding as ONNX pads [top, left, bottom, right] (Flax puts the odd pixel at the end),
  and the output height and width."""
  pads, out = [], []
  for size, k, s in ((height, window[0], strides[0]), (width, window[1], strides[1])):
    out_size = -(-size // s)
    total = max((out_size - 1) * s + k - size, 0)
    pads.append((total // 2, total - total // 2))
    out.append(out_size)
  return [pads[0][0], pads[1][0], pads[0][1], pads[1][1]], tuple(out)


class GraphBuilder:
  """Nodes, initializers and the NCHW shapes of the tensors built so far."""

  def __init__(self, image_shape: tuple[int, ...], act_bits: int | None, ranges: PyTree,
               schemes: Mapping[str, str], int4: bool = False):
    self.nodes, self.initializers, self.shapes = [], [], {}
    self.act_bits, self.ranges, self.schemes, self.int4 = act_bits, ranges, schemes, int4
    self._count = 0
    height, width, channels = image_shape
    self.input = helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                               ["batch", height, width, channels])
    self.x = self.node("Transpose", ["images"], perm=[0, 3, 1, 2])
    self.shapes[self.x] = (channels, height, width)

  def name(self, prefix: str) -> str:
    self._count += 1
    return f"{prefix}_{self._count}"

  def node(self, op: str, inputs: list[str], **attrs) -> str:
    out = self.name(op.lower())
    self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
    return out

  def constant(self, prefix: str, value: np.ndarray) -> str:
    name = self.name(prefix)
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def dequantized_weight(self, path: str, q: quant.Quantized, layout: str) -> str:
    """DequantizeLinear of a kernel's codes, in ONNX's layout (conv: OIHW; dense: (in, out))."""
    codes = np.asarray(q.codes)
    if self.int4 and q.bits <= 4:  # packed two to a byte by numpy_helper
      container = ml_dtypes.uint4 if q.scheme == "asymmetric" else ml_dtypes.int4
    else:
      container = np.uint8 if q.scheme == "asymmetric" else np.int8
    scale, zero_point = np.asarray(q.scale, np.float32), np.asarray(q.zero_point)
    per_channel = scale.size > 1
    if layout == "conv":  # HWIO -> OIHW
      codes = codes.transpose(3, 2, 0, 1)
      axis = 0
    else:
      axis = 1
    codes_name = self.constant(f"{path}/codes", codes.astype(container))
    scale_name = self.constant(f"{path}/scale",
                               scale.reshape(-1) if per_channel else scale.reshape(()))
    zp = zero_point.reshape(-1) if per_channel else zero_point.reshape(())
    zp_name = self.constant(f"{path}/zero_point", zp.astype(container))
    attrs = {"axis": axis} if per_channel else {}
    return self.node("DequantizeLinear", [codes_name, scale_name, zp_name], **attrs)

  def conv(self, x: str, path: str, layer: Mapping, strides=(1, 1), group: int = 1) -> str:
    kernel = layer["kernel"]
    kh, kw, _, out = np.shape(kernel.codes)
    _, height, width = self.shapes[x]
    pads, out_hw = _same_pads(height, width, (kh, kw), tuple(strides))
    weight = self.dequantized_weight(path, kernel, "conv")
    bias = self.constant(f"{path}/bias", np.asarray(layer["bias"], np.float32))
    y = self.node("Conv", [x, weight, bias], strides=list(strides), group=group,
                  kernel_shape=[kh, kw], pads=pads)
    self.shapes[y] = (out, *out_hw)
    return y

  def dense(self, x: str, path: str, layer: Mapping) -> str:
    weight = self.dequantized_weight(path, layer["kernel"], "dense")
    bias = self.constant(f"{path}/bias", np.asarray(layer["bias"], np.float32))
    y = self.node("Gemm", [x, weight, bias])
    self.shapes[y] = (np.shape(layer["kernel"].codes)[-1],)
    return y

  def same_shape(self, op: str, inputs: list[str], **attrs) -> str:
    y = self.node(op, inputs, **attrs)
    self.shapes[y] = self.shapes[inputs[0]]
    return y

  def relu(self, x: str) -> str:
    return self.same_shape("Relu", [x])

  def relu6(self, x: str) -> str:
    return self.same_shape("Clip", [x, self.constant("zero", np.float32(0)),
                                    self.constant("six", np.float32(6))])

  def add(self, a: str, b: str) -> str:
    return self.same_shape("Add", [a, b])

  def tap(self, x: str, path: str) -> str:
    """The activation quantizer at a tap point (identity without act_bits)."""
    if self.act_bits is None:
      return x
    node = self.ranges
    for key in path.split("/"):
      node = node[key]
    scheme = self.schemes[path]
    q = quant.quantize_with_range(np.zeros((), np.float32), np.float32(node["min"]),
                                  np.float32(node["max"]), self.act_bits, scheme)
    scale, zero_point = np.float32(q.scale), int(q.zero_point)
    qmin, qmax = quant.integer_range(self.act_bits, scheme)
    container = np.uint8 if scheme == "asymmetric" else np.int8
    info = np.iinfo(container)
    if (qmin, qmax) != (info.min, info.max):
      x = self.same_shape("Clip", [x, self.constant(f"{path}/low",
                                                    np.float32((qmin - zero_point) * scale)),
                                   self.constant(f"{path}/high",
                                                 np.float32((qmax - zero_point) * scale))])
    scale_name = self.constant(f"{path}/scale", scale)
    zp_name = self.constant(f"{path}/zero_point", np.asarray(zero_point, container))
    codes = self.same_shape("QuantizeLinear", [x, scale_name, zp_name])
    return self.same_shape("DequantizeLinear", [codes, scale_name, zp_name])

  def max_pool(self, x: str, window: int, stride: int, same: bool = False) -> str:
    channels, height, width = self.shapes[x]
    if same:
      pads, out_hw = _same_pads(height, width, (window, window), (stride, stride))
    else:
      pads = [0, 0, 0, 0]
      out_hw = ((height - window) // stride + 1, (width - window) // stride + 1)
    y = self.node("MaxPool", [x], kernel_shape=[window, window], strides=[stride, stride],
                  pads=pads)
    self.shapes[y] = (channels, *out_hw)
    return y

  def flatten_nhwc(self, x: str) -> str:
    """Flattens in qreg's NHWC order, so that a dense kernel's rows line up."""
    channels, height, width = self.shapes[x]
    nhwc = self.node("Transpose", [x], perm=[0, 2, 3, 1])
    y = self.node("Flatten", [nhwc], axis=1)
    self.shapes[y] = (channels * height * width,)
    return y

  def spatial_mean(self, x: str) -> str:
    y = self.node("ReduceMean", [x, self.constant("axes", np.asarray([2, 3], np.int64))],
                  keepdims=0)
    self.shapes[y] = (self.shapes[x][0],)
    return y

  def model(self, logits: str, name: str) -> onnx.ModelProto:
    output = helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", self.shapes[logits][0]])
    graph = helper.make_graph(self.nodes, name, [self.input], [output], self.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qreg")
    onnx.checker.check_model(model)
    return model


def _conv_net(b: GraphBuilder, model, params: PyTree) -> str:
  x = b.x
  for i, pool in enumerate(model.pool_after):
    x = b.tap(b.relu(b.conv(x, f"conv{i + 1}", params[f"conv{i + 1}"]["conv"])), f"act{i + 1}")
    if pool:
      x = b.max_pool(x, 2, 2)
  x = b.flatten_nhwc(x)
  x = b.tap(b.relu(b.dense(x, "fc1", params["fc1"]["dense"])), f"act{len(model.widths) + 1}")
  return b.dense(x, "head", params["head"])


def _resnet18(b: GraphBuilder, model, params: PyTree) -> str:
  if model.stem == "cifar":
    x = b.tap(b.relu(b.conv(b.x, "stem", params["stem"]["conv"])), "stem_act")
  else:
    x = b.tap(b.relu(b.conv(b.x, "stem", params["stem"]["conv"], (2, 2))), "stem_act")
    x = b.max_pool(x, 3, 2, same=True)
  for stage in range(len(model.widths)):
    for block in range(model.blocks_per_stage):
      name = f"stage{stage + 1}_block{block + 1}"
      p, s = params[name], (2, 2) if stage > 0 and block == 0 else (1, 1)
      y = b.tap(b.relu(b.conv(x, f"{name}/conv1", p["conv1"]["conv"], s)), f"{name}/act1")
      y = b.conv(y, f"{name}/conv2", p["conv2"]["conv"])
      if "shortcut" in p:
        x = b.conv(x, f"{name}/shortcut", p["shortcut"]["conv"], s)
      x = b.tap(b.relu(b.add(x, y)), f"{name}/act2")
  return b.dense(b.spatial_mean(x), "head", params["head"])


def _mobilenetv2(b: GraphBuilder, model, params: PyTree) -> str:
  from qreg.models import mobilenet  # pylint: disable=g-import-not-at-top
  act = b.relu6 if model.relu6 else b.relu
  stem_stride, stride_1_stages = mobilenet.STEM_STRIDES[model.stem]
  x = b.tap(act(b.conv(b.x, "stem", params["stem"]["conv"], (stem_stride,) * 2)), "stem_act")
  for stage, (_, _, num_blocks, strides) in enumerate(model.stages):
    if stage in stride_1_stages:
      strides = 1
    for block in range(num_blocks):
      name = f"stage{stage + 1}_block{block + 1}"
      p, s = params[name], (strides if block == 0 else 1,) * 2
      y = x
      if "expand" in p:
        y = b.tap(act(b.conv(y, f"{name}/expand", p["expand"]["conv"])), f"{name}/expand_act")
      channels = b.shapes[y][0]
      y = b.tap(act(b.conv(y, f"{name}/depthwise", p["depthwise"]["conv"], s, group=channels)),
                f"{name}/depthwise_act")
      y = b.tap(b.conv(y, f"{name}/project", p["project"]["conv"]), f"{name}/project_act")
      if s == (1, 1) and b.shapes[x] == b.shapes[y]:
        y = b.tap(b.add(x, y), f"{name}/residual_act")
      x = y
  x = b.tap(act(b.conv(x, "last", params["last"]["conv"])), "last_act")
  return b.dense(b.spatial_mean(x), "head", params["head"])


def build(model, weight_integers: PyTree, image_shape: tuple[int, ...], act_bits: int | None,
          ranges: PyTree | None, schemes: Mapping[str, str], int4: bool = False
          ) -> onnx.ModelProto:
  """The QDQ graph of a built-in model's folded params, whose kernels are quant.Quantized
  (QuantSetup.weight_integers); ranges / schemes: each tap's calibrated range and scheme;
  int4: kernels of 4 bits or fewer in int4/uint4 initializers."""
  from qreg.models import convnets, mobilenet, resnet  # pylint: disable=g-import-not-at-top
  builders = ((convnets.ConvNet, _conv_net), (resnet.ResNet18, _resnet18),
              (mobilenet.MobileNetV2, _mobilenetv2))
  builder = next((f for cls, f in builders if isinstance(model, cls)), None)
  if builder is None:
    raise ValueError(f"ONNX export knows the built-in models (small_cnn, vgg_like, resnet18, "
                     f"mobilenetv2), not {type(model).__name__}.")
  b = GraphBuilder(tuple(image_shape), act_bits, ranges, schemes, int4)
  return b.model(builder(b, model, weight_integers), type(model).__name__)
