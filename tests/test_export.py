"""Integer export: bit packing, bit-identical round trips, file sizes, and evaluation from the file."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zipfile

from numpy.lib.stride_tricks import sliding_window_view

from qreg import evaluate, export, integer_file, ptq, quant, report
from qreg.models import BN_EPSILON, SmallCNN
from tests.conftest import jit_init, SHORT_MOBILENETV2_STAGES
from tests.fakes import FASHION_MNIST_MEAN_STD, NUM_TEST, fake_split, write_idx_dir


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_unpack_round_trip(bits):
  values = np.random.default_rng(bits).integers(0, 2**bits, size=1001)
  packed = integer_file.pack_bits(values, bits)
  assert packed.dtype == np.uint8 and packed.size == -(-values.size * bits // 8)
  np.testing.assert_array_equal(integer_file.unpack_bits(packed, bits, values.size), values)


def test_four_bit_packing_is_two_values_per_byte_low_nibble_first():
  values = np.array([1, 2, 15, 0, 7])
  expected = [1 | 2 << 4, 15 | 0 << 4, 7]
  np.testing.assert_array_equal(integer_file.pack_bits(values, 4), expected)


def test_pack_rejects_values_that_do_not_fit():
  with pytest.raises(ValueError, match="does not fit in 3 bits"):
    integer_file.pack_bits(np.array([8]), 3)


def _export_arrays(folded, bits, setup):
  return integer_file.export_arrays(setup.weight_integers(folded, bits),
                                    quantization=setup.describe(), weight_bits=bits)


@pytest.fixture(scope="module")
def folded():
  model = SmallCNN(widths=(8, 16, 16), hidden=32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
  return quant.fold_batch_norm(variables["params"], stats, BN_EPSILON)


PER_TENSOR, PER_CHANNEL = ptq.QuantSetup(), ptq.QuantSetup(per_channel=True)
ASYMMETRIC = ptq.QuantSetup(weight_scheme="asymmetric", per_channel=True)
RULES = ptq.QuantSetup(weight_rules=quant.parse_weight_rules(["conv1/.*=8", "head/.*=float"]))


# Each setup at two bit-widths, each bit-width (odd, a nibble, 6, a byte) under two setups.
@pytest.mark.parametrize("setup,bits", [(PER_TENSOR, 3), (PER_TENSOR, 8), (PER_CHANNEL, 4),
                                        (PER_CHANNEL, 6), (ASYMMETRIC, 3), (ASYMMETRIC, 8),
                                        (RULES, 4), (RULES, 6)])
def test_export_round_trip_is_bit_identical_to_fake_quantization(tmp_path, folded, setup, bits):
  path = str(tmp_path / "model.npz")
  integer_file.save(path, _export_arrays(folded, bits, setup))
  loaded, ranges, header = integer_file.load(path)
  assert ranges is None
  assert header["weight_bits"] == bits
  expected = setup.quantize_weights(folded, bits)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_export_size_is_close_to_bits_over_32(tmp_path, folded, bits):
  path = str(tmp_path / "model.npz")
  integer_file.save(path, _export_arrays(folded, bits, ptq.QuantSetup()))
  float_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(folded))
  kernel_bytes = sum(np.asarray(leaf).nbytes for path_, leaf in jax.tree_util.tree_leaves_with_path(folded)
                     if quant.is_kernel(quant.path_names(path_), leaf))
  # Packed kernels are bits/32 of their float size; biases stay float; the container adds headers.
  ideal = kernel_bytes * bits / 32 + (float_bytes - kernel_bytes)
  assert ideal <= os.path.getsize(path) <= ideal + 8192


def test_load_rejects_a_file_that_is_not_an_export(tmp_path):
  path = tmp_path / "junk.npz"
  path.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="not a readable qreg export"):
    integer_file.load(str(path))


def read_export(path):
  """The export file read from README's specification alone (numpy, zipfile and json):
  ({layer path: float array}, {tap point: (scale, zero_point, qmin, qmax)})."""
  with zipfile.ZipFile(path) as archive:
    def array(name):
      with archive.open(name + ".npy") as f:
        return np.lib.format.read_array(f)
    index = json.loads(array("index.json").tobytes().decode("utf-8"))
    weights = {}
    for name, entry in index["leaves"].items():
      if entry["kind"] == "float":
        weights[name] = array(name)
        continue
      count, bits = int(np.prod(entry["shape"])), entry["bits"]
      stream = np.unpackbits(array(f"{name}:codes"), bitorder="little")[:count * bits]
      stored = stream.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits))
      codes = stored.reshape(entry["shape"]) + entry["offset"]
      weights[name] = ((codes - array(f"{name}:zero_point")) * array(f"{name}:scale")
                       ).astype(np.float32)
    activations = {}
    for name, entry in index["activations"].items():
      qmin, qmax = ((0, 2**entry["bits"] - 1) if entry["scheme"] == "asymmetric" else
                    (-(2**(entry["bits"] - 1) - 1), 2**(entry["bits"] - 1) - 1))
      activations[name] = (array(f"{name}:scale"), array(f"{name}:zero_point"), qmin, qmax)
  return weights, activations


def numpy_small_cnn(weights, activations, images):
  """SmallCNN's folded forward pass (3x3 SAME convs, ReLU, 2x2 max-pools after the first two,
  dense, ReLU, dense head) with activations quantized after each ReLU, in numpy."""
  def quantize(x, point):
    scale, zero_point, qmin, qmax = activations[point]
    return (np.clip(np.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

  x = images
  for i, pool in zip((1, 2, 3), (True, True, False)):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # [N, H, W, C, 3, 3]
    x = np.einsum("nhwcij,ijco->nhwo", windows, weights[f"conv{i}/conv/kernel"])
    x = quantize(np.maximum(x + weights[f"conv{i}/conv/bias"], 0), f"act{i}")
    if pool:
      n, h, w, c = x.shape
      x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  x = x.reshape(len(x), -1) @ weights["fc1/dense/kernel"] + weights["fc1/dense/bias"]
  x = quantize(np.maximum(x, 0), "act4")
  return x @ weights["head/kernel"] + weights["head/bias"]


def test_evaluating_the_file_gives_the_sweeps_accuracy(reference_run, reference_copy, tmp_path):
  reference_config, _, results = reference_run
  config, workdir = copy.deepcopy(reference_config), reference_copy
  sweep = {(r["weight_bits"], r["act_bits"]): r["accuracy"] for r in results["rows"]}

  weights_only = str(tmp_path / "w4.npz")
  sizes = export.export_workdir(workdir, 4, weights_only)
  assert sizes["export_bytes"] < sizes["float_params_bytes"] * (4 / 32 + 0.03)
  from_file = evaluate.evaluate_export(config, workdir, weights_only)
  assert [(r["weight_bits"], r["act_bits"]) for r in from_file["rows"]] == [(4, 4)]
  assert from_file["rows"][0]["accuracy"] == sweep[(4, 4)]
  with open(os.path.join(workdir, "export_w4_results.json")) as f:
    assert json.load(f)["rows"] == from_file["rows"]

  # With activation ranges the file alone runs the model: no calibration data needed.
  with_ranges = str(tmp_path / "w4a4.npz")
  export.export_workdir(workdir, 4, with_ranges, act_bits=4)
  config.data.data_dir = str(tmp_path / "test_only")
  os.makedirs(config.data.data_dir)
  write_idx_dir(config.data.data_dir, 8, 20)  # another train split: calibrating on it would differ
  assert evaluate.evaluate_export(config, workdir, with_ranges)["rows"][0]["accuracy"] == sweep[(4, 4)]

  # And a reader written from README's specification reproduces the sweep's accuracy.
  weights, activations = read_export(with_ranges)
  mean, std = FASHION_MNIST_MEAN_STD
  test = fake_split(NUM_TEST, seed=2)  # the test split of conftest's idx_dir (write_idx_dir)
  images = ((test["image"][..., None] / 255.0 - mean) / std).astype(np.float32)
  logits = numpy_small_cnn(weights, activations, images)
  accuracy = np.mean(np.argmax(logits, -1) == test["label"])
  assert accuracy == sweep[(4, 4)]


def test_compare_writes_a_table_and_a_plot(tmp_path):
  for name, accuracies in [("a", [0.9, 0.8, 0.5]), ("b", [0.88, 0.86, 0.7])]:
    rows = [{"weight_bits": w, "act_bits": a, "accuracy": acc}
            for (w, a), acc in zip([(None, None), (4, 4), (3, None)], accuracies)]
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "results.json", "w") as f:
      json.dump({"rows": rows}, f)
  table = report.compare([str(tmp_path / "a"), str(tmp_path / "b")], ["no-reg", "l1"],
                         str(tmp_path / "out"))
  assert "| 4 | 4 | 80.00 | 86.00 |" in table
  assert "| 3 | float | 50.00 | 70.00 |" in table
  with open(tmp_path / "out" / "comparison.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(FileNotFoundError, match="results.json"):
    report.compare([str(tmp_path / "missing")], ["x"], str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_the_spec_reader_gets_the_sweeps_weights_and_every_taps_quantizer(name, tmp_path):
  from qreg.models import MobileNetV2, ResNet18  # pylint: disable=g-import-not-at-top
  model = {"resnet18": ResNet18(num_classes=10, widths=(4, 4, 8, 8), blocks_per_stage=1),
           "mobilenetv2": MobileNetV2(num_classes=10, width_multiplier=0.25,
                stages=SHORT_MOBILENETV2_STAGES)}[name]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
  variables = jit_init(model, (1, 28, 28, 1))
  stats = jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])
  folded = quant.fold_batch_norm(variables["params"], stats, BN_EPSILON)
  setup = ptq.QuantSetup(per_channel=True)
  qparams = setup.quantize_weights(folded, 4)
  samples = ptq._activation_samples(  # pylint: disable=protected-access
      model.clone(folded=True, act_scheme=setup.act_scheme).apply, {"params": qparams}, images)
  ranges = ptq.activation_ranges(samples, 4, setup)
  schemes = ptq.tap_schemes(samples, setup)
  path = str(tmp_path / "model.npz")
  integer_file.save(path, integer_file.export_arrays(
      setup.weight_integers(folded, 4), quantization=setup.describe(), weight_bits=4, act_bits=4,
      act_schemes=schemes, activation_ranges=ranges))
  weights, activations = read_export(path)
  flat = {"/".join(quant.path_names(p)): np.asarray(leaf)
          for p, leaf in jax.tree_util.tree_leaves_with_path(qparams)}
  assert set(weights) == set(flat)
  for leaf, value in flat.items():
    np.testing.assert_array_equal(weights[leaf], value)
  if name == "mobilenetv2":
    assert schemes["stage3_block2/residual_act"] == "symmetric"  # a signed tap
  assert set(activations) == set(schemes)
  for tap, (scale, zero_point, qmin, qmax) in activations.items():
    point, bounds = samples, ranges
    for key in tap.split("/"):
      point, bounds = point[key], bounds[key]
    x = np.asarray(point["samples"])
    from_spec = (np.clip(np.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale
    sweep = quant.quantize_activation(jnp.asarray(x), bounds["min"], bounds["max"], 4,
                                      schemes[tap])
    np.testing.assert_array_equal(from_spec.astype(np.float32), np.asarray(sweep))
