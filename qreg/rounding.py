"""Post-training weight quantization beyond rounding to nearest: bias correction and AdaRound.

Pure functions, no Flax, no training loop, no config. A layer is any function
`apply_layer(kernel, x) -> y` (a conv with its strides and padding, a dense
layer, with or without its bias closed over), and calibration data is an array
of its inputs with the examples on the first axis.

- Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
  Equalization and Bias Correction", sec. 4.2, empirical variant) removes the
  mean output shift that quantizing the kernel causes.
- AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
  Post-Training Quantization") learns, weight by weight, whether to round down
  or up so that the layer's output on calibration data changes least. Its codes
  live on the grid of `quant.quantize_to_integers` (same scale and zero point),
  so `quant.dequantize`, export and evaluation take them unchanged.
"""
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qreg import quant

ApplyLayer = Callable[[jax.Array, jax.Array], jax.Array]

# The stretch of the rectified sigmoid (Nagel et al. 2020, eq. 23): sigmoid
# mapped onto (GAMMA, ZETA) then clipped to [0, 1], so that h reaches 0 and 1
# exactly at finite V and its gradient does not vanish just before.
ZETA = 1.1
GAMMA = -0.1


def bias_correction(float_outputs: jax.Array, quantized_outputs: jax.Array) -> jax.Array:
  """The mean output shift per output channel that quantization causes: E[y_q - y].

  For y = x W + b this is E[x] (W_q - W) (Nagel et al. 2019, sec. 4.2); taking it
  from the layer's outputs on calibration data, averaged over every axis but the
  last (examples, and spatial positions for a conv), makes it hold for any
  layer. Subtract it from the bias (`corrected_bias`). Pass pre-activation outputs.
  """
  axes = tuple(range(jnp.ndim(float_outputs) - 1))
  return jnp.mean(quantized_outputs - float_outputs, axis=axes)


def corrected_bias(bias: jax.Array, float_outputs: jax.Array,
                   quantized_outputs: jax.Array) -> jax.Array:
  """The bias giving the quantized layer the float layer's mean output on the calibration data."""
  return bias - bias_correction(float_outputs, quantized_outputs)


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  """h(V) of Nagel et al. 2020, eq. 23: the fraction of a step added to floor(w/s)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: jax.Array) -> jax.Array:
  """V with rectified_sigmoid(V) = h, for h in [0, 1)."""
  return jax.scipy.special.logit((h - GAMMA) / (ZETA - GAMMA))


def rounding_regularizer(h: jax.Array, beta: jax.Array) -> jax.Array:
  """f_reg of Nagel et al. 2020, eq. 24: sum of 1 - |2h - 1|^beta, zero iff every h is 0 or 1.

  A large beta flattens it except next to 0 and 1, leaving h free to move; a
  small one pulls every h to the nearer of 0 and 1.
  """
  return jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)


def annealed_beta(step: jax.Array, num_iterations: jax.Array, warmup: jax.Array,
                  beta_range: tuple[jax.Array, jax.Array]) -> jax.Array:
  """beta at `step`: beta_range[0] through the warm-up, then linear to beta_range[1] at the end."""
  start, end = beta_range
  warmup_steps = warmup * num_iterations
  progress = (step - warmup_steps) / jnp.maximum(num_iterations - warmup_steps, 1.0)
  return start + (end - start) * jnp.clip(progress, 0.0, 1.0)


def reconstruction_error(outputs: jax.Array, target: jax.Array) -> jax.Array:
  """||outputs - target||_F^2 / N over a batch of N examples (Nagel et al. 2020, eqs. 21, 25)."""
  return jnp.sum(jnp.square(outputs - target)) / outputs.shape[0]


def kernel_from_codes(codes: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
  """(codes - zero_point) * scale, also for real-valued codes (quant.dequantize casts to int)."""
  return (codes - zero_point) * scale


class AdaRoundResult(NamedTuple):
  """The learned rounding and, for logging, what it bought on the calibration data."""
  quantized: quant.Quantized  # same scale and zero point as quant.quantize_to_integers
  nearest_error: float  # reconstruction_error over all calibration inputs, nearest rounding
  adaround_error: float  # the same with the learned (hard) rounding
  seconds: float  # wall time of the call, compilation included


def adaround_layer(apply_layer: ApplyLayer, kernel: jax.Array, inputs: jax.Array, bits: int, *,
                   scheme: str = "symmetric", per_channel: bool = False,
                   num_iterations: int = 10_000, batch_size: int = 32,
                   learning_rate: float = 1e-3, reg_weight: float = 0.01, warmup: float = 0.2,
                   beta_range: tuple[float, float] = (20.0, 2.0), seed: int = 0,
                   activation: Callable[[jax.Array], jax.Array] | None = None) -> AdaRoundResult:
  """AdaRound (Nagel et al. 2020) for one layer: codes floor(w/s) or floor(w/s) + 1, learned.

  With the quantizer of `quant.quantize_to_integers(kernel, bits, scheme,
  channel_axis=-1 if per_channel else None)` (step s, zero point z, codes in
  [qmin, qmax]), the soft-quantized kernel is (eq. 22)

      w_soft = s * (clip(floor(w/s) + z + h(V), qmin, qmax) - z),

  V starts where h(V) = w/s - floor(w/s) (so w_soft = w but for clipping), and
  Adam minimizes over V, on random batches of `batch_size` calibration inputs,
  (eq. 21, or eq. 25 with an activation and float inputs)

      ||f(apply_layer(W, x)) - f(apply_layer(w_soft, x))||_F^2 / N
        + reg_weight * rounding_regularizer(h(V), beta),

  f being `activation` (the identity by default, as in the paper, which
  reconstructs pre-activations). The regularizer is off for the first `warmup`
  fraction of the iterations, then beta anneals linearly over `beta_range`.
  The defaults are the paper's. The final codes round up where V >= 0 (h >= 1/2).

  `inputs` holds every calibration example; the float layer's outputs on all of
  them are computed once and kept. `apply_layer` and `activation` are static
  arguments of the compiled step: pass the same function objects for layers of
  the same shapes to compile once.

  Wall time, 2000 iterations, batch 32, 1024 calibration examples, 4 bits per
  channel, on a 2-core AMD EPYC CPU shared with other jobs (load average 7-9):
  a 3x3 conv 64->64 on 14x14 inputs (SAME padding) 36-44 s with compilation,
  31-38 s without; dense 1024->10 4.6-4.8 s with compilation, 0.9-1.7 s without.
  """
  quant.check_bits(bits)
  quant.check_scheme(scheme)
  if num_iterations < 0 or batch_size < 1 or not 0.0 <= warmup < 1.0:
    raise ValueError(f"num_iterations={num_iterations!r} must be >= 0, batch_size={batch_size!r} "
                     f">= 1 and warmup={warmup!r} in [0, 1).")
  start_time = time.perf_counter()
  nearest = quant.quantize_to_integers(kernel, bits, scheme, -1 if per_channel else None)
  qmin, qmax = quant.integer_range(bits, scheme)
  # The same division as quant.quantize_with_range, so that nearest rounding is
  # one of the two candidates floor and floor + 1 of every weight.
  scaled = kernel / nearest.scale
  grid = _Grid(jnp.floor(scaled) + nearest.zero_point, nearest.scale, nearest.zero_point,
               qmin, qmax)
  settings = _Settings(num_iterations, learning_rate, reg_weight, warmup, *beta_range)
  targets = _layer_output(apply_layer, activation, kernel, inputs)
  key = jax.random.key(seed)
  v = inverse_rectified_sigmoid(scaled - jnp.floor(scaled))
  opt_state = optax.adam(learning_rate).init(v)
  # A Python loop over a compiled step rather than one lax.fori_loop: XLA:CPU
  # runs a convolution inside a loop body tens of times slower than outside
  # (jax-ml/jax#12868; 0.6 s instead of 0.02 s per step of a 3x3 conv 64->64 on
  # 32 examples of 14x14).
  for step in range(num_iterations):
    v, opt_state = _rounding_step(apply_layer, activation, batch_size, v, opt_state, step, key,
                                  inputs, targets, grid, settings)
  codes = jnp.clip(grid.floor_codes + (v >= 0), qmin, qmax).astype(jnp.int32)
  quantized = nearest._replace(codes=codes)
  nearest_error, adaround_error = jax.device_get((
      _output_error(apply_layer, activation, quant.dequantize(nearest), inputs, targets),
      _output_error(apply_layer, activation, quant.dequantize(quantized), inputs, targets)))
  return AdaRoundResult(quantized, float(nearest_error), float(adaround_error),
                        time.perf_counter() - start_time)


class _Grid(NamedTuple):
  """The quantization grid of a kernel, with each weight's lower candidate code."""
  floor_codes: jax.Array  # floor(w/s) + z, as floats
  scale: jax.Array
  zero_point: jax.Array
  qmin: int
  qmax: int


class _Settings(NamedTuple):
  """The optimization's hyperparameters, traced so that changing them does not recompile."""
  num_iterations: int
  learning_rate: float
  reg_weight: float
  warmup: float
  beta_start: float
  beta_end: float


def _output(apply_layer, activation, kernel, inputs):
  outputs = apply_layer(kernel, inputs)
  return outputs if activation is None else activation(outputs)


# The layer and the activation fix the computation, so they are static arguments.
_layer_output = jax.jit(_output, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _output_error(apply_layer, activation, kernel, inputs, targets):
  return reconstruction_error(_output(apply_layer, activation, kernel, inputs), targets)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rounding_step(apply_layer, activation, batch_size, v, opt_state, step, key, inputs, targets,
                   grid, settings):
  """One Adam step on V for the loss of `adaround_layer`, on a random calibration batch."""

  def loss(v, batch_inputs, batch_targets):
    h = rectified_sigmoid(v)
    soft_kernel = kernel_from_codes(jnp.clip(grid.floor_codes + h, grid.qmin, grid.qmax),
                                    grid.scale, grid.zero_point)
    warming_up = step < settings.warmup * settings.num_iterations
    beta = annealed_beta(step, settings.num_iterations, settings.warmup,
                         (settings.beta_start, settings.beta_end))
    return (reconstruction_error(_output(apply_layer, activation, soft_kernel, batch_inputs),
                                 batch_targets)
            + jnp.where(warming_up, 0.0, settings.reg_weight) * rounding_regularizer(h, beta))

  batch = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, inputs.shape[0])
  optimizer = optax.adam(settings.learning_rate)
  updates, opt_state = optimizer.update(jax.grad(loss)(v, inputs[batch], targets[batch]),
                                        opt_state, v)
  return optax.apply_updates(v, updates), opt_state
