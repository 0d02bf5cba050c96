"""The training objective: task loss plus the gradient-l1 penalty.

    L_task + lambda_w * sum_l ||dL/dW_l||_1 + lambda_a * sum_l ||dL/da_l||_1

(Alizadeh et al., ICLR 2020, eq. 5). A quantizer with step delta moves each
value by at most delta/2, so to first order it changes the loss by at most
(delta/2) * ||grad||_1; penalizing that norm makes the float weights robust to
quantization at any bit-width. W_l are the conv/dense kernels, a_l the
activations tapped by `QuantizedActivation` (their gradient is the gradient
w.r.t. the zero `perturbations` collection). The penalty's own gradient needs
the derivative of a gradient: here by nested reverse-mode (double backprop).

Everything here takes an `apply_fn` and pytrees, never a config.
"""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qreg import quant

PyTree = Any
ApplyFn = Callable[..., Any]


class Penalty(NamedTuple):
  """Weights of the two gradient-l1 terms; zero switches a term off."""
  lambda_w: float = 0.0
  lambda_a: float = 0.0


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def l1_norm(tree: PyTree) -> jax.Array:
  return sum((jnp.sum(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)), jnp.zeros(()))


def kernels(params: PyTree) -> list[jax.Array]:
  """The conv/dense kernels of a params tree: the W_l the weight penalty sums over."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [leaf for path, leaf in leaves if quant.is_kernel(quant.path_names(path), leaf)]


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


def penalized_loss(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
                   apply_fn: ApplyFn, penalty: Penalty):
  """Task loss plus the gradient-l1 penalty; returns total, (new_batch_stats, logits, terms).

  The inner value_and_grad gives dL/dW and dL/da in one backward pass; the
  caller differentiates this function again (double backprop). BatchNorm
  statistics come out of the single forward pass, so they update once a step.
  """
  perturbations = zero_perturbations(apply_fn, params, batch_stats, batch["image"])
  (loss, (new_batch_stats, logits)), (grad_w, grad_a) = jax.value_and_grad(
      task_loss, argnums=(0, 1), has_aux=True)(params, perturbations, batch_stats, batch, apply_fn)
  penalty_w = l1_norm(kernels(grad_w))
  penalty_a = l1_norm(grad_a)
  total = loss + penalty.lambda_w * penalty_w + penalty.lambda_a * penalty_a
  terms = {"task_loss": loss, "grad_l1_weights": penalty_w, "grad_l1_activations": penalty_a}
  return total, (new_batch_stats, logits, terms)


def plain_loss(params: PyTree, batch_stats: PyTree, batch: dict[str, jax.Array],
               apply_fn: ApplyFn):
  """The unregularized objective, with the same outputs as penalized_loss (no penalty terms)."""
  loss, (new_batch_stats, logits) = task_loss(params, None, batch_stats, batch, apply_fn)
  return loss, (new_batch_stats, logits, {"task_loss": loss})
