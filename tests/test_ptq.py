"""The strong protocol's steps inside the sweep: first/last-layer bits, bias correction, AdaRound."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from qreg import config as config_lib
from qreg import data, parallel, ptq, quant, rounding
from qreg.models import BN_EPSILON, MobileNetV2, ResNet18, SmallCNN
from qreg.models.layers import DepthwiseConv
from tests.conftest import jit_init, SHORT_MOBILENETV2_STAGES
from tests.fakes import fake_split

MODEL = SmallCNN(widths=(4, 8, 8), hidden=16)


@pytest.fixture(scope="module")
def folded_and_evaluator():
  splits = {name: {**split, "image": split["image"][..., None]}
            for name, split in (("train", fake_split(64, seed=1)), ("test", fake_split(16, seed=2)))}
  pipeline = data.pipeline_from_arrays("fashion_mnist", splits)
  variables = MODEL.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  stats = jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])
  folded = quant.fold_batch_norm(variables["params"], stats, BN_EPSILON)

  def evaluator(**setup_fields):
    setup = ptq.QuantSetup(num_calibration_batches=4, **setup_fields)
    return ptq.SweepEvaluator(MODEL, pipeline, parallel.make_mesh(), setup, batch_size=16)

  return folded, evaluator


def test_kernel_call_order_and_first_last_rules():
  order = ptq.kernel_call_order(MODEL, (28, 28, 1))
  assert order == ["conv1/conv/kernel", "conv2/conv/kernel", "conv3/conv/kernel",
                   "fc1/dense/kernel", "head/kernel"]
  quant_config = config_lib.base_config().quant  # the defaults, with first/last at 8 bits
  quant_config.first_last_bits = 8
  setup = ptq.build_quant_setup(quant_config, order)
  assert [quant.weight_bits_for(tuple(p.split("/")), 3, setup.weight_rules) for p in order] == [
      8, 3, 3, 3, 8]


def layer_outputs(params, images, model=MODEL):
  """{layer path: output} of every conv/dense layer, by flax's capture_intermediates."""
  _, state = model.clone(folded=True).apply(
      {"params": params}, images, train=False,
      capture_intermediates=lambda module, name: isinstance(module, (nn.Conv, nn.Dense,
                                                                    DepthwiseConv)))
  flat = jax.tree_util.tree_leaves_with_path(state["intermediates"])
  return {"/".join(quant.path_names(path)[:-2]): out for path, out in flat}


def test_bias_correction_removes_every_layers_mean_output_shift(folded_and_evaluator):
  folded, evaluator = folded_and_evaluator
  plain = evaluator()
  corrected = evaluator(bias_correction=True)
  images = corrected.calibration_images()
  float_out = layer_outputs(folded, images)
  for ev, small in ((plain, False), (corrected, True)):
    qparams, _ = ev.quantized_weights(folded, 3)
    quant_out = layer_outputs(qparams, images)
    for layer in float_out:
      diff = np.asarray(quant_out[layer] - float_out[layer], np.float64)
      channels = diff.shape[-1]
      shift = [np.mean(diff[..., c]) for c in range(channels)]  # a naive loop over channels
      scale = np.abs(np.asarray(float_out[layer])).mean()
      if small:
        assert np.max(np.abs(shift)) < 1e-4 * max(scale, 1.0), layer
      elif layer == "conv2/conv":
        assert np.max(np.abs(shift)) > 1e-3 * scale  # there was a shift to remove


def test_adaround_reconstructs_each_layer_better_than_nearest_rounding(folded_and_evaluator):
  """Each layer, on its inputs in the model quantized so far: AdaRound's output error is at most
  nearest rounding's, and below it somewhere; its codes are floor or ceil of w/s, not all
  nearest."""
  folded, evaluator = folded_and_evaluator
  nearest, _ = evaluator(per_channel=True).quantized_weights(folded, 3)
  ev = evaluator(adaround=True, adaround_iterations=200, adaround_examples=32, per_channel=True)
  rounded, times = ev.quantized_weights(folded, 3)
  assert times["adaround_seconds"] > 0
  images = ev.calibration_images()[:32]
  errors, changed = {}, 0
  for path in ptq.kernel_call_order(MODEL, (28, 28, 1)):
    keys = path.split("/")
    layer = "/".join(keys[:-1])
    w = np.asarray(quant.subtree(folded, keys))
    scale = np.asarray(quant.quantize_to_integers(w, 3, "symmetric", channel_axis=-1).scale)
    codes = np.round(np.asarray(quant.subtree(rounded, keys)) / scale)
    nearest_codes = np.round(np.asarray(quant.subtree(nearest, keys)) / scale)
    ratio = w / scale  # the slack: XLA's and numpy's divisions may differ by an ulp
    assert np.all((codes >= np.floor(ratio - 1e-5)) & (codes <= np.ceil(ratio + 1e-5))), path
    changed += int(np.sum(codes != nearest_codes))
    # The layer's output with the float, AdaRound and nearest kernels, the layers before it
    # as AdaRound left them (what it reconstructs).
    outputs = {name: np.asarray(layer_outputs(quant.replace_leaf(rounded, keys, kernel),
                                              images)[layer], np.float64)
               for name, kernel in (("float", w), ("adaround", quant.subtree(rounded, keys)),
                                    ("nearest", quant.subtree(nearest, keys)))}
    errors[layer] = [np.sum(np.square(outputs[name] - outputs["float"])) / len(images)
                     for name in ("adaround", "nearest")]
  assert changed > 0
  assert all(ada <= near * (1 + 1e-5) for ada, near in errors.values()), errors
  assert any(ada < 0.9 * near for ada, near in errors.values()), errors


def test_bias_correction_at_several_bit_widths_at_once_equals_one_at_a_time(folded_and_evaluator):
  folded, evaluator = folded_and_evaluator
  order = ptq.kernel_call_order(MODEL, (28, 28, 1))
  rules = (quant.WeightRule(order[0], 8), quant.WeightRule(order[-1], None))  # last left float
  ev = evaluator(bias_correction=True, weight_rules=rules)
  together = ev.quantized_weights_at(folded, [3, None, 8, 3, 2])
  assert list(together) == [3, None, 8, 2]
  for bits, (qparams, times) in together.items():
    alone, alone_times = ev.quantized_weights(folded, bits)
    jax.tree.map(np.testing.assert_array_equal, qparams, alone)
    assert set(times) == set(alone_times) == ({"bias_correction_seconds"} if bits else set())
  assert not np.array_equal(quant.subtree(together[3][0], ("conv2", "conv", "bias")),
                            quant.subtree(ev.setup.quantize_weights(folded, 3), ("conv2", "conv", "bias")))


# The sweep's calibration options and first/last rules on the residual networks, end to end:
# calibration samples -> ranges -> accuracy, against the same steps written out here.
RESIDUAL_MODELS = {
    "resnet18": ResNet18(num_classes=10, widths=(4, 4, 8, 8), blocks_per_stage=1),
    "mobilenetv2": MobileNetV2(num_classes=10, width_multiplier=0.25,
                stages=SHORT_MOBILENETV2_STAGES),
}


def _residual_pipeline_and_folded(model):
  rng = np.random.default_rng(0)
  splits = {name: {"image": rng.normal(size=(n, 28, 28, 1)).astype(np.float32),
                   "label": rng.integers(0, 10, n).astype(np.int32)}
            for name, n in (("train", 32), ("test", 16))}
  pipeline = data.pipeline_from_arrays("fashion_mnist", splits)
  variables = jit_init(model, (1, 28, 28, 1))
  stats = jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])
  return pipeline, splits, quant.fold_batch_norm(variables["params"], stats, BN_EPSILON)


def layers(model):
  """The model's kernel layers (module paths) in call order."""
  return tuple(tuple(path.split("/")[:-1]) for path in ptq.kernel_call_order(model, (28, 28, 1)))


def test_each_layers_pass_reads_the_earlier_layers_that_reach_it():
  """The inputs a layer's bias-correction pass keeps from earlier layers: the layer before on a
  plain stack; on a residual network, the block input's layers too, across the shortcut."""
  small = layers(MODEL)
  assert ptq._layer_reads(MODEL.clone(folded=True), (28, 28, 1), small) == (
      (), *((layer,) for layer in small[:-1]))
  resnet = RESIDUAL_MODELS["resnet18"]
  reads = dict(zip(layers(resnet), ptq._layer_reads(resnet.clone(folded=True), (28, 28, 1),
                                                     layers(resnet))))
  assert reads[("stage1_block1", "conv2", "conv")] == (("stage1_block1", "conv1", "conv"),)
  # stage1's identity shortcut: the block's output is its conv2 plus the stem's output.
  assert reads[("stage2_block1", "conv1", "conv")] == (("stage1_block1", "conv2", "conv"),
                                                       ("stem", "conv"))
  assert reads[("head",)] == (("stage4_block1", "conv2", "conv"),
                              ("stage4_block1", "shortcut", "conv"))


def test_bias_correction_equals_the_definition_run_on_the_whole_model():
  """Each layer's correction, in call order, is the mean output shift of that layer in the whole
  quantized model with every earlier layer already corrected (flax's capture_intermediates on
  all calibration images at once, float64 means): what the sweep's one-layer passes on kept
  inputs must give. MobileNetV2: depthwise layers, and shortcuts chained over several blocks."""
  model = RESIDUAL_MODELS["mobilenetv2"]
  pipeline, _, folded = _residual_pipeline_and_folded(model)
  setup = ptq.QuantSetup(bias_correction=True, per_channel=True, num_calibration_batches=2)
  ev = ptq.SweepEvaluator(model, pipeline, parallel.make_mesh(), setup, batch_size=16)
  got = ev.quantized_weights_at(folded, [3, 5])
  images = ev.calibration_images()
  outputs = jax.jit(lambda params: layer_outputs(params, images, model))
  float_out = outputs(folded)

  def corrected(bits, propagate):
    """Every layer's bias less its mean output shift, in call order, measured with the earlier
    layers corrected (propagate) or all uncorrected."""
    params = plain = setup.quantize_weights(folded, bits)
    for layer in layers(model):
      out = outputs(params if propagate else plain)["/".join(layer)]
      diff = np.asarray(out, np.float64) - np.asarray(float_out["/".join(layer)], np.float64)
      bias = quant.subtree(params, layer + ("bias",))
      shift = diff.mean(axis=tuple(range(diff.ndim - 1)))
      params = quant.replace_leaf(params, layer + ("bias",), (bias - shift).astype(bias.dtype))
    return params

  for bits in (3, 5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got[bits][0], corrected(bits, propagate=True))
    # The earlier corrections change the later ones by more than the tolerance.
    far = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got[bits][0],
                       corrected(bits, propagate=False))
    assert max(jax.tree.leaves(far)) > 1e-3, far


class _SharedLayerNet(nn.Module):
  """A dense layer applied twice (shared weights) between two others."""
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    shared = nn.Dense(8, name="shared")
    x = nn.relu(nn.Dense(8, name="first")(x.reshape((x.shape[0], -1))))
    x = nn.relu(shared(nn.relu(shared(x))))
    return nn.Dense(10, name="head")(x)


def test_a_layer_called_twice_is_corrected_from_the_whole_prefix():
  """A shared layer has no one input to keep: its passes and the later ones run it from the
  layers before it, and the corrections equal the whole-prefix passes, layer by layer."""
  model = _SharedLayerNet()
  order = layers(model)
  assert order == (("first",), ("shared",), ("head",))
  assert ptq._layer_reads(model.clone(folded=True), (28, 28, 1), order) == (
      (), (("first",),), (("first",),))
  pipeline, _, _ = _residual_pipeline_and_folded(RESIDUAL_MODELS["resnet18"])
  params = jit_init(model, (1, 28, 28, 1))["params"]
  setup = ptq.QuantSetup(bias_correction=True, num_calibration_batches=2)
  ev = ptq.SweepEvaluator(model, pipeline, parallel.make_mesh(), setup, batch_size=16)
  got, _ = ev.quantized_weights(params, 3)
  images, folded_model = ev.calibration_images(), model.clone(folded=True)
  outputs = lambda p, layer: np.concatenate([
      ptq._capture_layer_jit(folded_model, p, images[i:i + 16], layer)[1]
      for i in range(0, len(images), 16)])
  expected = setup.quantize_weights(params, 3)
  for layer in order:
    shift = rounding.bias_correction(outputs(params, layer), outputs(expected, layer))
    expected = quant.replace_leaf(expected, layer + ("bias",),
                                  quant.subtree(expected, layer + ("bias",)) - shift)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               got, expected)


@pytest.mark.parametrize("name,calibration", [("resnet18", "mse"), ("mobilenetv2", "percentile")])
def test_the_sweep_calibrates_every_tap_by_its_method_and_scheme(name, calibration):
  model = RESIDUAL_MODELS[name]
  pipeline, _, folded = _residual_pipeline_and_folded(model)
  setup = ptq.QuantSetup(calibration=calibration, percentile=99.0, num_calibration_batches=2)
  evaluator = ptq.SweepEvaluator(model, pipeline, parallel.make_mesh(), setup, batch_size=16)
  qparams = setup.quantize_weights(folded, 4)
  ranges = evaluator.activation_ranges(qparams, 4)
  # By hand: each tap's activations on each calibration batch (16 images), sampled as the tap
  # samples them (4,096 evenly strided values and the exact extremes), its scheme from the model.
  capture = jax.jit(lambda images: model.clone(folded=True).apply(
      {"params": qparams}, images, train=False, capture_intermediates=True,
      mutable=["intermediates"])[1])
  states = [capture(batch["image"])
            for batch in pipeline.eval_batches(16, split="train", num_batches=2)]
  schemes = ptq.model_tap_schemes(model, setup, (28, 28, 1))
  if name == "mobilenetv2":
    assert schemes["stage3_block2/residual_act"] == "symmetric"
    assert schemes["stage3_block2/project_act"] == "symmetric"
    assert schemes["stage3_block2/depthwise_act"] == "asymmetric"
  flat_ranges = {"/".join(quant.path_names(p)[:-1]): leaf for p, leaf in
                 jax.tree_util.tree_leaves_with_path(ranges) if quant.path_names(p)[-1] == "min"}
  assert set(flat_ranges) == set(schemes)
  for tap, scheme in schemes.items():
    values = []
    for state in states:
      node = state["intermediates"]
      for key in tap.split("/"):
        node = node[key]
      flat = np.asarray(node["__call__"][0]).reshape(-1)
      stride = max(1, flat.size // 4096)
      values += [flat[::stride][:4096], [flat.min(), flat.max()]]
    values = np.concatenate(values)
    low, high = quant.calibrate_range(values, calibration, 4, scheme, 99.0)
    got = ranges
    for key in tap.split("/"):
      got = got[key]
    np.testing.assert_allclose([got["min"], got["max"]], [low, high], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,first,last", [
    ("resnet18", "stem/conv/kernel", "head/kernel"),
    ("mobilenetv2", "stem/conv/kernel", "head/kernel")])
def test_first_last_bits_pick_the_first_and_last_kernel_in_call_order(name, first, last):
  model = RESIDUAL_MODELS[name]
  order = ptq.kernel_call_order(model, (28, 28, 1))
  assert (order[0], order[-1]) == (first, last)
  # ResNet-18's projection shortcuts run after their block's conv2; MobileNetV2's last conv
  # before the head: neither is an end.
  assert "stage2_block1/shortcut/conv/kernel" in order or name == "mobilenetv2"
  config = config_lib.base_config()
  config.quant.first_last_bits = 8
  setup = ptq.build_quant_setup(config.quant, order)
  _, _, folded = _residual_pipeline_and_folded(model)
  integers = setup.weight_integers(folded, 3)
  bits = {"/".join(quant.path_names(p)): leaf.bits for p, leaf in
          jax.tree_util.tree_leaves_with_path(integers, is_leaf=lambda x: isinstance(
              x, quant.Quantized)) if isinstance(leaf, quant.Quantized)}
  assert {p for p, b in bits.items() if b == 8} == {first, last}
  assert all(b == 3 for p, b in bits.items() if p not in (first, last))
