"""quant.py against qwix, naive loops and the quantizer's defining properties."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from qreg import quant
from qreg.models import BN_EPSILON, ResNet18, SmallCNN, VGGLike


def naive_symmetric(x: np.ndarray, bits: int) -> np.ndarray:
  """Element by element: round to the nearest multiple of absmax/(2^(b-1)-1)."""
  qmax = 2 ** (bits - 1) - 1
  step = max(abs(v) for v in x.ravel()) / qmax
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape):
    k = min(max(round(float(x[idx]) / step), -qmax), qmax)
    out[idx] = k * step
  return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_per_tensor_matches_naive_loop(bits):
  x = np.random.default_rng(bits).normal(size=(3, 3, 2, 5)).astype(np.float32)
  np.testing.assert_allclose(quant.quantize_symmetric(jnp.asarray(x), bits),
                             naive_symmetric(x, bits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_symmetric_per_channel_matches_naive_loop(bits):
  x = np.random.default_rng(bits).normal(size=(3, 3, 2, 5)).astype(np.float32)
  x[..., 0] *= 10.0  # channels with very different ranges
  expected = np.stack([naive_symmetric(x[..., c], bits) for c in range(x.shape[-1])], -1)
  np.testing.assert_allclose(quant.quantize_symmetric(jnp.asarray(x), bits, channel_axis=-1),
                             expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_error_and_levels(bits):
  x = jax.random.normal(jax.random.key(bits), (4096,))
  q = quant.quantize_symmetric(x, bits)
  step = jnp.max(jnp.abs(x)) / (2 ** (bits - 1) - 1)
  assert float(jnp.max(jnp.abs(q - x))) <= float(step) / 2 * (1 + 1e-5)
  assert len(np.unique(np.asarray(q))) <= 2**bits
  np.testing.assert_array_equal(quant.quantize_symmetric(q, bits), q)  # idempotent


def test_eight_bits_close_to_identity():
  x = jax.random.normal(jax.random.key(0), (1000,))
  q = quant.quantize_symmetric(x, 8)
  assert float(jnp.max(jnp.abs(q - x))) <= float(jnp.max(jnp.abs(x))) / 127 / 2 + 1e-6
  assert float(jnp.linalg.norm(q - x) / jnp.linalg.norm(x)) < 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_error_levels_and_clipping(bits):
  x = jax.random.uniform(jax.random.key(bits), (4096,), minval=-1.0, maxval=3.0)
  low, high = jnp.float32(-0.5), jnp.float32(2.0)
  q = quant.quantize_asymmetric(x, low, high, bits)
  step = (high - low) / (2**bits - 1)
  inside = (x >= low) & (x <= high)
  assert float(jnp.max(jnp.where(inside, jnp.abs(q - x), 0))) <= float(step) / 2 * (1 + 1e-5) + 1e-6
  assert len(np.unique(np.asarray(q))) <= 2**bits
  assert float(q.min()) >= float(low) - float(step) and float(q.max()) <= float(high) + float(step)
  assert float(quant.quantize_asymmetric(jnp.zeros(()), low, high, bits)) == 0.0


def test_asymmetric_unsigned_range_keeps_zero_exact():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (1000,)))
  q = quant.quantize_asymmetric(x, x.min(), x.max(), 4)
  np.testing.assert_array_equal(np.asarray(q)[np.asarray(x) == 0], 0.0)


@pytest.mark.parametrize("bad", [0, 1, 17, 4.0, True, "4"])
def test_bits_out_of_range_rejected(bad):
  with pytest.raises(ValueError, match=r"\[2, 16\]"):
    quant.quantize_params({"kernel": jnp.ones(3)}, bad)


def test_quantize_params_touches_only_kernels():
  params = {"conv": {"kernel": jnp.linspace(-1, 1, 7), "bias": jnp.linspace(-1, 1, 7) / 3}}
  q = quant.quantize_params(params, 3)
  assert not np.array_equal(q["conv"]["kernel"], params["conv"]["kernel"])
  np.testing.assert_array_equal(q["conv"]["bias"], params["conv"]["bias"])


def _with_random_statistics(model, shape, seed=0):
  """Params and BN statistics far from their init values, so folding has work to do."""
  keys = jax.random.split(jax.random.key(seed), 4)
  variables = model.init(keys[0], jnp.zeros(shape), train=False)
  leaves, treedef = jax.tree.flatten(variables["batch_stats"])
  stats = jax.tree.unflatten(treedef, [
      jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0) if leaf.ndim else leaf
      for k, leaf in zip(jax.random.split(keys[1], len(leaves)), leaves)])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: v - 1.2 if quant.path_names(path)[-1] == "mean" else v, stats)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.1 * jax.random.normal(keys[2], v.shape)
      if quant.path_names(path)[-1] in ("scale", "bias") else v, variables["params"])
  return params, stats, jax.random.normal(keys[3], shape)


@pytest.mark.parametrize("model,shape", [
    (SmallCNN(widths=(8, 8), pool_after=(True, False), hidden=16), (2, 28, 28, 1)),
    (VGGLike(widths=(8, 8, 8, 8, 16, 16), hidden=16), (2, 32, 32, 3)),
    (ResNet18(widths=(8, 8, 16, 16), blocks_per_stage=1, stem="cifar"), (2, 32, 32, 3)),
    (ResNet18(widths=(8, 8, 16, 16), blocks_per_stage=1, stem="imagenet"), (2, 64, 64, 3)),
])
def test_fold_batch_norm_preserves_float_outputs(model, shape):
  params, stats, x = _with_random_statistics(model, shape)
  expected = model.apply({"params": params, "batch_stats": stats}, x, train=False)
  folded = quant.fold_batch_norm(params, stats, BN_EPSILON)
  assert "bn" not in str(jax.tree_util.tree_structure(folded))
  got = model.clone(folded=True).apply({"params": folded}, x, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_fold_batch_norm_rejects_bn_without_its_layer():
  with pytest.raises(ValueError, match="sibling layer"):
    quant.fold_batch_norm({"bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}},
                          {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}, 1e-5)


def test_symmetric_quantizer_is_odd():
  # q(-x) = -q(x) for every bit-width and granularity: the grid is symmetric about 0
  x = jnp.linspace(-1, 1, 64).reshape(8, 8)
  for bits, axis in itertools.product([2, 4, 8], [None, -1]):
    q = quant.quantize_symmetric(x, bits, channel_axis=axis)
    np.testing.assert_allclose(quant.quantize_symmetric(-x, bits, channel_axis=axis), -q, atol=1e-7)


@pytest.mark.parametrize("bits,qtype", [(4, "int4"), (8, "int8")])
@pytest.mark.parametrize("per_channel", [False, True])
def test_symmetric_absmax_matches_qwix(bits, qtype, per_channel):
  """qwix spans [-(qmax + 0.5), qmax + 0.5]; scaling its absmax by (qmax + 0.5) / qmax gives
  qreg's restricted grid k * absmax / qmax, whose integers must then agree exactly."""
  x = jax.random.normal(jax.random.key(bits), (3, 3, 8, 16)) * jnp.linspace(0.1, 3.0, 16)
  qmax = 2 ** (bits - 1) - 1
  reference = qwix.quantize(x, qtype, channelwise_axes=(3,) if per_channel else (),
                            calibration_method=f"absmax,{(qmax + 0.5) / qmax!r}")
  ours = quant.quantize_to_integers(x, bits, "symmetric", channel_axis=-1 if per_channel else None)
  np.testing.assert_array_equal(np.asarray(ours.codes), np.asarray(reference.qvalue, np.int32))
  np.testing.assert_allclose(np.asarray(ours.scale).reshape(-1),
                             np.asarray(reference.scale).reshape(-1), rtol=1e-6)


def naive_asymmetric(x: np.ndarray, bits: int) -> np.ndarray:
  """Element by element: integer zero point, 2^b levels spanning [min(x, 0), max(x, 0)]."""
  low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
  step = (high - low) / (2**bits - 1)
  zero = round(-low / step)
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape):
    k = min(max(round(float(x[idx]) / step) + zero, 0), 2**bits - 1)
    out[idx] = (k - zero) * step
  return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_weights_match_naive_loop(bits):
  x = np.random.default_rng(bits).normal(loc=0.3, size=(4, 6)).astype(np.float32)
  got = quant.dequantize(quant.quantize_to_integers(jnp.asarray(x), bits, "asymmetric"))
  np.testing.assert_allclose(got, naive_asymmetric(x, bits), rtol=0, atol=1e-5)
  per_channel = quant.dequantize(quant.quantize_to_integers(jnp.asarray(x), bits, "asymmetric", -1))
  expected = np.stack([naive_asymmetric(x[:, c], bits) for c in range(x.shape[1])], -1)
  np.testing.assert_allclose(per_channel, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
def test_any_bit_width_properties(scheme, bits):
  x = jax.random.normal(jax.random.key(bits), (64, 32)) * jnp.linspace(0.01, 2.0, 32)
  for axis in (None, -1):
    q = quant.quantize_to_integers(x, bits, scheme, axis)
    qmin, qmax = quant.integer_range(bits, scheme)
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    fake = quant.dequantize(q)
    # x lies inside its own range, so the error is at most half a step, element by element.
    step = jnp.broadcast_to(q.scale, x.shape)
    assert bool(jnp.all(jnp.abs(fake - x) <= step / 2 * (1 + 1e-4) + 1e-7))
    if bits <= 12:
      for column in np.asarray(fake).T if axis is not None else [np.asarray(fake)]:
        assert len(np.unique(column)) <= 2**bits
    # Idempotent: the quantized tensor is already on its own grid.
    np.testing.assert_allclose(quant.dequantize(quant.quantize_to_integers(fake, bits, scheme, axis)),
                               fake, rtol=1e-6, atol=float(jnp.max(q.scale)) * 1e-4)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_error_at_most_per_tensor(scheme, bits):
  x = jax.random.normal(jax.random.key(0), (3, 3, 16, 32)) * jnp.linspace(0.05, 2.0, 32)
  err = lambda axis: jnp.sum(jnp.square(
      quant.dequantize(quant.quantize_to_integers(x, bits, scheme, axis)) - x), axis=(0, 1, 2))
  # Per channel, each slice's own range is no wider than the tensor's, so its error is no larger.
  assert bool(jnp.all(err(-1) <= err(None) * (1 + 1e-5) + 1e-9))


def naive_clipped_mse(x: np.ndarray, clip: float, bits: int, scheme: str) -> float:
  """Mean squared error of x rounded to the 2^b-level grid spanning [-clip, clip] (symmetric)
  or [0, clip] (asymmetric, for x >= 0), values outside clipped to its ends."""
  levels = 2 ** (bits - 1) - 1 if scheme == "symmetric" else 2**bits - 1
  step = clip / levels
  lowest = -levels if scheme == "symmetric" else 0
  return float(np.mean(np.square(np.clip(np.round(x / step), lowest, levels) * step - x)))


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_calibration_finds_the_brute_force_optimum(scheme, bits):
  """A heavy-tailed activation (signed for the symmetric scheme, a ReLU's for the asymmetric):
  mse_range against every clipping range on a grid 20x finer than its 100 candidates. Its error
  is at most the worst within one of its steps of the best clip (one of its candidates lies
  there), so it found the optimum to its resolution."""
  x = np.asarray(jax.nn.relu(jax.random.normal(jax.random.key(bits), (20000,)) ** 3), np.float64)
  if scheme == "symmetric":
    x = x * np.sign(np.random.default_rng(0).normal(size=x.shape))
  largest = np.max(np.abs(x))
  clips = largest * np.arange(1, 2001) / 2000
  errors = np.array([naive_clipped_mse(x, c, bits, scheme) for c in clips])
  best = clips[np.argmin(errors)]
  low, high = quant.mse_range(x.astype(np.float32), bits, scheme)
  error = naive_clipped_mse(x, max(abs(low), abs(high)), bits, scheme)
  near_best = np.abs(clips - best) <= largest / 100
  assert error <= np.max(errors[near_best]) * (1 + 1e-4), (error, errors.min(), best / largest)
  assert error <= errors[-1] * (1 + 1e-4)  # min-max is one of its candidates
  if bits <= 4:  # on a heavy tail clipping pays off at low bit-widths
    assert error < 0.9 * errors[-1]


def test_percentile_range_matches_sorted_samples():
  samples = np.arange(10001, dtype=np.float32)  # 0 .. 10000
  low, high = quant.percentile_range(samples, 99.0)
  assert (low, high) == (100.0, 9900.0)
  with pytest.raises(ValueError, match="percentile"):
    quant.percentile_range(samples, 40.0)


def test_calibrate_range_rejects_unknown_method():
  with pytest.raises(ValueError, match="Unknown calibration method"):
    quant.calibrate_range(np.ones(3), "entropy", 4, "asymmetric")


def test_straight_through_value_and_gradient():
  x = jnp.linspace(-1.0, 1.0, 11)
  f = lambda x: jnp.sum(jnp.sin(quant.straight_through(x, quant.quantize_symmetric(x, 2))))
  np.testing.assert_allclose(quant.straight_through(x, quant.quantize_symmetric(x, 2)),
                             quant.quantize_symmetric(x, 2))
  # d/dx sum sin(q(x)) through the STE is cos(q(x)): the identity's Jacobian times the outer gradient.
  np.testing.assert_allclose(jax.grad(f)(x), jnp.cos(quant.quantize_symmetric(x, 2)), rtol=1e-6)


def test_weight_rules_pick_bits_per_layer():
  params = {"conv1": {"conv": {"kernel": jnp.linspace(-1, 1, 50)}},
            "conv2": {"conv": {"kernel": jnp.linspace(-1, 1, 50)}},
            "head": {"kernel": jnp.linspace(-1, 1, 50), "bias": jnp.linspace(-1, 1, 50)}}
  rules = quant.parse_weight_rules(["conv1/.*=8", "head/.*=float"])
  quant.check_rules_match(quant.kernel_paths(params), rules)
  q = quant.quantize_params(params, 2, rules=rules)
  assert len(np.unique(q["conv1"]["conv"]["kernel"])) > 3 * 2 + 1  # 8 bits, not 2
  assert len(np.unique(q["conv2"]["conv"]["kernel"])) <= 3  # the default 2 bits
  np.testing.assert_array_equal(q["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(q["head"]["bias"], params["head"]["bias"])
  assert quant.quantize_params(params, None, rules=rules) is params  # float means float


def test_rules_match_whole_paths_and_unmatched_rules_are_errors():
  params = {"conv1": {"conv": {"kernel": jnp.ones(4)}}, "conv10": {"conv": {"kernel": jnp.ones(4)}}}
  # Matched in full: 'conv1/.*' does not reach conv10, which a re.search of '^conv1' would.
  q = quant.quantize_params(params, 8, rules=quant.parse_weight_rules(["conv1/.*=float"]))
  assert q["conv1"]["conv"]["kernel"] is params["conv1"]["conv"]["kernel"]
  assert q["conv10"]["conv"]["kernel"] is not params["conv10"]["conv"]["kernel"]
  with pytest.raises(ValueError, match=r"quant.weight_rules \['conv1=8', 'hed/.\*=float'\] match no "
                                       r"kernel .*'conv1/conv/kernel', 'conv10/conv/kernel'"):
    quant.check_rules_match(quant.kernel_paths(params), quant.parse_weight_rules(["conv1=8", "hed/.*=float",
                                                               "conv10/.*=4"]))


@pytest.mark.parametrize("rule,message", [("conv1", "REGEX=BITS"), ("conv1/.*=1", r"\[2, 16\]"),
                                          ("conv1/.*=four", "integer or 'float'"),
                                          ("(=8", "bad regular expression")])
def test_bad_weight_rules_rejected(rule, message):
  with pytest.raises(ValueError, match=message):
    quant.parse_weight_rules([rule])
