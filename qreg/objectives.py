"""The training objective: task loss plus the gradient-norm penalty, and its gradient.

    L_task + lambda_w * sum_l ||dL/dW_l||_1 + lambda_a * sum_l ||dL/da_l||_1

(Alizadeh et al., ICLR 2020, eq. 5). A quantizer with step delta moves each
value by at most delta/2, so to first order it changes the loss by at most
(delta/2) * ||grad||_1; penalizing that norm makes the float weights robust to
quantization at any bit-width. W_l are the conv/dense kernels, a_l the
activations tapped by `QuantizedActivation` (their gradient is the gradient
w.r.t. the zero `perturbations` collection p).

The penalty's gradient w.r.t. the params theta is a Hessian-vector product:
with s_w = sign(dL/dW) on the kernels (0 elsewhere) and s_a = sign(dL/da),

    d/dtheta penalty = lambda_w * H_{theta,theta} s_w + lambda_a * H_{theta,p} s_a,

the theta-component of the Hessian of L(theta, p) applied to the direction
(lambda_w s_w, lambda_a s_a). Three ways to compute it (`Penalty.impl`):
- `nested`: reverse-over-reverse (double backprop of `penalized_loss`), the reference;
- `hvp`: forward-over-reverse, the same value at a fraction of the cost;
- `finite_difference`: a difference of two gradients along the direction,
  an approximation that costs exactly two gradient evaluations.

Everything here takes an `apply_fn` and pytrees, never a config.
"""
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qreg import quant

PyTree = Any
ApplyFn = Callable[..., Any]

# The finite-difference step: the largest displacement of any weight or
# activation (each term moves by fd_step * lambda / max(lambda_w, lambda_a)).
# Its error against the exact gradient grows with the step through truncation
# (a sign vector moves every weight at once), and as the step shrinks through
# float32 rounding of the two gradients (~eps |g| / step) and, in ReLU nets,
# the gradient jumps of the few units whose pre-activation crosses zero within
# the step (noise ~ 1 / sqrt(step)). experiments/fd_step_error.py measures it:
# on SmallCNN after 60 steps on Fashion-MNIST (float32) it is smallest near
# 1e-3 for the weight term and for both terms together (3e-3..1e-2 for the
# activation term alone), and even there its error is a large part of the penalty's
# gradient (docs/cost.md).
FD_STEP = 1e-3


class Penalty(NamedTuple):
  """The gradient-l1 penalty: term weights (zero switches a term off) and how to differentiate it.

  impl is one of IMPLS; fd_step is the finite-difference step (see FD_STEP),
  used only by impl='finite_difference'.
  """
  lambda_w: float = 0.0
  lambda_a: float = 0.0
  impl: str = "hvp"
  fd_step: float = FD_STEP
  norm: str = "l1"  # or "l2": sum_l ||g_l||_2 per layer / tap point, the paper's ablation


NORMS = ("l1", "l2")
# KURE's target: the kurtosis of a uniform distribution (Shkolnik et al. 2020).
UNIFORM_KURTOSIS = 1.8


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy, in float32 at least (the logits of a bfloat16 model are upcast)."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def l1_norm(tree: PyTree) -> jax.Array:
  return sum((jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)), jnp.zeros(()))


def kernel_mask(params: PyTree) -> PyTree:
  """True at the conv/dense kernels (the W_l the weight penalty sums over), False elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: quant.is_kernel(quant.path_names(path), leaf), params)


def kernels(params: PyTree) -> list[jax.Array]:
  """The conv/dense kernels of a params tree."""
  return [leaf for leaf, is_kernel in zip(jax.tree.leaves(params),
                                          jax.tree.leaves(kernel_mask(params))) if is_kernel]


def parameter_norms(params: PyTree) -> dict[str, jax.Array]:
  """{'<layer path>/kernel' or '<layer path>/bn_scale': its L2 norm} for every kernel and
  BatchNorm scale (gamma): the directions along which BatchNorm lets the uniform penalty fall
  at no cost to the function (docs/bound.md)."""
  norms = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = quant.path_names(path)
    if quant.is_kernel(names, leaf):
      norms["/".join(names)] = jnp.linalg.norm(leaf)
    elif names[-2:] == ("bn", "scale"):
      norms["/".join(names[:-2]) + "/bn_scale"] = jnp.linalg.norm(leaf)
  return norms


def zero_perturbations(apply_fn: ApplyFn, params: PyTree, batch_stats: PyTree,
                       images: jax.Array) -> PyTree:
  """Zeros shaped like every tapped activation for this batch (shape-only trace)."""
  variables = {"params": params, "batch_stats": batch_stats}
  _, shapes = jax.eval_shape(
      lambda: apply_fn(variables, images, train=True, mutable=["batch_stats", "perturbations"]))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])


def task_loss(params: PyTree, perturbations: PyTree, batch_stats: PyTree,
              batch: dict[str, jax.Array], apply_fn: ApplyFn):
  """Cross-entropy of the train-mode model; returns loss, (new_batch_stats, logits)."""
  variables = {"params": params, "batch_stats": batch_stats}
  if perturbations is not None:
    variables["perturbations"] = perturbations
  logits, updates = apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
  return cross_entropy(logits, batch["label"]), (updates["batch_stats"], logits)


def task_gradients(params: PyTree, perturbations: PyTree, batch_stats: PyTree,
                   batch: dict[str, jax.Array], apply_fn: ApplyFn):
  """(dL/dtheta, dL/dp), (loss, (new_batch_stats, logits)): one forward and one backward pass."""
  (loss, aux), grads = jax.value_and_grad(task_loss, argnums=(0, 1), has_aux=True)(
      params, perturbations, batch_stats, batch, apply_fn)
  return grads, (loss, aux)


def l2_norms(tree: PyTree) -> jax.Array:
  """Sum over leaves (layers or tap points) of each leaf's l2 norm."""
  return sum((jnp.sqrt(jnp.sum(jnp.square(leaf))) for leaf in jax.tree.leaves(tree)),
             jnp.zeros(()))


def objective_and_terms(loss: jax.Array, grad_w: PyTree, grad_a: PyTree, penalty: Penalty):
  """The objective's value and its logged terms, from the task gradients.

  The l1 norms are logged whatever the penalty's norm: they bound the
  first-order loss change under quantization.
  """
  terms = {"task_loss": loss, "grad_l1_weights": l1_norm(kernels(grad_w)),
           "grad_l1_activations": l1_norm(grad_a)}
  if penalty.norm == "l2":
    terms.update(grad_l2_weights=l2_norms(kernels(grad_w)), grad_l2_activations=l2_norms(grad_a))
  return objective(loss, terms, penalty), terms


def objective(loss: jax.Array, terms: dict[str, jax.Array], penalty: Penalty) -> jax.Array:
  """loss + lambda_w * (weight-gradient norm) + lambda_a * (activation-gradient norm), the
  norms read from the logged terms of objective_and_terms."""
  penalty_w, penalty_a = terms[f"grad_{penalty.norm}_weights"], terms[f"grad_{penalty.norm}_activations"]
  return loss + penalty.lambda_w * penalty_w + penalty.lambda_a * penalty_a


def _plus(grad_w: PyTree, penalty_grad: PyTree | None) -> PyTree:
  """The task gradient plus the penalty's (None: no penalty gradient)."""
  return grad_w if penalty_grad is None else jax.tree.map(jnp.add, grad_w, penalty_grad)


def _norm_derivative(g: jax.Array, norm: str) -> jax.Array:
  """d||g||/dg: sign(g) for l1, g / ||g||_2 for l2 (0 at g = 0)."""
  if norm == "l1":
    return jnp.sign(g)
  length = jnp.sqrt(jnp.sum(jnp.square(g)))
  return g / jnp.where(length > 0, length, 1.0)


def penalty_direction(grad_w: PyTree, grad_a: PyTree, penalty: Penalty):
  """(lambda_w d||dL/dW||/d(dL/dW) on kernels and 0 elsewhere, lambda_a d||dL/da||/d(dL/da)).

  For l1 the derivatives are the signs. By the chain rule the penalty's
  gradient is the Hessian applied to this direction, which enters as a
  constant (the norm's derivative is evaluated at g, not differentiated again).
  """
  direction_w = jax.tree.map(
      lambda g, is_kernel: (penalty.lambda_w * _norm_derivative(g, penalty.norm) if is_kernel
                            else jnp.zeros_like(g)),
      grad_w, kernel_mask(grad_w))
  direction_a = jax.tree.map(lambda g: penalty.lambda_a * _norm_derivative(g, penalty.norm), grad_a)
  return jax.lax.stop_gradient((direction_w, direction_a))


def penalized_loss(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                   apply_fn: ApplyFn, penalty: Penalty):
  """Task loss plus the gradient-l1 penalty; returns total, (new_batch_stats, logits, terms).

  Differentiable twice: its jax.grad is the `nested` (double backprop)
  gradient. BatchNorm statistics come out of the single forward pass, so they
  update once a step.
  """
  perturbations = zero_perturbations(apply_fn, params, batch_stats, batch["image"])
  (grad_w, grad_a), (loss, (new_batch_stats, logits)) = task_gradients(
      params, perturbations, batch_stats, batch, apply_fn)
  total, terms = objective_and_terms(loss, grad_w, grad_a, penalty)
  return total, (new_batch_stats, logits, terms)


def nested_value_and_grad(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                          apply_fn: ApplyFn, penalty: Penalty):
  """Reverse-over-reverse: jax.value_and_grad of penalized_loss."""
  return jax.value_and_grad(penalized_loss, has_aux=True)(params, batch_stats, batch, apply_fn,
                                                          penalty)


def hvp_parts(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
              apply_fn: ApplyFn, penalty: Penalty):
  """Forward-over-reverse: dL/dtheta and the penalty's gradient by jax.linearize.

  Linearizing the task gradients at (theta, p=0) runs their forward and
  backward pass once; the signs come from that pass, then the linearized
  function is applied to the penalty direction (the tangent pass), so no
  gradient is computed twice. Returns (total, aux), dL/dtheta, H d.
  """
  perturbations = zero_perturbations(apply_fn, params, batch_stats, batch["image"])
  gradients = functools.partial(task_gradients, batch_stats=batch_stats, batch=batch,
                                apply_fn=apply_fn)
  (grad_w, grad_a), hessian_times, (loss, (new_batch_stats, logits)) = jax.linearize(
      gradients, params, perturbations, has_aux=True)
  total, terms = objective_and_terms(loss, grad_w, grad_a, penalty)
  penalty_grad, _ = hessian_times(*penalty_direction(grad_w, grad_a, penalty))
  return (total, (new_batch_stats, logits, terms)), grad_w, penalty_grad


def hvp_value_and_grad(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                       apply_fn: ApplyFn, penalty: Penalty):
  """Forward-over-reverse: dL/dtheta plus the Hessian-vector product (hvp_parts)."""
  value, grad_w, penalty_grad = hvp_parts(params, batch_stats, batch, apply_fn, penalty)
  return value, _plus(grad_w, penalty_grad)


def finite_difference_parts(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                            apply_fn: ApplyFn, penalty: Penalty):
  """dL/dtheta and [dL/dtheta(theta + h d_w, p = h d_a) - dL/dtheta(theta, 0)] / h.

  (d_w, d_a) is the penalty direction, h = fd_step / max(lambda_w, lambda_a)
  so that no weight or activation moves by more than fd_step. Two gradient
  evaluations; like sharpness-aware minimization with an l_inf ball, but the
  difference is divided by h, so for a smooth loss it tends to the exact
  gradient as h -> 0 (for ReLU nets see FD_STEP). BatchNorm statistics of the
  displaced pass are discarded. Returns (total, aux), dL/dtheta, and the
  difference (None when both lambdas are zero: no direction to step along).
  """
  perturbations = zero_perturbations(apply_fn, params, batch_stats, batch["image"])
  (grad_w, grad_a), (loss, (new_batch_stats, logits)) = task_gradients(
      params, perturbations, batch_stats, batch, apply_fn)
  total, terms = objective_and_terms(loss, grad_w, grad_a, penalty)
  largest_lambda = max(penalty.lambda_w, penalty.lambda_a)
  if largest_lambda == 0:
    return (total, (new_batch_stats, logits, terms)), grad_w, None
  h = penalty.fd_step / largest_lambda
  direction_w, direction_a = penalty_direction(grad_w, grad_a, penalty)
  displaced_params = jax.tree.map(lambda w, d: w + h * d, params, direction_w)
  displaced_activations = jax.tree.map(lambda d: h * d, direction_a)
  displaced_grad_w, _ = jax.grad(task_loss, has_aux=True)(
      displaced_params, displaced_activations, batch_stats, batch, apply_fn)
  penalty_grad = jax.tree.map(lambda g, g_displaced: (g_displaced - g) / h, grad_w,
                              displaced_grad_w)
  return (total, (new_batch_stats, logits, terms)), grad_w, penalty_grad


def finite_difference_value_and_grad(params: PyTree, batch_stats: PyTree,
                                     batch: dict[str, jax.Array], apply_fn: ApplyFn,
                                     penalty: Penalty):
  """dL/dtheta plus the finite difference of finite_difference_parts."""
  value, grad_w, penalty_grad = finite_difference_parts(params, batch_stats, batch, apply_fn,
                                                        penalty)
  return value, _plus(grad_w, penalty_grad)


def nested_parts(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                 apply_fn: ApplyFn, penalty: Penalty):
  """Reverse-over-reverse gradient of the penalty alone: (total, aux), None, its gradient."""

  def penalty_value(params):
    total, aux = penalized_loss(params, batch_stats, batch, apply_fn, penalty)
    return total - aux[2]["task_loss"], (total, aux)

  penalty_grad, value = jax.grad(penalty_value, has_aux=True)(params)
  return value, None, penalty_grad


# Each returns (total, (new_batch_stats, logits, terms)), dtotal/dparams.
PENALIZED_VALUE_AND_GRAD = {
    "nested": nested_value_and_grad,
    "hvp": hvp_value_and_grad,
    "finite_difference": finite_difference_value_and_grad,
}
IMPLS = tuple(PENALIZED_VALUE_AND_GRAD)
# Each returns (total, aux), dL/dtheta or None, the penalty's gradient (None: zero).
PENALTY_PARTS = {
    "nested": nested_parts,
    "hvp": hvp_parts,
    "finite_difference": finite_difference_parts,
}


def penalized_value_and_grad(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                             apply_fn: ApplyFn, penalty: Penalty,
                             penalty_batch: dict[str, jax.Array] | None = None):
  """penalized_loss's value, aux and gradient w.r.t. params, computed by penalty.impl.

  penalty_batch (a sub-batch, reg.penalty_batch_fraction < 1): the task loss and
  its gradient on `batch`, the penalty and its gradient on penalty_batch alone,
  in a second pass. That pass normalizes with penalty_batch's own BatchNorm
  statistics (train mode, as any forward pass of the step), and its updates of
  the running statistics are discarded: they come from `batch` only. The logged
  gradient norms are penalty_batch's (what is penalized); task_loss is batch's.
  """
  if penalty_batch is None:
    return PENALIZED_VALUE_AND_GRAD[penalty.impl](params, batch_stats, batch, apply_fn, penalty)
  (loss, (new_batch_stats, logits, _)), grad_w = plain_value_and_grad(params, batch_stats, batch,
                                                                      apply_fn)
  (_, (_, _, terms)), _, penalty_grad = PENALTY_PARTS[penalty.impl](
      params, batch_stats, penalty_batch, apply_fn, penalty)
  terms = dict(terms, task_loss=loss)
  return ((objective(loss, terms, penalty), (new_batch_stats, logits, terms)),
          _plus(grad_w, penalty_grad))


def plain_value_and_grad(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                         apply_fn: ApplyFn):
  """The unregularized objective and its gradient, with the same outputs as
  penalized_value_and_grad: the gradient norms are logged but not penalized."""
  perturbations = zero_perturbations(apply_fn, params, batch_stats, batch["image"])
  (grad_w, grad_a), (loss, (new_batch_stats, logits)) = task_gradients(
      params, perturbations, batch_stats, batch, apply_fn)
  _, terms = objective_and_terms(loss, grad_w, grad_a, Penalty())
  return (loss, (new_batch_stats, logits, terms)), grad_w


def kurtosis_penalty(params: PyTree) -> jax.Array:
  """KURE (Shkolnik et al., NeurIPS 2020): mean over kernels of (kurtosis(W_l) - 1.8)^2.

  Pushes each layer's weights towards a uniform distribution, which a uniform
  quantizer represents with less error than a peaked, heavy-tailed one.
  """
  def excess(w):
    centered = w - jnp.mean(w)
    variance = jnp.mean(jnp.square(centered))
    kurtosis = jnp.mean(centered**4) / jnp.square(variance + 1e-12)
    return jnp.square(kurtosis - UNIFORM_KURTOSIS)

  layers = kernels(params)
  return sum((excess(w) for w in layers), jnp.zeros(())) / max(len(layers), 1)
