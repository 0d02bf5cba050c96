"""Post-training quantization simulation on arrays and parameter pytrees.

Pure functions, no Flax and no training code: a "fake-quantized" array has the
float dtype of its input but takes at most 2**bits distinct values.

Pytree conventions (shared with qreg.models): parameters are nested dicts; a
conv or dense layer followed by BatchNorm is a dict holding a `conv` or `dense`
sub-dict (with `kernel`, optionally `bias`) next to a `bn` sub-dict (`scale`,
`bias`; running `mean`, `var` in the batch-stats tree at the same path).
The output channel of every kernel is its last axis.
"""
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

MIN_BITS = 2
MAX_BITS = 16
# Layers that may be followed by BatchNorm, by their name in the pytree.
FOLDABLE_LAYERS = ("conv", "dense")

PyTree = Any


def check_bits(bits: int | None, what: str = "bits") -> None:
  """Raises ValueError unless bits is None (float) or an int in [MIN_BITS, MAX_BITS]."""
  if bits is None:
    return
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(
        f"{what}={bits!r}: expected an integer in [{MIN_BITS}, {MAX_BITS}] or None for float.")


def _safe_scale(scale: jax.Array) -> jax.Array:
  # An all-zero tensor (or constant activation) has range 0; any positive step
  # then represents it exactly, so use 1 rather than divide by zero.
  return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def quantize_symmetric(x: jax.Array, bits: int, channel_axis: int | None = None) -> jax.Array:
  """Symmetric uniform fake-quantization with an absmax range.

  Levels are k * scale for integer k in [-(2**(bits-1) - 1), 2**(bits-1) - 1]
  (the "restricted" signed range, so that 0 is exact and the grid is symmetric),
  scale = max|x| / (2**(bits-1) - 1), per tensor or per slice along channel_axis.
  """
  check_bits(bits)
  qmax = 2 ** (bits - 1) - 1
  if channel_axis is None:
    absmax = jnp.max(jnp.abs(x))
  else:
    reduce_axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    absmax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
  scale = _safe_scale(absmax / qmax)
  return jnp.clip(jnp.round(x / scale), -qmax, qmax) * scale


def quantize_asymmetric(x: jax.Array, low: jax.Array, high: jax.Array, bits: int) -> jax.Array:
  """Asymmetric uniform fake-quantization of x onto [low, high] with 2**bits levels.

  The range is widened to contain 0 and the zero point is an integer, so that 0
  (e.g. every ReLU zero) is represented exactly; values outside are clipped.
  """
  check_bits(bits)
  qmax = 2**bits - 1
  low = jnp.minimum(low, 0.0)
  high = jnp.maximum(high, 0.0)
  scale = _safe_scale((high - low) / qmax)
  zero_point = jnp.round(-low / scale)
  q = jnp.clip(jnp.round(x / scale) + zero_point, 0, qmax)
  return (q - zero_point) * scale


def path_names(path) -> tuple[str, ...]:
  """A jax key path as plain strings, e.g. ('conv1', 'conv', 'kernel')."""
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_kernel(path: tuple[str, ...], leaf: jax.Array) -> bool:
  """Default rule for which leaves are weights to quantize: conv/dense kernels."""
  del leaf
  return path[-1] == "kernel"


def quantize_params(
    params: PyTree,
    bits: int | None,
    per_channel: bool = False,
    should_quantize: Callable[[tuple[str, ...], jax.Array], bool] = is_kernel,
) -> PyTree:
  """Fake-quantizes the leaves selected by should_quantize(path, leaf); bits=None is a no-op."""
  if bits is None:
    return params
  check_bits(bits, "weight_bits")
  channel_axis = -1 if per_channel else None

  def quantize_leaf(path, leaf):
    if should_quantize(path_names(path), leaf):
      return quantize_symmetric(leaf, bits, channel_axis)
    return leaf

  return jax.tree_util.tree_map_with_path(quantize_leaf, params)


def fold_batch_norm(params: PyTree, batch_stats: PyTree, epsilon: float) -> PyTree:
  """Folds every BatchNorm into the conv/dense layer before it.

  BN(x W + b) = (x W + b - mean) * s + beta with s = scale / sqrt(var + eps),
  which equals x (W * s) + ((b - mean) * s + beta): a layer with kernel W*s
  (scaled per output channel) and that bias. Returns the params of the folded
  model (same tree, each `bn` removed and its layer given a `bias`).
  """
  if not isinstance(params, Mapping):
    return params
  stats = batch_stats if isinstance(batch_stats, Mapping) else {}
  layers = [name for name in FOLDABLE_LAYERS if name in params]
  if "bn" in params:
    if len(layers) != 1 or "bn" not in stats:
      raise ValueError(
          "BatchNorm to fold needs exactly one sibling layer named one of "
          f"{FOLDABLE_LAYERS} and running statistics; found params keys "
          f"{sorted(params)} and batch-stats keys {sorted(stats)}.")
    layer, bn, bn_stats = params[layers[0]], params["bn"], stats["bn"]
    s = bn["scale"] * jax.lax.rsqrt(bn_stats["var"] + epsilon)
    bias = layer.get("bias", jnp.zeros_like(bn_stats["mean"]))
    folded = {k: v for k, v in params.items() if k not in ("bn", layers[0])}
    folded[layers[0]] = {
        "kernel": layer["kernel"] * s,
        "bias": (bias - bn_stats["mean"]) * s + bn["bias"],
    }
    return {k: fold_batch_norm(v, stats.get(k, {}), epsilon) if k not in (layers[0],) else v
            for k, v in folded.items()}
  return {k: fold_batch_norm(v, stats.get(k, {}), epsilon) for k, v in params.items()}
