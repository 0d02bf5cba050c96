"""Post-training quantization simulation on arrays and parameter pytrees.

Pure functions, no Flax and no training code. A "fake-quantized" array has the
float dtype of its input but takes at most 2**bits distinct values; it is
computed as dequantize(quantize_to_integers(x)), the same two functions that
qreg.export uses, so exported integers dequantize to exactly these values.

Schemes, for b bits:
- symmetric: integers in [-(2**(b-1) - 1), 2**(b-1) - 1] (the "restricted"
  signed range: the grid is symmetric and 0 is exact), value = k * scale,
  scale = absmax / (2**(b-1) - 1);
- asymmetric: integers in [0, 2**b - 1], value = (k - zero_point) * scale,
  with the range [low, high] widened to contain 0 and an integer zero point,
  so that 0 (every ReLU zero, every zero weight) is exact.

Pytree conventions (shared with qreg.models): parameters are nested dicts; a
conv or dense layer followed by BatchNorm is a dict holding a `conv` or `dense`
sub-dict (with `kernel`, optionally `bias`) next to a `bn` sub-dict (`scale`,
`bias`; running `mean`, `var` in the batch-stats tree at the same path). The
output channel of every kernel is its last axis.
"""
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
MAX_BITS = 16
SCHEMES = ("symmetric", "asymmetric")
CALIBRATION_METHODS = ("minmax", "percentile", "mse")
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


def check_scheme(scheme: str, what: str = "scheme") -> None:
  if scheme not in SCHEMES:
    raise ValueError(f"{what}={scheme!r}: expected one of {SCHEMES}.")


class Quantized(NamedTuple):
  """Integer codes with what it takes to dequantize them: value = (codes - zero_point) * scale."""
  codes: jax.Array  # int32
  scale: jax.Array  # float, broadcastable to codes
  zero_point: jax.Array  # int32, broadcastable to codes (0 for symmetric)
  bits: int
  scheme: str


def integer_range(bits: int, scheme: str) -> tuple[int, int]:
  """The smallest and largest integer code of a scheme."""
  if scheme == "symmetric":
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return 0, 2**bits - 1


def _safe_scale(scale: jax.Array) -> jax.Array:
  # An all-zero tensor (or constant activation) has range 0; any positive step
  # then represents it exactly, so use 1 rather than divide by zero.
  return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def _reduce_axes(x: jax.Array, channel_axis: int | None) -> tuple[int, ...] | None:
  if channel_axis is None:
    return None
  return tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)


def grid_step(low: jax.Array, high: jax.Array, bits: int, scheme: str) -> jax.Array:
  """The step (scale) of the b-bit grid spanning [low, high]: max(|low|, |high|) / qmax for
  `symmetric`, the range widened to contain 0 over qmax for `asymmetric`."""
  qmax = integer_range(bits, scheme)[1]
  if scheme == "symmetric":
    return _safe_scale(jnp.maximum(jnp.abs(low), jnp.abs(high)) / qmax)
  return _safe_scale((jnp.maximum(high, 0.0) - jnp.minimum(low, 0.0)) / qmax)


def quantize_with_range(x: jax.Array, low: jax.Array, high: jax.Array, bits: int,
                        scheme: str) -> Quantized:
  """Integer codes of x on the grid spanning [low, high] (clipping what falls outside)."""
  check_bits(bits)
  check_scheme(scheme)
  qmin, qmax = integer_range(bits, scheme)
  scale = grid_step(low, high, bits, scheme)
  if scheme == "symmetric":
    zero_point = jnp.zeros(jnp.shape(scale), jnp.int32)
  else:
    zero_point = jnp.round(-jnp.minimum(low, 0.0) / scale).astype(jnp.int32)
  codes = jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax).astype(jnp.int32)
  return Quantized(codes, scale.astype(x.dtype), zero_point, bits, scheme)


def quantize_to_integers(x: jax.Array, bits: int, scheme: str = "symmetric",
                         channel_axis: int | None = None) -> Quantized:
  """Integer codes of x with its own range: absmax (symmetric) or min-max (asymmetric),
  per tensor or per slice along channel_axis."""
  axes = _reduce_axes(x, channel_axis)
  low = jnp.min(x, axis=axes, keepdims=axes is not None)
  high = jnp.max(x, axis=axes, keepdims=axes is not None)
  return quantize_with_range(x, low, high, bits, scheme)


def dequantize(q: Quantized) -> jax.Array:
  return (q.codes - q.zero_point).astype(q.scale.dtype) * q.scale


def quantize_symmetric(x: jax.Array, bits: int, channel_axis: int | None = None) -> jax.Array:
  """Symmetric absmax fake-quantization, per tensor or per slice along channel_axis."""
  return dequantize(quantize_to_integers(x, bits, "symmetric", channel_axis))


def quantize_asymmetric(x: jax.Array, low: jax.Array, high: jax.Array, bits: int) -> jax.Array:
  """Asymmetric fake-quantization of x onto [low, high] (widened to contain 0)."""
  return dequantize(quantize_with_range(x, low, high, bits, "asymmetric"))


def quantize_activation(x: jax.Array, low: jax.Array, high: jax.Array, bits: int,
                        scheme: str) -> jax.Array:
  """Fake-quantizes an activation with its calibrated range [low, high]."""
  return dequantize(quantize_with_range(x, low, high, bits, scheme))


def straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
  """Straight-through estimator: the value of `quantized`, the gradient of the identity.

  x + stop_gradient(q(x) - x), for quantization-aware training (Bengio et al. 2013).
  """
  return x + jax.lax.stop_gradient(quantized - x)


def subtree(tree: PyTree, path: Sequence[str]) -> PyTree:
  """The node of a nested dict at a path of keys."""
  for key in path:
    tree = tree[key]
  return tree


def replace_leaf(tree: PyTree, path: Sequence[str], value) -> PyTree:
  """A copy of the nested dict `tree` with the node at a path of keys replaced."""
  if not path:
    return value
  return {**tree, path[0]: replace_leaf(tree[path[0]], path[1:], value)}


def path_names(path) -> tuple[str, ...]:
  """A jax key path as plain strings, e.g. ('conv1', 'conv', 'kernel')."""
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_kernel(path: tuple[str, ...], leaf: jax.Array) -> bool:
  """Which leaves are weights: conv/dense kernels (biases and norms are never quantized)."""
  del leaf
  return path[-1] == "kernel"


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """Kernels whose '/'-joined path (e.g. 'conv1/conv/kernel') matches `pattern` in full
  (re.fullmatch, as qwix matches module paths) get `bits` (None = float)."""
  pattern: str
  bits: int | None


def parse_weight_rules(rules: Sequence[str]) -> tuple[WeightRule, ...]:
  """Parses config strings "REGEX=BITS" (BITS an integer or 'float'), e.g. "conv1/.*=8", "head/.*=float"."""
  parsed = []
  for rule in rules:
    pattern, sep, bits_text = str(rule).rpartition("=")
    if not sep or not pattern:
      raise ValueError(f"Weight rule {rule!r} must read 'REGEX=BITS', e.g. 'head/.*=8' or 'head/.*=float'.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Weight rule {rule!r}: bad regular expression: {e}") from e
    if bits_text == "float":
      bits = None
    elif bits_text.isdigit():
      bits = int(bits_text)
      check_bits(bits, f"weight rule {rule!r}: bits")
    else:
      raise ValueError(f"Weight rule {rule!r}: bits must be an integer or 'float'.")
    parsed.append(WeightRule(pattern, bits))
  return tuple(parsed)


def weight_bits_for(path: tuple[str, ...], default_bits: int | None,
                    rules: Sequence[WeightRule] = ()) -> int | None:
  """Bits for the kernel at path: the first matching rule's, else default_bits."""
  joined = "/".join(path)
  for rule in rules:
    if re.fullmatch(rule.pattern, joined):
      return rule.bits
  return default_bits


def kernel_paths(params: PyTree) -> list[str]:
  """The '/'-joined paths of every kernel in params, the strings weight rules match."""
  return list(kernel_sizes(params))


def check_rules_match(paths: Sequence[str], rules: Sequence[WeightRule]) -> None:
  """Raises ValueError naming every rule that matches none of the kernel paths (a typo would
  otherwise silently quantize that layer at the sweep's bits; qwix's get_unused_rules)."""
  paths = list(paths)
  unused = [f"{rule.pattern}={setting_name(rule.bits)}" for rule in rules
            if not any(re.fullmatch(rule.pattern, path) for path in paths)]
  if unused:
    raise ValueError(f"quant.weight_rules {unused} match no kernel (rules match the whole path); "
                     f"the kernels are {paths}.")


def setting_name(bits: int | None) -> str:
  """A bit-width as written in configs, tables and rules: 'float' for None."""
  return "float" if bits is None else str(bits)


# Bits a float (unquantized) kernel counts for in a budget: float32.
FLOAT_BITS = 32


def bit_budget(widths: Mapping[str, int | None], sizes: Mapping[str, int]) -> float:
  """The average bits per weight of per-kernel bit-widths, counted over kernel elements:
  sum_l size_l * bits_l / sum_l size_l over every kernel in `sizes` (first and last
  included), a float kernel (None) counting FLOAT_BITS."""
  if set(widths) != set(sizes):
    raise ValueError(f"bit_budget: widths name {sorted(widths)}, sizes {sorted(sizes)}.")
  total = sum(sizes.values())
  return sum(size * (FLOAT_BITS if widths[path] is None else widths[path])
             for path, size in sizes.items()) / total


def kernel_sizes(params: PyTree) -> dict[str, int]:
  """{'/'-joined kernel path: its number of elements}, the weights a budget counts."""
  return {"/".join(path_names(path)): int(np.prod(np.shape(leaf)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if is_kernel(path_names(path), leaf)}


def quantize_params_to_integers(params: PyTree, bits: int | None, *, scheme: str = "symmetric",
                                per_channel: bool = False,
                                rules: Sequence[WeightRule] = ()) -> PyTree:
  """Each kernel as `Quantized` (or unchanged where its bits come out None); other leaves unchanged."""
  check_bits(bits, "weight_bits")
  check_scheme(scheme, "weight scheme")
  channel_axis = -1 if per_channel else None

  def quantize_leaf(path, leaf):
    names = path_names(path)
    if not is_kernel(names, leaf):
      return leaf
    leaf_bits = weight_bits_for(names, bits, rules)
    if leaf_bits is None:
      return leaf
    return quantize_to_integers(leaf, leaf_bits, scheme, channel_axis)

  return jax.tree_util.tree_map_with_path(quantize_leaf, params)


def dequantize_params(tree: PyTree) -> PyTree:
  """Inverse of quantize_params_to_integers: every `Quantized` leaf back to float."""
  return jax.tree.map(lambda leaf: dequantize(leaf) if isinstance(leaf, Quantized) else leaf,
                      tree, is_leaf=lambda leaf: isinstance(leaf, Quantized))


def quantize_params(params: PyTree, bits: int | None, *, scheme: str = "symmetric",
                    per_channel: bool = False, rules: Sequence[WeightRule] = ()) -> PyTree:
  """Fake-quantizes every kernel (bits from `rules`, else `bits`); bits=None keeps all float."""
  if bits is None:
    return params
  return dequantize_params(quantize_params_to_integers(
      params, bits, scheme=scheme, per_channel=per_channel, rules=rules))


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
  if "bn" not in params:
    return {k: fold_batch_norm(v, stats.get(k, {}), epsilon) for k, v in params.items()}
  layers = [name for name in FOLDABLE_LAYERS if name in params]
  if len(layers) != 1 or "bn" not in stats:
    raise ValueError(
        "BatchNorm to fold needs exactly one sibling layer named one of "
        f"{FOLDABLE_LAYERS} and running statistics; found params keys "
        f"{sorted(params)} and batch-stats keys {sorted(stats)}.")
  layer, bn, bn_stats = params[layers[0]], params["bn"], stats["bn"]
  s = bn["scale"] * jax.lax.rsqrt(bn_stats["var"] + epsilon)
  bias = layer.get("bias", jnp.zeros_like(bn_stats["mean"]))
  folded = {k: fold_batch_norm(v, stats.get(k, {}), epsilon) for k, v in params.items()
            if k not in ("bn", layers[0])}
  folded[layers[0]] = {"kernel": layer["kernel"] * s,
                       "bias": (bias - bn_stats["mean"]) * s + bn["bias"]}
  return folded


# Activation range calibration, on samples of a tapped activation.

def minmax_range(samples: np.ndarray) -> tuple[float, float]:
  return float(np.min(samples)), float(np.max(samples))


def check_percentile(percentile: float, what: str = "percentile") -> None:
  if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
      or not 50.0 < percentile <= 100.0:
    raise ValueError(f"{what}={percentile!r} must be in (50, 100].")


def percentile_range(samples: np.ndarray, percentile: float) -> tuple[float, float]:
  """Clips the (100 - percentile)% most extreme values on each side."""
  check_percentile(percentile)
  return (float(np.percentile(samples, 100.0 - percentile)),
          float(np.percentile(samples, percentile)))


def quantization_mse(samples: jax.Array, low, high, bits: int, scheme: str) -> jax.Array:
  return jnp.mean(jnp.square(quantize_activation(samples, low, high, bits, scheme) - samples))


def mse_range(samples: np.ndarray, bits: int, scheme: str,
              num_candidates: int = 100) -> tuple[float, float]:
  """The range, among the min-max range shrunk by factors in (0, 1], with the least squared error.

  Shrinking trades clipping error for a finer step; factor 1 (min-max itself)
  is a candidate, so the result is never worse than min-max on these samples.
  """
  low, high = minmax_range(samples)
  factors = jnp.linspace(1.0, 1.0 / num_candidates, num_candidates)
  x = jnp.asarray(samples, jnp.float32)
  errors = jax.vmap(lambda f: quantization_mse(x, f * low, f * high, bits, scheme))(factors)
  best = float(factors[int(jnp.argmin(errors))])
  return best * low, best * high


def calibrate_range(samples: np.ndarray, method: str, bits: int, scheme: str,
                    percentile: float = 99.99) -> tuple[float, float]:
  """The [low, high] range of an activation from samples of it, by `method`."""
  if method == "minmax":
    return minmax_range(samples)
  if method == "percentile":
    return percentile_range(samples, percentile)
  if method == "mse":
    return mse_range(samples, bits, scheme)
  raise ValueError(f"Unknown calibration method {method!r}; expected one of {CALIBRATION_METHODS}.")
