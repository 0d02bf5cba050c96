"""The gradient-l1 penalty and the train step, against independent computations."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qreg import objectives, parallel, train
from qreg.models import SmallCNN
from qreg.models.layers import DenseBN, QuantizedActivation

MODEL = SmallCNN(num_classes=3, widths=(3, 4), pool_after=(True, False), hidden=5)
SHAPE = (6, 8, 8, 1)


class SmoothMLP(nn.Module):
  """Tanh and no max-pool: a loss smooth in params and activations, unlike SmallCNN's."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = QuantizedActivation(name="act1")(jnp.tanh(DenseBN(7, name="fc1")(x, train)))
    x = QuantizedActivation(name="act2")(jnp.tanh(nn.Dense(5, name="fc2")(x)))
    return nn.Dense(3, name="head")(x)


def _problem(dtype=jnp.float32, seed=0, model=MODEL):
  keys = jax.random.split(jax.random.key(seed), 3)
  variables = model.init(keys[0], jnp.zeros(SHAPE, dtype), train=False)
  params = jax.tree.map(lambda v: v.astype(dtype), variables["params"])
  stats = jax.tree.map(lambda v: v.astype(dtype), variables["batch_stats"])
  batch = {"image": jax.random.normal(keys[1], SHAPE, dtype),
           "label": jax.random.randint(keys[2], (SHAPE[0],), 0, 3)}
  return params, stats, batch


def explicit_penalty(params, stats, batch, penalty):
  """lambda_w sum|dL_b/dW| + lambda_a sum|dL_b/da| on batch b, by double backprop written here."""
  images = batch["image"]
  _, shapes = jax.eval_shape(lambda: MODEL.apply(
      {"params": params, "batch_stats": stats}, images, train=True,
      mutable=["batch_stats", "perturbations"]))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])

  def loss(params, perturbations):
    logits, _ = MODEL.apply({"params": params, "batch_stats": stats,
                             "perturbations": perturbations}, images, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  grad_w, grad_a = jax.grad(loss, argnums=(0, 1))(params, zeros)
  weights = sum(jnp.sum(jnp.abs(g)) for path, g in jax.tree_util.tree_leaves_with_path(grad_w)
                if path[-1].key == "kernel")
  activations = sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grad_a))
  return penalty.lambda_w * weights + penalty.lambda_a * activations


def _loss(params, stats, batch, penalty):
  return objectives.penalized_loss(params, stats, batch, MODEL.apply, penalty)[0]


@pytest.mark.parametrize("penalty", [objectives.Penalty(0.3, 0.0), objectives.Penalty(0.0, 0.3),
                                     objectives.Penalty(0.2, 0.5),
                                     objectives.Penalty(0.2, 0.5, norm="l2")])
def test_penalized_gradient_matches_central_differences(penalty):
  with jax.enable_x64(True):
    params, stats, batch = _problem(jnp.float64)
    loss = functools.partial(_loss, stats=stats, batch=batch, penalty=penalty)
    grad = jax.grad(loss)(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
      eps = 1e-6
      plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
      minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
      numeric = (loss(plus) - loss(minus)) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                      jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_weight_penalty_gradient_is_hessian_times_sign_by_jvp():
  """d/dW sum|dL/dW_k| = H . sign(dL/dW) restricted to kernels: forward-over-reverse, independently."""
  with jax.enable_x64(True):
    params, stats, batch = _problem(jnp.float64)
    task = lambda p: objectives.task_loss(p, None, stats, batch, MODEL.apply)[0]
    grad_task = jax.grad(task)
    g = grad_task(params)
    is_kernel = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", g)
    signs = jax.tree.map(lambda gi, k: jnp.sign(gi) if k else jnp.zeros_like(gi), g, is_kernel)
    _, hvp = jax.jvp(grad_task, (params,), (signs,))
    lam = 0.7
    expected = jax.tree.map(lambda a, b: a + lam * b, g, hvp)
    got = jax.grad(_loss)(params, stats, batch, objectives.Penalty(lam, 0.0))
    chex.assert_trees_all_close(got, expected, rtol=1e-9, atol=1e-12)


def test_activation_gradients_match_explicit_perturbation_differences():
  """The penalized dL/da equals a finite difference of the loss w.r.t. one activation entry."""
  with jax.enable_x64(True):
    params, stats, batch = _problem(jnp.float64)
    zeros = objectives.zero_perturbations(MODEL.apply, params, stats, batch["image"])
    loss = lambda pert: objectives.task_loss(params, pert, stats, batch, MODEL.apply)[0]
    grads = jax.grad(loss)(zeros)
    _, (_, _, terms) = objectives.penalized_loss(params, stats, batch, MODEL.apply,
                                                  objectives.Penalty(0.0, 1.0))
    np.testing.assert_allclose(terms["grad_l1_activations"], objectives.l1_norm(grads), rtol=1e-12)
    leaf_path = ("act1", "activation")
    index = (1, 2, 3, 0)
    bump = lambda eps: jax.tree_util.tree_map_with_path(
        lambda path, z: z.at[index].add(eps) if tuple(k.key for k in path) == leaf_path else z, zeros)
    eps = 1e-6
    numeric = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
    np.testing.assert_allclose(grads["act1"]["activation"][index], numeric, rtol=1e-5, atol=1e-10)


def test_penalty_terms_are_the_l1_norms_of_the_gradients():
  params, stats, batch = _problem()
  _, (_, _, terms) = objectives.penalized_loss(params, stats, batch, MODEL.apply,
                                               objectives.Penalty(1.0, 1.0))
  g = jax.grad(lambda p: objectives.task_loss(p, None, stats, batch, MODEL.apply)[0])(params)
  expected = sum(np.abs(np.asarray(leaf)).sum() for path, leaf in
                 jax.tree_util.tree_leaves_with_path(g) if path[-1].key == "kernel")
  np.testing.assert_allclose(terms["grad_l1_weights"], expected, rtol=1e-5)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.mark.parametrize("penalty", [objectives.Penalty(0.3, 0.0), objectives.Penalty(0.0, 0.3),
                                     objectives.Penalty(0.2, 0.5),
                                     objectives.Penalty(0.2, 0.5, norm="l2")])
def test_hvp_equals_nested(penalty):
  with jax.enable_x64(True):
    params, stats, batch = _problem(jnp.float64)
    (total, aux), grads = objectives.penalized_value_and_grad(
        params, stats, batch, MODEL.apply, penalty._replace(impl="hvp"))
    (ref_total, ref_aux), ref_grads = objectives.penalized_value_and_grad(
        params, stats, batch, MODEL.apply, penalty._replace(impl="nested"))
    np.testing.assert_allclose(total, ref_total, rtol=1e-12)
    chex.assert_trees_all_close(aux, ref_aux, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lambda_w,lambda_a", [(0.3, 0.0), (0.0, 0.3), (0.2, 0.5)])
def test_finite_difference_tends_to_nested_as_the_step_shrinks(lambda_w, lambda_a):
  """First order in the step on a smooth model: each 10x smaller step, about 10x less error."""
  with jax.enable_x64(True):
    model = SmoothMLP()
    params, stats, batch = _problem(jnp.float64, model=model)
    penalty = objectives.Penalty(lambda_w, lambda_a)
    value_and_grad = lambda penalty: objectives.penalized_value_and_grad(
        params, stats, batch, model.apply, penalty)
    (ref_total, ref_aux), ref_grads = value_and_grad(penalty._replace(impl="nested"))
    ref_grads = _flat(ref_grads)
    errors = []
    for step in (1e-3, 1e-4, 1e-5):
      (total, aux), grads = value_and_grad(penalty._replace(impl="finite_difference", fd_step=step))
      np.testing.assert_allclose(total, ref_total, rtol=1e-12)
      chex.assert_trees_all_close(aux, ref_aux, rtol=1e-12)
      errors.append(float(jnp.linalg.norm(_flat(grads) - ref_grads) / jnp.linalg.norm(ref_grads)))
    assert errors[-1] < 1e-3, errors
    for coarse, fine in zip(errors, errors[1:]):
      assert 0.05 < fine / coarse < 0.2, errors


def _one_step(penalty, mesh, seed=0):
  params, stats, batch = _problem(seed=seed)
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=optimizer.init(params))
  step = train.jit_train_step(train.make_train_step(MODEL.apply, optimizer, penalty), mesh, state)
  batch = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
  return step(state, batch)


@pytest.mark.parametrize("impl", objectives.IMPLS)
def test_train_step_compiles_once_per_shape(impl):
  chex.clear_trace_counter()  # chex counts by source location, shared by the parametrized cases
  mesh = parallel.make_mesh(jax.devices()[:1])
  params, stats, batch = _problem()
  optimizer = optax.sgd(0.1)
  # Placed on the mesh like train_and_evaluate's state, so the first call has the steps' types.
  state = jax.device_put(
      train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                       opt_state=optimizer.init(params)), parallel.replicated(mesh))
  train_step = train.make_train_step(MODEL.apply, optimizer, objectives.Penalty(0.1, 0.1, impl))
  step = train.jit_train_step(chex.assert_max_traces(train_step, n=1), mesh, state)
  batch = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
  for _ in range(3):
    state, _ = step(state, batch)


def test_zero_lambda_equals_plain_step():
  mesh = parallel.make_mesh(jax.devices()[:1])
  plain, _ = _one_step(None, mesh)
  zero, metrics = _one_step(objectives.Penalty(0.0, 0.0), mesh)
  chex.assert_trees_all_close(zero.params, plain.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(zero.batch_stats, plain.batch_stats, rtol=1e-6, atol=1e-7)
  assert metrics["grad_l1_weights"] > 0  # the penalty was computed, only weighted by zero


@pytest.mark.parametrize("impl", objectives.IMPLS)
def test_step_metrics_statistics_and_update_match_an_explicit_computation(impl):
  """One step of each impl against the loss, BatchNorm statistics and gradients computed here
  from MODEL.apply alone; the update too where the impl is exact."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  penalty = objectives.Penalty(0.5, 0.5, impl)
  stepped, metrics = _one_step(penalty, mesh)
  params, stats, batch = _problem()

  def task(params):
    logits, updates = MODEL.apply({"params": params, "batch_stats": stats}, batch["image"],
                                  train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), (
        updates["batch_stats"], logits)

  task_loss, (new_stats, logits) = task(params)
  expected = {"task_loss": task_loss,
              "grad_l1_weights": explicit_penalty(params, stats, batch, objectives.Penalty(1.0)),
              "grad_l1_activations": explicit_penalty(params, stats, batch,
                                                      objectives.Penalty(0.0, 1.0)),
              "accuracy": np.mean(np.argmax(logits, -1) == batch["label"])}
  expected["loss"] = task_loss + 0.5 * (expected["grad_l1_weights"]
                                        + expected["grad_l1_activations"])
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
  chex.assert_trees_all_close(stepped.batch_stats, new_stats, rtol=1e-6, atol=1e-7)
  if impl != "finite_difference":  # an approximation, on a ReLU net; its own tests bound it
    grads = jax.grad(lambda p: task(p)[0] + explicit_penalty(p, stats, batch, penalty))(params)
    optimizer = optax.sgd(0.1, momentum=0.9)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    chex.assert_trees_all_close(stepped.params, optax.apply_updates(params, updates),
                                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("penalty", [None, objectives.Penalty(0.1, 0.1)])
def test_one_device_equals_several(penalty):
  assert jax.device_count() >= 2, "conftest should provide several fake CPU devices"
  one, m1 = _one_step(penalty, parallel.make_mesh(jax.devices()[:1]))
  many, m2 = _one_step(penalty, parallel.make_mesh(jax.devices()[:2 if SHAPE[0] % 4 else 4]))
  chex.assert_trees_all_close(many.params, one.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(many.batch_stats, one.batch_stats, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
