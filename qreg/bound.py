"""The bound-aware gradient penalty (reg.form = 'bound' or 'layer_bound'; issue 23).

Quantizing a tensor with step delta moves each of its values by at most delta/2, so to first
order the loss grows by at most (delta/2) * ||dL/dx||_1. The paper trains with one lambda on
the raw gradient norms; this penalty is that bound itself, on the tensors post-training
quantization will touch, with each tensor's own step:

    B = lambda_w * sum_l sum_c (delta_lc / 2) ||dL/dW^_lc||_1
      + lambda_a * sum_t (delta_t / 2) ||dL/da_t||_1

- form 'bound': W^ are the folded kernels of the network the sweep quantizes (BatchNorm folded
  with its running statistics), L the loss of that folded network in inference mode on the
  batch, a_t its tapped activations. delta_lc is the step of a symmetric absmax quantizer at
  reg.bound_bits, per output channel c with quant.per_channel, else one per kernel; delta_t is
  each tap's step at reg.bound_bits from the batch's own range (min-max, the tap's scheme).
- form 'layer_bound': the same per-layer/per-channel steps on the unfolded kernels and the
  train-mode loss, to tell the fold's part from the per-layer weighting's.

Why the running statistics: the sweep folds them, so B is the first-order bound of the
quantized model's loss on this batch. Batch statistics would give the train-mode function,
which the sweep never quantizes and through which the loss is invariant to each kernel's scale
(the direction along which the uniform penalty's weight term can fall at no cost). The running
statistics are constants here, as in the sweep; they lag the weights by BatchNorm's momentum,
which matters at the start of a run regularized from the start. Why each batch's own range for
delta_t: it needs no state (a run warm-starts from any checkpoint), and min-max calibration takes
the extremes of a few such batches.

With lambda_w = lambda_a = 1, B is the predicted first-order loss increase at reg.bound_bits: the
strength is a bit-width (each bit fewer doubles it), not a per-network lambda. The steps are
constants (reg.bound_steps = 'stop_gradient') or differentiated ('differentiated': the penalty
then also pulls each tensor's largest values in, as KURE does).

Its gradient is a Hessian-vector product, as for the uniform penalty (qreg.objectives), computed
by reg.impl on the view (folded or not) and carried back to the params through the fold.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

from qreg import objectives, quant
from qreg.models import BN_EPSILON

PyTree = Any
FORMS = ("uniform", "bound", "layer_bound")
STEP_MODES = ("stop_gradient", "differentiated")


class BoundPenalty(NamedTuple):
  """The bound penalty's weights and how it is taken (see the module docstring).

  folded_apply_fn: the folded model's apply (model.clone(folded=True).apply), for fold=True.
  """
  lambda_w: float
  lambda_a: float
  bits: int
  per_channel: bool = False
  fold: bool = True
  differentiate_steps: bool = False
  impl: str = "hvp"
  fd_step: float = objectives.FD_STEP
  folded_apply_fn: Callable | None = None
  norm: str = "l1"  # read by the step's logging, like objectives.Penalty's


def kernel_steps(kernel: jax.Array, bits: int, per_channel: bool) -> jax.Array:
  """The step of a symmetric absmax quantizer of a kernel at `bits`: one per output channel
  (the last axis), or one for the kernel; quant.quantize_with_range's scale."""
  axes = tuple(range(kernel.ndim - 1)) if per_channel else None
  absmax = jnp.max(jnp.abs(kernel), axis=axes)
  return quant.grid_step(-absmax, absmax, bits, "symmetric")


def activation_step(low: jax.Array, high: jax.Array, bits: int, symmetric) -> jax.Array:
  """The step of a tap's quantizer on the range [low, high] (its scheme a traced flag)."""
  return jnp.where(symmetric, quant.grid_step(low, high, bits, "symmetric"),
                   quant.grid_step(low, high, bits, "asymmetric"))


def _taps(gradients_a: PyTree, stats: PyTree) -> list[tuple[jax.Array, ...]]:
  """(dL/da_t, min, max, symmetric?) of each tap, matched by module path."""
  flat_grads = flax.traverse_util.flatten_dict(flax.core.unfreeze(gradients_a))
  flat_stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
  taps = []
  for path, grad in flat_grads.items():
    module = path[:-1]
    samples = flat_stats[module + ("samples",)][0]
    symmetric = flat_stats[module + ("symmetric",)][0][0]
    # The exact extremes are the last two samples (QuantizedActivation).
    taps.append((grad, samples[-2], samples[-1], symmetric))
  return taps


def bound_terms(view_params: PyTree, grad_w: PyTree, grad_a: PyTree, stats: PyTree,
                penalty: BoundPenalty) -> tuple[jax.Array, jax.Array]:
  """(sum over kernels and channels of (delta/2) ||dL/dW^||_1, sum over taps of
  (delta_t/2) ||dL/da_t||_1), the steps from view_params' kernels and the taps' ranges."""
  weights = jnp.zeros(())
  for kernel, grad in zip(objectives.kernels(view_params), objectives.kernels(grad_w)):
    steps = kernel_steps(kernel, penalty.bits, penalty.per_channel)
    if not penalty.differentiate_steps:
      steps = jax.lax.stop_gradient(steps)
    per_channel_l1 = jnp.sum(jnp.abs(grad), axis=tuple(range(grad.ndim - 1)))
    weights = weights + jnp.sum(steps / 2 * per_channel_l1)
  activations = jnp.zeros(())
  for grad, low, high, symmetric in _taps(grad_a, stats):
    step = activation_step(low, high, penalty.bits, symmetric)
    if not penalty.differentiate_steps:
      step = jax.lax.stop_gradient(step)
    activations = activations + step / 2 * jnp.sum(jnp.abs(grad))
  return weights, activations


def _weighted(penalty: BoundPenalty, terms: tuple[jax.Array, jax.Array]) -> jax.Array:
  """lambda_w * weight term + lambda_a * activation term."""
  weights, activations = terms
  return penalty.lambda_w * weights + penalty.lambda_a * activations


class View(NamedTuple):
  """The network the bound is taken on: its params as a function of the trained ones, and
  the loss of (its params, tap perturbations) on a batch, with the taps' activation_stats."""
  params: Callable[[PyTree], PyTree]
  loss: Callable[..., tuple[jax.Array, PyTree]]


def view(batch_stats: PyTree, batch: dict[str, jax.Array], apply_fn: Callable,
         penalty: BoundPenalty) -> View:
  """The folded inference-mode network (fold=True) or the train-mode one as it trains."""
  if penalty.fold:
    running = jax.lax.stop_gradient(batch_stats)

    def params(p):
      return quant.fold_batch_norm(p, running, BN_EPSILON)

    def loss(view_params, perturbations):
      logits, state = penalty.folded_apply_fn(
          {"params": view_params, "perturbations": perturbations}, batch["image"], train=False,
          mutable=["activation_stats"])
      return objectives.cross_entropy(logits, batch["label"]), state["activation_stats"]
  else:
    def params(p):
      return p

    def loss(view_params, perturbations):
      logits, state = apply_fn(
          {"params": view_params, "batch_stats": batch_stats, "perturbations": perturbations},
          batch["image"], train=True, mutable=["batch_stats", "activation_stats"])
      return objectives.cross_entropy(logits, batch["label"]), state["activation_stats"]
  return View(params, loss)


def bound_value(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                apply_fn: Callable, penalty: BoundPenalty, perturbations: PyTree):
  """B(params) and its two terms; differentiable twice (the `nested` reference)."""
  the_view = view(batch_stats, batch, apply_fn, penalty)
  view_params = the_view.params(params)
  (_, stats), (grad_w, grad_a) = jax.value_and_grad(the_view.loss, argnums=(0, 1),
                                                    has_aux=True)(view_params, perturbations)
  terms = bound_terms(view_params, grad_w, grad_a, stats, penalty)
  return _weighted(penalty, terms), terms


def _gradients(the_view: View):
  """(view params, perturbations) -> ((dL/dW^, dL/da), activation_stats)."""
  return jax.grad(the_view.loss, argnums=(0, 1), has_aux=True)


def _direction(view_params, grad_w, grad_a, stats, penalty: BoundPenalty):
  """dB/d(dL/dW^, dL/da) at constant steps: (lambda_w delta/2 sign on the kernels, 0 elsewhere;
  lambda_a delta_t/2 sign), by autodiff of bound_terms so that it is the nested gradient's."""
  constant_steps = penalty._replace(differentiate_steps=False)

  def weighted(grad_w, grad_a):
    return _weighted(penalty, bound_terms(view_params, grad_w, grad_a, stats, constant_steps))

  return jax.lax.stop_gradient(jax.grad(weighted, argnums=(0, 1))(grad_w, grad_a))


def _steps_gradient(params, the_view: View, perturbations, grad_w, grad_a,
                    penalty: BoundPenalty):
  """dB/dparams through the steps alone (the gradients held constant): one more forward."""
  def through_steps(params):
    view_params = the_view.params(params)
    _, stats = the_view.loss(view_params, perturbations)
    return _weighted(penalty, bound_terms(view_params, jax.lax.stop_gradient(grad_w),
                                          jax.lax.stop_gradient(grad_a), stats, penalty))
  return jax.grad(through_steps)(params)


def penalty_parts(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                  apply_fn: Callable, penalty: BoundPenalty):
  """B, its (weights, activations) terms, and dB/dparams by penalty.impl.

  nested: jax.grad of bound_value (double backprop), the reference. hvp: the view's task
  gradients linearized once, the tangent pass along _direction, carried back through the fold
  by its vjp. finite_difference: the difference of the view's gradients displaced along
  _direction (largest displacement fd_step) and at the view's params. With differentiated
  steps, hvp and finite_difference add _steps_gradient.
  """
  perturbations = objectives.zero_perturbations(apply_fn, params, batch_stats, batch["image"])
  if penalty.impl == "nested":
    (value, terms), grad = jax.value_and_grad(bound_value, has_aux=True)(
        params, batch_stats, batch, apply_fn, penalty, perturbations)
    return value, terms, grad
  the_view = view(batch_stats, batch, apply_fn, penalty)
  view_params, to_params = jax.vjp(the_view.params, params)
  if penalty.impl == "hvp":
    (grad_w, grad_a), hessian_times, stats = jax.linearize(
        _gradients(the_view), view_params, perturbations, has_aux=True)
    direction_w, direction_a = _direction(view_params, grad_w, grad_a, stats, penalty)
    view_grad, _ = hessian_times(direction_w, direction_a)
  elif penalty.impl == "finite_difference":
    (grad_w, grad_a), stats = _gradients(the_view)(view_params, perturbations)
    direction_w, direction_a = _direction(view_params, grad_w, grad_a, stats, penalty)
    largest = max(jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves((direction_w, direction_a)))
    h = penalty.fd_step / jnp.where(largest > 0, largest, 1.0)
    displaced_w, _ = jax.grad(the_view.loss, has_aux=True)(
        jax.tree.map(lambda w, d: w + h * d, view_params, direction_w),
        jax.tree.map(lambda d: h * d, direction_a))
    view_grad = jax.tree.map(lambda g, g_displaced: (g_displaced - g) / h, grad_w, displaced_w)
  else:
    raise ValueError(f"Unknown reg.impl {penalty.impl!r}; expected one of {objectives.IMPLS}.")
  terms = bound_terms(view_params, grad_w, grad_a, stats, penalty)
  grad = to_params(view_grad)[0]
  if penalty.differentiate_steps:
    grad = jax.tree.map(jnp.add, grad, _steps_gradient(params, the_view, perturbations, grad_w,
                                                       grad_a, penalty))
  return _weighted(penalty, terms), terms, grad


def penalized_value_and_grad(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                             apply_fn: Callable, penalty: BoundPenalty,
                             penalty_batch: dict[str, jax.Array] | None = None):
  """The task loss plus B, its aux and gradient w.r.t. params, with the outputs of
  objectives.penalized_value_and_grad; terms add bound_weights and bound_activations (before
  their lambdas: the predicted loss increase at reg.bound_bits).

  The task loss, its gradient and the BatchNorm updates come from the train-mode pass on
  `batch`; B from a second pass on penalty_batch (a sub-batch) or on `batch`.
  """
  (loss, (new_batch_stats, logits, terms)), grad = objectives.plain_value_and_grad(
      params, batch_stats, batch, apply_fn)
  value, (weights, activations), penalty_grad = penalty_parts(
      params, batch_stats, batch if penalty_batch is None else penalty_batch, apply_fn, penalty)
  terms = dict(terms, bound_weights=weights, bound_activations=activations)
  return ((loss + value, (new_batch_stats, logits, terms)),
          jax.tree.map(jnp.add, grad, penalty_grad))
