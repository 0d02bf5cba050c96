"""ONNX export (qreg.onnx_export): onnxruntime on the exported QDQ graph against qreg's own
fake-quantized model and the sweep."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qreg import checkpoint, data, export, integer_file, onnx_export, ptq, quant
from qreg import config as config_lib
from qreg.models import BN_EPSILON, MobileNetV2, ResNet18, SmallCNN
from tests.conftest import jit_init, SHORT_MOBILENETV2_STAGES

MODELS_SMALL_CNN = SmallCNN(num_classes=5, widths=(4, 8), pool_after=(True, True), hidden=8)


def run_onnx(path_or_model, images: np.ndarray, optimize: bool = True) -> np.ndarray:
  """onnxruntime's output; optimize=False runs the graph as written (no QDQ fusion into
  integer kernels)."""
  model = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
  options = ort.SessionOptions()
  if not optimize:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
  return session.run(None, {"images": np.asarray(images, np.float32)})[0]


def test_a_4_bit_small_cnn_in_onnxruntime_gets_the_sweeps_predictions(reference_copy, tmp_path):
  # The graph as written (no graph optimization) computes the sweep's model: every tap's codes
  # equal, the logits within float32 summation order, the same predictions and accuracy.
  # onnxruntime's default optimizations fuse the QDQ pairs into integer kernels whose
  # requantization rounds differently (some codes land one step apart); they may move a
  # prediction, and are checked loosely.
  path = str(tmp_path / "model.onnx")
  export.export_workdir(reference_copy, 4, path, act_bits=4, file_format="onnx")
  graph = onnx.load(path)
  ops = [node.op_type for node in graph.graph.node]
  assert ops.count("QuantizeLinear") == 4  # one per tap: act1..act4
  assert ops.count("DequantizeLinear") == 4 + 5  # the taps, and the five kernels
  config = checkpoint.read_run_config(reference_copy)
  pipeline = data.build_input_pipeline(config.data)
  images, labels = [], []
  for batch in pipeline.eval_batches(config.eval.batch_size, split="test"):
    real = batch["mask"] > 0  # the last batch is padded
    images.append(batch["image"][real])
    labels.append(batch["label"][real])
  images, labels = np.concatenate(images), np.concatenate(labels)
  outputs = run_onnx(path, images, optimize=False)
  predictions = outputs.argmax(-1)
  with open(os.path.join(reference_copy, "results.json")) as f:
    sweep = {(r["weight_bits"], r["act_bits"]): r["accuracy"] for r in json.load(f)["rows"]}
  assert float(np.mean(predictions == labels)) == sweep[4, 4]
  run = checkpoint.load_run(reference_copy)
  setup = ptq.sweep_setup(config, run.model, pipeline.info.image_shape)
  qparams = setup.quantize_weights(ptq.fold(run.variables["params"],
                                            run.variables["batch_stats"]), 4)
  evaluator = ptq.SweepEvaluator(run.model, pipeline, ptq.parallel.make_mesh(), setup,
                                 config.eval.batch_size)
  logits = run.model.clone(folded=True, act_bits=4, act_scheme=setup.act_scheme).apply(
      {"params": qparams, "activation_ranges": evaluator.activation_ranges(qparams, 4)}, images,
      train=False)
  np.testing.assert_array_equal(predictions, np.asarray(logits).argmax(-1))
  np.testing.assert_allclose(outputs, logits, rtol=1e-5, atol=1e-5)
  fused = run_onnx(path, images).argmax(-1)
  assert int(np.sum(fused != predictions)) <= 3


def test_a_mixed_precision_budget_exports_the_sweeps_bits_and_accuracy(reference_copy, tmp_path):
  config = checkpoint.read_run_config(reference_copy)
  config.quant.bit_settings = ()
  config.quant.bit_budgets = (3.0,)
  # conv1 fixed at 8 bits: the other kernels cannot all take 3, so the widths differ.
  config.quant.weight_rules = ("conv1/.*=8",)
  checkpoint.write_run_config(config, reference_copy)  # what the export reads
  run = checkpoint.load_run(reference_copy, config)
  pipeline = data.build_input_pipeline(config.data)
  setup = ptq.sweep_setup(config, run.model, pipeline.info.image_shape)
  [row] = [row for kind, row in ptq.sweep(config, setup, run.model, run.variables["params"],
                                          run.variables["batch_stats"], pipeline,
                                          ptq.parallel.make_mesh()) if kind == "mixed"]
  assert row["average_bits"] <= 3.0 and row["layer_bits"]["conv1/conv/kernel"] == 8
  assert min(row["layer_bits"].values()) < 3
  npz, graph = str(tmp_path / "model.npz"), str(tmp_path / "model.onnx")
  export.export_workdir(reference_copy, None, npz, act_bits=8, bit_budget=3.0)
  export.export_workdir(reference_copy, None, graph, act_bits=8, file_format="onnx",
                        bit_budget=3.0)
  header = integer_file.load(npz)[2]
  assert header["bit_budget"] == 3.0
  assert {p: e["bits"] for p, e in header["leaves"].items() if e["kind"] == "quantized"} == (
      row["layer_bits"])
  images, labels = [], []
  for batch in pipeline.eval_batches(config.eval.batch_size, split="test"):
    images.append(batch["image"][batch["mask"] > 0])
    labels.append(batch["label"][batch["mask"] > 0])
  predictions = run_onnx(graph, np.concatenate(images), optimize=False).argmax(-1)
  assert float(np.mean(predictions == np.concatenate(labels))) == row["accuracy"]


def _dyadic(model, shape, bits, seed=0):
  """Folded params, images and tap ranges whose every value, product and sum is exact in
  float32: integer codes with power-of-two scales. Any order of summation then gives the same
  numbers, so onnxruntime and XLA must agree bit for bit."""
  rng = np.random.default_rng(seed)
  variables = jit_init(model, shape, seed)
  folded = quant.fold_batch_norm(variables["params"], variables["batch_stats"], BN_EPSILON)
  qmax = 2 ** (bits - 1) - 1

  def dyadic(path, leaf):
    if path[-1].key == "kernel":
      codes = rng.integers(-qmax, qmax + 1, leaf.shape)
      codes.reshape(-1, leaf.shape[-1])[0] = qmax  # absmax = qmax / 8 in every channel
      return jnp.asarray(codes / 8.0, jnp.float32)
    return jnp.asarray(rng.integers(-8, 9, leaf.shape) / 4.0, jnp.float32)

  folded = jax.tree_util.tree_map_with_path(dyadic, folded)
  images = jnp.asarray(rng.integers(-4, 5, (32, *shape[1:])) / 4.0, jnp.float32)
  return folded, images


@pytest.mark.parametrize("name,model,bits,per_channel", [
    ("small_cnn", MODELS_SMALL_CNN, 4, False),
    ("resnet18", ResNet18(num_classes=5, widths=(4, 4, 8, 8), blocks_per_stage=1), 8, True),
    ("mobilenetv2", MobileNetV2(num_classes=5, width_multiplier=0.25,
                stages=SHORT_MOBILENETV2_STAGES), 4, True),
])
def test_the_qdq_graph_computes_the_sweeps_quantized_model_exactly(name, model, bits,
                                                                    per_channel):
  del name
  shape = (1, 16, 16, 1 if isinstance(model, type(MODELS_SMALL_CNN)) else 3)
  folded, images = _dyadic(model, shape, bits)
  base = config_lib.base_config()
  base.quant.per_channel = per_channel
  setup = ptq.build_quant_setup(base.quant)
  qparams = setup.quantize_weights(folded, bits)
  samples = ptq._activation_samples(  # pylint: disable=protected-access
      model.clone(folded=True, act_scheme=setup.act_scheme).apply, {"params": qparams}, images)
  schemes = ptq.tap_schemes(samples, setup)
  # Power-of-two ranges: every tap's scale and zero point are exact too.
  ranges = jax.tree_util.tree_map_with_path(
      lambda path, _: _power_of_two_range(bits, schemes["/".join(quant.path_names(path))]),
      samples, is_leaf=lambda x: isinstance(x, dict) and "samples" in x)
  graph = onnx_export.build(model, setup.weight_integers(folded, bits), shape[1:], bits, ranges,
                            schemes)
  apply = jax.jit(functools.partial(
      model.clone(folded=True, act_bits=bits, act_scheme=setup.act_scheme).apply, train=False))
  expected = np.asarray(apply({"params": qparams, "activation_ranges": ranges}, images))
  np.testing.assert_array_equal(run_onnx(graph, images, optimize=False), expected)
  if bits <= 4:  # int4 initializers: the same outputs from half the weight bytes
    packed = onnx_export.build(model, setup.weight_integers(folded, bits), shape[1:], bits,
                               ranges, schemes, int4=True)
    kernels = [t for t in packed.graph.initializer if "/codes" in t.name]
    assert kernels and all(t.data_type == onnx.TensorProto.INT4 for t in kernels)
    assert packed.ByteSize() < graph.ByteSize()
    np.testing.assert_array_equal(run_onnx(packed, images, optimize=False), expected)


def test_asymmetric_kernels_in_uint4_give_the_uint8_graphs_outputs():
  shape = (1, 16, 16, 1)
  folded, images = _dyadic(MODELS_SMALL_CNN, shape, 4)
  base = config_lib.base_config()
  base.quant.weight_scheme = "asymmetric"
  integers = ptq.build_quant_setup(base.quant).weight_integers(folded, 3)
  graphs = [onnx_export.build(MODELS_SMALL_CNN, integers, shape[1:], None, None, {}, int4=int4)
            for int4 in (False, True)]
  assert {t.data_type for t in graphs[1].graph.initializer if "/codes" in t.name} == {
      onnx.TensorProto.UINT4}
  np.testing.assert_array_equal(run_onnx(graphs[1], images, optimize=False),
                                run_onnx(graphs[0], images, optimize=False))


def _power_of_two_range(bits, scheme):
  if scheme == "symmetric":  # scale 1/4
    return {"min": jnp.float32(-(2 ** (bits - 1) - 1) / 4), "max": jnp.float32((2 ** (bits - 1) - 1) / 4)}
  return {"min": jnp.float32(0.0), "max": jnp.float32((2 ** bits - 1) / 4)}  # scale 1/4


def _random_folded(model, shape, seed=0):
  rng = np.random.default_rng(seed)
  variables = jit_init(model, shape, seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v + (0.1 * rng.normal(size=v.shape) if path[-1].key in ("bias", "scale")
                           else 0), variables["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape) if path[-1].key == "var"
                                  else 0.1 * rng.normal(size=v.shape), jnp.float32),
      variables["batch_stats"])
  return quant.fold_batch_norm(params, stats, BN_EPSILON), jnp.asarray(
      rng.normal(size=(64, *shape[1:])), jnp.float32)


@pytest.mark.parametrize("name,model,bits,per_channel", [
    ("resnet18_imagenet_stem", ResNet18(num_classes=5, stem="imagenet", widths=(8, 8, 16, 16), blocks_per_stage=1), 4,
     True),
    ("mobilenetv2", MobileNetV2(num_classes=5, width_multiplier=0.25,
                stages=SHORT_MOBILENETV2_STAGES), 8, True),
])
def test_residual_networks_match_qregs_quantized_model(name, model, bits, per_channel):
  del name
  folded, images = _random_folded(model, (1, 16, 16, 3))
  base = config_lib.base_config()
  base.quant.per_channel = per_channel
  setup = ptq.build_quant_setup(base.quant)
  qparams = setup.quantize_weights(folded, bits)
  apply = model.clone(folded=True, act_bits=bits, act_scheme=setup.act_scheme).apply
  samples = ptq._activation_samples(  # pylint: disable=protected-access
      model.clone(folded=True, act_scheme=setup.act_scheme).apply, {"params": qparams}, images)
  ranges = ptq.activation_ranges(samples, bits, setup)
  schemes = ptq.tap_schemes(samples, setup)
  if isinstance(model, MobileNetV2):
    assert schemes["stage3_block2/residual_act"] == "symmetric"  # a signed tap
    assert schemes["stage3_block2/expand_act"] == "asymmetric"
  graph = onnx_export.build(model, setup.weight_integers(folded, bits), (16, 16, 3), bits, ranges,
                            schemes)
  expected = np.asarray(jax.jit(functools.partial(apply, train=False))(
      {"params": qparams, "activation_ranges": ranges}, images))
  got = run_onnx(graph, images, optimize=False)
  differing = int(np.sum(got.argmax(-1) != expected.argmax(-1)))
  assert differing == 0, f"{differing} of {len(images)} predictions differ"
  # Float summation order may put a value on the other side of a grid's half-way mark, one
  # code apart (MobileNetV2's ~50 random layers: a few examples); the dyadic test shows the
  # quantization itself is exact.
  np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


def test_unknown_models_and_formats_are_refused(reference_copy, tmp_path):
  with pytest.raises(ValueError, match="--format='tflite'"):
    export.export_workdir(reference_copy, 4, str(tmp_path / "m"), file_format="tflite")
  with pytest.raises(ValueError, match="built-in models"):
    onnx_export.build(object(), {}, (28, 28, 1), None, None, {})
  with pytest.raises(ValueError, match="--int4 is an ONNX container"):
    export.export_workdir(reference_copy, 4, str(tmp_path / "m"), int4=True)
  with pytest.raises(ValueError, match="exactly one of --weight_bits and --bit_budget"):
    export.export_workdir(reference_copy, 4, str(tmp_path / "m"), bit_budget=3.0)
