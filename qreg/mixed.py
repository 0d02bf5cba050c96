"""Mixed precision: per-layer weight bit-widths under an average-bits budget.

A user deploying a model has a byte budget, not a uniform bit-width. Given a budget B (average
bits per weight, quant.bit_budget: counted over kernel elements, every kernel included), the
allocation picks b_l from a set of choices for every kernel a rule does not fix, minimizing the
sum of per-layer sensitivities s_l(b_l) subject to bit_budget(b) <= B:

- knapsack: the exact optimum. A multiple-choice knapsack written as a 0/1 integer program (one
  binary per layer and choice, one choice per layer, the budget as one linear row), solved by
  scipy's HiGHS MILP solver with a zero optimality gap, on the sensitivities scaled to at most 1.
- greedy: every free kernel at the widest choice, then one kernel at a time one choice down,
  the one with the least sensitivity increase per bit saved, until the budget is met.

Sensitivities, s_l(b): the loss increase, on calibration data through the folded network with
float activations, of kernel l alone quantized at b bits (all else float), by the quantizer the
sweep applies (scheme and granularity):
- measured: L(W with kernel l quantized) - L(W), one forward pass per kernel and choice;
- bound: sum over the kernel's elements of (delta/2)|dL/dW^|, delta the quantizer's step (per
  channel or per tensor) at b bits: the paper's first-order bound, from one gradient pass;
- hessian: Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2 (HAWQ-v2, Dong et al. 2020), Tr(H_l) by
  Hutchinson's estimator E[v^T H v] with Rademacher v on kernel l, Hessian-vector products
  forward-over-reverse: quant.hutchinson_samples products per kernel.
All three make the same additive approximation: several kernels' loss increases add.

Pure functions of arrays: ptq.mixed_precision runs them on a trained model.
"""
import functools
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from qreg import quant

PyTree = Any
SENSITIVITIES = ("measured", "bound", "hessian")
ALLOCATIONS = ("knapsack", "greedy")
BIT_CHOICES = (2, 3, 4, 5, 6, 8)
# {kernel path: {bits: sensitivity}}
Sensitivity = Mapping[str, Mapping[int, float]]
# (kernel, bits) -> the sweep's quantization of it
Quantizer = Callable[[jax.Array, int], quant.Quantized]
# (images, labels, mask) chunks of the calibration data
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def _cost(widths: Mapping[str, int | None], sizes: Mapping[str, int]) -> int:
  """Bits the kernels take (a float kernel quant.FLOAT_BITS per weight)."""
  return sum(sizes[p] * (quant.FLOAT_BITS if b is None else b) for p, b in widths.items())


def allocate(sensitivity: Sensitivity, sizes: Mapping[str, int], budget: float, *,
             fixed: Mapping[str, int | None] | None = None,
             method: str = "knapsack") -> dict[str, int | None]:
  """{kernel path: bits} for every kernel in `sizes` (in its order) with quant.bit_budget at
  most `budget`: the `fixed` kernels at their bits, the others chosen among the bits their
  sensitivity lists, by `method` (module docstring)."""
  fixed = dict(fixed or {})
  free = [path for path in sizes if path not in fixed]
  missing = [path for path in free if not sensitivity.get(path)]
  if missing:
    raise ValueError(f"No sensitivity for kernels {missing}.")
  check_budget(budget, sizes, fixed, {path: min(sensitivity[path]) for path in free})
  # In bits, integers: the budget's total less what the fixed kernels take.
  capacity = math.floor(budget * sum(sizes.values()) + 1e-9) - _cost(fixed, sizes)
  if method == "knapsack":
    chosen = knapsack({p: sensitivity[p] for p in free}, sizes, capacity)
  elif method == "greedy":
    chosen = greedy({p: sensitivity[p] for p in free}, sizes, capacity)
  else:
    raise ValueError(f"Unknown allocation {method!r}; expected one of {ALLOCATIONS}.")
  widths = {**fixed, **chosen}
  return {path: widths[path] for path in sizes}


def check_budget(budget: float, sizes: Mapping[str, int], fixed: Mapping[str, int | None],
                 least: Mapping[str, int]) -> None:
  """Raises ValueError when the budget is below the average bits of the fixed kernels at their
  bits and every other kernel at its least choice (`least`)."""
  floor = quant.bit_budget({**fixed, **least}, sizes)
  if floor > budget:
    raise ValueError(f"A bit budget of {budget:g} bits per weight is below the least the "
                     f"choices allow ({floor:.4f}, the kernels rules fix at their bits).")


def knapsack(sensitivity: Sensitivity, sizes: Mapping[str, int], capacity: int) -> dict[str, int]:
  """The choice of bits per kernel of least total sensitivity whose kernels take at most
  `capacity` bits: a 0/1 integer program, scipy.optimize.milp (HiGHS)."""
  if not sensitivity:
    return {}
  options = [(path, bits) for path in sensitivity for bits in sorted(sensitivity[path])]
  values = np.array([sensitivity[path][bits] for path, bits in options], np.float64)
  scale = float(np.max(np.abs(values))) or 1.0
  paths = list(sensitivity)
  one_each = np.array([[float(path == p) for p, _ in options] for path in paths])
  # The budget row in average bits over the free kernels (well scaled for the solver). Its
  # feasibility tolerance could let a solution cross the capacity by a few bits: the exact
  # integer check below then tightens the row by the excess and solves again.
  total = sum(sizes[path] for path in paths)
  costs = np.array([[sizes[path] * bits / total for path, bits in options]])
  limit = capacity
  for _ in range(3):
    result = optimize.milp(
        values / scale, integrality=np.ones(len(options)), bounds=optimize.Bounds(0, 1),
        constraints=[optimize.LinearConstraint(one_each, 1, 1),
                     optimize.LinearConstraint(costs, -np.inf, limit / total)],
        options={"mip_rel_gap": 0.0})
    if result.x is None:
      raise ValueError(f"The bit allocation found no solution: {result.message}")
    chosen = {path: bits for (path, bits), x in zip(options, result.x) if x > 0.5}
    excess = _cost(chosen, sizes) - capacity
    if excess <= 0:
      return {path: chosen[path] for path in paths}
    limit -= excess
  raise RuntimeError("The bit allocation's solution exceeds the budget.")


def greedy(sensitivity: Sensitivity, sizes: Mapping[str, int], capacity: int) -> dict[str, int]:
  """Every kernel at its widest choice, then the one step down of least sensitivity increase
  per bit saved, one at a time, until the kernels take at most `capacity` bits."""
  ladders = {path: sorted(choices, reverse=True) for path, choices in sensitivity.items()}
  level = dict.fromkeys(ladders, 0)
  cost = _cost({path: ladder[0] for path, ladder in ladders.items()}, sizes)
  while cost > capacity:
    def price(path):
      now, lower = ladders[path][level[path]], ladders[path][level[path] + 1]
      increase = sensitivity[path][lower] - sensitivity[path][now]
      return increase / (sizes[path] * (now - lower))
    path = min((p for p in ladders if level[p] + 1 < len(ladders[p])), key=price)
    cost -= sizes[path] * (ladders[path][level[path]] - ladders[path][level[path] + 1])
    level[path] += 1
  return {path: ladders[path][level[path]] for path in ladders}


def width_rules(widths: Mapping[str, int | None]) -> tuple[quant.WeightRule, ...]:
  """quant.weight_rules that give each kernel its allocated bits (ahead of any others)."""
  return tuple(quant.WeightRule(re.escape(path), bits) for path, bits in widths.items())


def fixed_widths(paths: Iterable[str], rules: Sequence[quant.WeightRule]) -> dict[str, int | None]:
  """{kernel path: bits} of the kernels some rule matches: the ones an allocation keeps."""
  return {path: quant.weight_bits_for(tuple(path.split("/")), None, rules) for path in paths
          if any(re.fullmatch(rule.pattern, path) for rule in rules)}


# The loss on calibration data, summed over chunks.

@functools.partial(jax.jit, static_argnums=0)
def _loss_sum(apply_fn: Callable, params: PyTree, images, labels, mask) -> jax.Array:
  logits = apply_fn({"params": params}, images, train=False).astype(jnp.float32)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask)


_gradient_sum = jax.jit(jax.grad(_loss_sum, argnums=1), static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _quadratic_form_sum(apply_fn: Callable, path: str, params: PyTree, sign: jax.Array, images,
                        labels, mask) -> jax.Array:
  """v . (H v) for v = sign on the kernel at path (zero elsewhere), H the Hessian of the
  chunk's summed loss: a Hessian-vector product, forward over reverse."""
  gradient = lambda p: _gradient_sum(apply_fn, p, images, labels, mask)
  vector = quant.replace_leaf(jax.tree.map(jnp.zeros_like, params), path.split("/"), sign)
  product = jax.jvp(gradient, (params,), (vector,))[1]
  return jnp.sum(sign * _kernel(product, path))


def _count(batches: Sequence[Batch]) -> float:
  return float(sum(np.sum(mask) for _, _, mask in batches))


def mean_loss(apply_fn: Callable, params: PyTree, batches: Sequence[Batch]) -> float:
  """The mean cross-entropy of the model on the batches (masked examples excluded)."""
  return float(sum(_loss_sum(apply_fn, params, *batch) for batch in batches)) / _count(batches)


def mean_gradient(apply_fn: Callable, params: PyTree, batches: Sequence[Batch]) -> PyTree:
  total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b),
                           (_gradient_sum(apply_fn, params, *batch) for batch in batches))
  return jax.tree.map(lambda g: g / _count(batches), total)


def _kernel(params: PyTree, path: str) -> jax.Array:
  return quant.subtree(params, path.split("/"))


def measured_sensitivity(apply_fn: Callable, params: PyTree, batches: Sequence[Batch],
                         paths: Sequence[str], bit_choices: Sequence[int],
                         quantizer: Quantizer) -> dict[str, dict[int, float]]:
  """L(params with one kernel quantized) - L(params), per kernel and bits."""
  base = mean_loss(apply_fn, params, batches)
  return {path: {bits: mean_loss(apply_fn, quant.replace_leaf(
      params, path.split("/"), quant.dequantize(quantizer(_kernel(params, path), bits))),
                                 batches) - base
                 for bits in bit_choices} for path in paths}


def bound_sensitivity(apply_fn: Callable, params: PyTree, batches: Sequence[Batch],
                      paths: Sequence[str], bit_choices: Sequence[int],
                      quantizer: Quantizer) -> dict[str, dict[int, float]]:
  """sum (delta/2)|dL/dW^| over each kernel's elements, delta the quantizer's step at bits."""
  gradient = mean_gradient(apply_fn, params, batches)
  return {path: {bits: float(jnp.sum(quantizer(_kernel(params, path), bits).scale / 2
                                     * jnp.abs(_kernel(gradient, path))))
                 for bits in bit_choices} for path in paths}


def hessian_traces(apply_fn: Callable, params: PyTree, batches: Sequence[Batch],
                   paths: Sequence[str], num_samples: int, seed: int = 0) -> dict[str, float]:
  """Hutchinson's estimate of Tr(H_l), the trace of the mean loss's Hessian block of each
  kernel: the mean over Rademacher v_l (on that kernel alone) of v_l . (H v_l)_l. One v on
  every kernel at once would cost one product per sample, not one per kernel, but its
  estimate of a kernel's block also carries the other blocks' cross terms in its variance
  (on a small CNN's head they were larger than the trace itself)."""
  traces = {}
  for path in paths:
    # Each kernel's draws depend on its path alone, not on which others are estimated.
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    kernel = _kernel(params, path)
    total = jnp.zeros(())
    for _ in range(num_samples):
      key, sample_key = jax.random.split(key)
      sign = jax.random.rademacher(sample_key, kernel.shape, kernel.dtype)
      for batch in batches:
        total = total + _quadratic_form_sum(apply_fn, path, params, sign, *batch)
    traces[path] = float(total) / num_samples / _count(batches)
  return traces


def hessian_sensitivity(apply_fn: Callable, params: PyTree, batches: Sequence[Batch],
                        paths: Sequence[str], bit_choices: Sequence[int], quantizer: Quantizer,
                        num_samples: int = 16) -> dict[str, dict[int, float]]:
  """Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2 per kernel and bits (HAWQ-v2)."""
  traces = hessian_traces(apply_fn, params, batches, paths, num_samples)
  sensitivity = {}
  for path in paths:
    kernel = _kernel(params, path)
    sensitivity[path] = {bits: traces[path] / kernel.size * float(jnp.sum(jnp.square(
        quant.dequantize(quantizer(kernel, bits)) - kernel))) for bits in bit_choices}
  return sensitivity
