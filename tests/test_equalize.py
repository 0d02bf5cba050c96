"""Cross-layer equalization and bias absorption (qreg.equalize): the function is unchanged, each
pair's ranges are equal afterwards, and absorption is exact where its ReLU condition holds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qreg import equalize, quant
from qreg.models import BN_EPSILON, MobileNetV2, ResNet18, SmallCNN
from tests.conftest import jit_init, SHORT_MOBILENETV2_STAGES

MODELS = {
    "small_cnn": (SmallCNN(num_classes=3, widths=(3, 4, 5), pool_after=(True, False, True),
                           hidden=6), (4, 12, 12, 1)),
    "resnet18": (ResNet18(num_classes=3, widths=(4, 6, 6, 8), blocks_per_stage=1), (2, 16, 16, 3)),
    "mobilenetv2": (MobileNetV2(num_classes=3, width_multiplier=0.1, relu6=False,
                stages=SHORT_MOBILENETV2_STAGES), (2, 16, 16, 3)),
}


def _folded(model, shape, seed=0):
  """float64 params with per-channel ranges spread over two decades, running statistics."""
  rng = np.random.default_rng(seed)
  variables = jit_init(model, shape, seed)

  def spread(path, leaf):
    leaf = np.asarray(leaf, np.float64)
    if path[-1].key in ("kernel", "scale"):
      leaf = leaf * 10 ** rng.uniform(-1, 1, leaf.shape[-1])
    if path[-1].key == "bias":
      leaf = leaf + rng.normal(size=leaf.shape)
    return jnp.asarray(leaf)

  params = jax.tree_util.tree_map_with_path(spread, variables["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape) if path[-1].key == "var"
                                  else rng.normal(size=v.shape)), variables["batch_stats"])
  images = jnp.asarray(rng.normal(size=shape))
  return params, quant.fold_batch_norm(params, stats, BN_EPSILON), images


@pytest.mark.parametrize("name", sorted(MODELS))
def test_equalization_keeps_the_function_and_equalizes_every_pair(name):
  model, shape = MODELS[name]
  with jax.enable_x64(True):
    params, folded, images = _folded(model, shape)
    apply = jax.jit(lambda p: model.clone(folded=True).apply({"params": p}, images, train=False))
    pairs = equalize.pairs(model, folded)
    assert pairs
    equalized, scales = equalize.equalize_pairs(folded, pairs)
    np.testing.assert_allclose(apply(equalized), apply(folded), rtol=1e-9, atol=1e-12)
    moved = False
    for pair, s in zip(pairs, scales):
      r1 = equalize.output_ranges(np.asarray(quant.subtree(equalized, pair.producer)["kernel"]))
      r2 = equalize.input_ranges(np.asarray(quant.subtree(equalized, pair.consumer)["kernel"]),
                                 pair.consumer_kind, r1.size)
      np.testing.assert_allclose(r1, r2, rtol=1e-6)
      moved |= bool(np.max(np.abs(np.log(s))) > 0.1)
    assert moved  # the ranges were not equal before


def _folded_shapes(model, shape):
  """The folded params' shapes, without computing them."""
  return jax.eval_shape(lambda: (lambda v: quant.fold_batch_norm(
      v["params"], v["batch_stats"], BN_EPSILON))(model.init(jax.random.key(0),
                                                             jnp.zeros(shape), train=False)))


def test_pairs_per_model():
  model, shape = MODELS["small_cnn"]
  folded = _folded_shapes(model, shape)
  assert [(p.producer[0], p.consumer[0], p.consumer_kind) for p in equalize.pairs(model, folded)] \
      == [("conv1", "conv2", "conv"), ("conv2", "conv3", "conv"), ("conv3", "fc1", "flatten_dense"),
          ("fc1", "head", "dense")]
  model, shape = MODELS["resnet18"]
  folded = _folded_shapes(model, shape)
  found = equalize.pairs(model, folded)
  assert len(found) == 4 and all(p.producer[1:] == ("conv1", "conv") for p in found)
  model, shape = MODELS["mobilenetv2"]
  folded = _folded_shapes(model, shape)
  kinds = [p.consumer_kind for p in equalize.pairs(model, folded)]
  # 4 blocks with an expand layer; the first block is residual at this width (8 channels in
  # and out), so the stem does not pair with its depthwise.
  assert kinds.count("depthwise") == 4 and kinds[-1] == "dense"
  with pytest.raises(ValueError, match="built-in models"):
    equalize.pairs(object(), folded)


def test_relu6_is_replaced_for_equalization():
  relu6 = MobileNetV2(num_classes=3, width_multiplier=0.1,
                stages=SHORT_MOBILENETV2_STAGES)
  assert equalize.equalizable_model(relu6).relu6 is False
  assert equalize.equalizable_model(MODELS["small_cnn"][0]) is MODELS["small_cnn"][0]


@pytest.mark.parametrize("kind", ["dense", "conv1x1", "flatten_dense"])
def test_bias_absorption_is_exact_where_the_relu_condition_holds(kind):
  rng = np.random.default_rng(1)
  channels, out = 5, 3
  beta = rng.uniform(1.0, 4.0, channels)
  gamma = rng.uniform(0.1, 0.5, channels)  # c = beta - 3 gamma > 0 on most channels
  if kind == "dense":
    x = rng.normal(size=(2000, 4))
    folded = {"a": {"kernel": rng.normal(size=(4, channels)), "bias": beta},
              "b": {"kernel": rng.normal(size=(channels, out)), "bias": rng.normal(size=out)}}
    forward = lambda p, x: np.maximum(x @ p["a"]["kernel"] + p["a"]["bias"], 0) @ p["b"]["kernel"] \
        + p["b"]["bias"]
    pre = lambda p, x: x @ p["a"]["kernel"] + p["a"]["bias"]
    consumer_kind = equalize.DENSE
  elif kind == "conv1x1":
    x = rng.normal(size=(2000, 2, 2, 4))
    folded = {"a": {"kernel": rng.normal(size=(1, 1, 4, channels)), "bias": beta},
              "b": {"kernel": rng.normal(size=(1, 1, channels, out)), "bias": rng.normal(size=out)}}
    conv = lambda x, k: np.einsum("nhwi,io->nhwo", x, k[0, 0])
    pre = lambda p, x: conv(x, p["a"]["kernel"]) + p["a"]["bias"]
    forward = lambda p, x: conv(np.maximum(pre(p, x), 0), p["b"]["kernel"]) + p["b"]["bias"]
    consumer_kind = equalize.CONV
  else:  # a 2x2 map of 5 channels flattened (NHWC) into a dense layer
    x = rng.normal(size=(2000, 2, 2, 4))
    folded = {"a": {"kernel": rng.normal(size=(1, 1, 4, channels)), "bias": beta},
              "b": {"kernel": rng.normal(size=(4 * channels, out)), "bias": rng.normal(size=out)}}
    pre = lambda p, x: np.einsum("nhwi,io->nhwo", x, p["a"]["kernel"][0, 0]) + p["a"]["bias"]
    forward = lambda p, x: np.maximum(pre(p, x), 0).reshape(len(x), -1) @ p["b"]["kernel"] \
        + p["b"]["bias"]
    consumer_kind = equalize.FLATTEN_DENSE
  # The pre-activation's spread per channel is about gamma, as BatchNorm's output's is.
  folded["a"]["kernel"] = folded["a"]["kernel"] * gamma / 2
  pair = equalize.Pair(("a",), ("b",), consumer_kind)
  absorbed = equalize.absorb_biases(folded, [pair], {("a",): beta}, {("a",): gamma})
  c = np.maximum(0, beta - 3 * gamma)
  assert np.all(c > 0)
  np.testing.assert_allclose(np.asarray(absorbed["a"]["bias"]), beta - c)
  holds = np.all(pre(folded, x) >= c, axis=tuple(range(1, pre(folded, x).ndim)))
  assert 10 < holds.sum() < len(x)  # some inputs fall below c: there it is not exact
  np.testing.assert_allclose(forward(absorbed, x[holds]), forward(folded, x[holds]), rtol=1e-12,
                             atol=1e-13)
  assert not np.allclose(forward(absorbed, x[~holds]), forward(folded, x[~holds]))


def test_absorption_skips_padded_consumers():
  pair = equalize.Pair(("a",), ("b",), equalize.CONV)
  folded = {"a": {"kernel": np.ones((3, 3, 2, 2)), "bias": np.full(2, 5.0)},
            "b": {"kernel": np.ones((3, 3, 2, 2)), "bias": np.zeros(2)}}
  absorbed = equalize.absorb_biases(folded, [pair], {("a",): np.full(2, 5.0)},
                                    {("a",): np.ones(2)})
  np.testing.assert_array_equal(absorbed["a"]["bias"], folded["a"]["bias"])


def test_the_sweep_equalizes_without_changing_the_float_model(reference_copy):
  from experiments import reevaluate  # pylint: disable=g-import-not-at-top
  own = reevaluate.protocol_results(reference_copy, {})
  equalized = reevaluate.protocol_results(reference_copy, {"quant.cross_layer_equalization": True,
                                                           "quant.bias_absorption": True})
  assert "cross-layer equalization, bias absorption" in equalized["quantization"]
  rows = lambda r: {(x["weight_bits"], x["act_bits"]): x["accuracy"] for x in r["rows"]}
  # SmallCNN has ReLUs only: the float model is the same function (bias absorption moves
  # c only where fewer than 0.14% of a BatchNorm's outputs fall below it): the same accuracy.
  assert rows(equalized)[None, None] == rows(own)[None, None]
  assert rows(equalized) != rows(own)  # the quantized ones are not
