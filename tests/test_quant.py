"""quant.py against naive loops and the quantizer's defining properties."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
