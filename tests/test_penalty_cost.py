"""Cheaper penalties: on a sub-batch and on one step in k, against independent computations;
resuming a lazy run bit-identically; the penalty's gradient computed in bfloat16."""
import functools
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qreg import main, models, objectives, parallel, ptq, train
from qreg.models import SmallCNN
from tests.conftest import assert_trees_bit_identical, latest_state
from tests.fakes import tiny_config
from tests.test_objectives import MODEL, SmoothMLP, _flat, _problem, explicit_penalty


@pytest.mark.parametrize("impl", ["nested", "hvp"])
def test_sub_batch_gradient_is_task_on_batch_plus_penalty_on_sub_batch(impl):
  with jax.enable_x64(True):
    params, stats, batch = _problem(jnp.float64)
    sub = {k: v[:2] for k, v in batch.items()}
    penalty = objectives.Penalty(0.3, 0.4, impl)
    task = lambda p: objectives.task_loss(p, None, stats, batch, MODEL.apply)[0]
    expected = jax.grad(lambda p: task(p) + explicit_penalty(p, stats, sub, penalty))(params)
    (total, (new_stats, _, terms)), grads = objectives.penalized_value_and_grad(
        params, stats, batch, MODEL.apply, penalty, penalty_batch=sub)
    chex.assert_trees_all_close(grads, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        total, task(params) + explicit_penalty(params, stats, sub, penalty), rtol=1e-12)
    np.testing.assert_allclose(terms["task_loss"], task(params), rtol=1e-12)
    # Running BatchNorm statistics come from the whole batch, as in the plain step.
    (_, (plain_stats, _, _)), _ = objectives.plain_value_and_grad(params, stats, batch,
                                                                  MODEL.apply)
    chex.assert_trees_all_close(new_stats, plain_stats, rtol=1e-12)


def test_sub_batch_finite_difference_tends_to_the_exact_sub_batch_gradient():
  with jax.enable_x64(True):
    model = SmoothMLP()
    params, stats, batch = _problem(jnp.float64, model=model)
    sub = {k: v[:3] for k, v in batch.items()}
    grads = lambda penalty: _flat(objectives.penalized_value_and_grad(
        params, stats, batch, model.apply, penalty, penalty_batch=sub)[1])
    exact = grads(objectives.Penalty(0.2, 0.5, "hvp"))
    approximate = grads(objectives.Penalty(0.2, 0.5, "finite_difference", fd_step=1e-5))
    assert jnp.linalg.norm(approximate - exact) / jnp.linalg.norm(exact) < 1e-3


def test_sub_batch_is_the_head_of_each_devices_shard():
  """A step on 2 devices with half of each shard penalized equals a one-device step whose
  penalty batch is examples 0-1 and 3-4 of the 6, picked here by hand."""
  params, stats, batch = _problem()
  optimizer = optax.sgd(0.1, momentum=0.9)
  penalty = objectives.Penalty(0.2, 0.3)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=optimizer.init(params))
  mesh = parallel.make_mesh(jax.devices()[:2])
  step = train.jit_train_step(train.make_train_step(MODEL.apply, optimizer, penalty,
                                                    penalty_sub_batch=(2, 2)), mesh, state)
  # The step donates its state: it gets a copy.
  sharded, metrics = step(jax.tree.map(jnp.copy, state), parallel.global_batch(
      {k: np.asarray(v) for k, v in batch.items()}, mesh))

  picked = {k: v[np.array([0, 1, 3, 4])] for k, v in batch.items()}
  (_, (_, _, terms)), grads = objectives.penalized_value_and_grad(
      params, stats, batch, MODEL.apply, penalty, penalty_batch=picked)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  chex.assert_trees_all_close(sharded.params, optax.apply_updates(params, updates), rtol=1e-5,
                              atol=1e-6)
  np.testing.assert_allclose(metrics["grad_l1_weights"], terms["grad_l1_weights"], rtol=1e-5)
  assert metrics["penalty_applied"] == 1.0


def test_lazy_penalty_lambdas_are_k_times_the_configs():
  config = tiny_config("/unused")
  config.reg.lambda_w, config.reg.lambda_a, config.reg.every_k_steps = 0.01, 0.1, 4
  penalty = train.build_penalty(config.reg)
  assert (penalty.lambda_w, penalty.lambda_a) == pytest.approx((0.04, 0.4))


@pytest.mark.parametrize("overrides,between", [({}, False), ({"lambda_kurtosis": 0.1}, True)])
def test_step_kinds_follow_the_step_number(overrides, between):
  config = tiny_config("/unused")
  config.reg.every_k_steps = 3
  config.reg.update(overrides)
  optimizer = train.build_optimizer(config.optim, 10, 5)
  method = train.build_method_steps(config, MODEL, optimizer, num_devices=1)
  assert (method.between is not None) == between
  kinds = [train.step_kind(step, 4, method) for step in range(12)]
  other = "between" if between else "plain"
  assert kinds == ["plain"] * 4 + ["regularized", other, other] * 2 + ["regularized", other]


def _lazy_config(idx_dir):
  config = tiny_config(idx_dir)
  config.reg.every_k_steps = 3
  config.reg.penalty_batch_fraction = 0.5
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 5
  config.train.checkpoints_to_keep = 10
  config.quant.bit_settings = [(None, None)]
  return config


def test_lazy_sub_batch_run_logs_its_steps_and_resumes_bit_identically(idx_dir, tmp_path):
  config = _lazy_config(idx_dir)
  straight = str(tmp_path / "straight")
  main.train_and_evaluate(config, straight)
  with open(os.path.join(straight, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  applied = {int(m["step"]): m["train/penalty_applied"] for m in logged
             if "train/penalty_applied" in m}
  # 8 steps an epoch, the penalty from step 8 (the 9th step) on, one step in 3.
  assert [step for step, value in sorted(applied.items()) if value] == [9, 12, 15]
  lambdas = {int(m["step"]): m["train/lambda_a_applied"] for m in logged
             if "train/lambda_a_applied" in m}
  assert lambdas[12] == pytest.approx(3 * config.reg.lambda_a) and lambdas[13] == 0.0

  # Resumed from step 10, between two penalized steps.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  for step in ("15", "16"):
    shutil.rmtree(os.path.join(resumed, "checkpoints", step))
  os.remove(os.path.join(resumed, "results.json"))
  main.train_and_evaluate(config, resumed)
  (step, expected), (resumed_step, actual) = latest_state(straight), latest_state(resumed)
  assert step == resumed_step == 16
  assert_trees_bit_identical(actual, expected)


def _cosine_and_relative_error(actual, expected):
  actual, expected = (np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                                      for leaf in jax.tree.leaves(tree)])
                      for tree in (actual, expected))
  return (actual @ expected / np.linalg.norm(actual) / np.linalg.norm(expected),
          np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_bfloat16_penalty_gradient_is_as_close_to_float32_as_the_task_gradient():
  """model.dtype='bfloat16' (float32 params): the penalty's gradient against float32's.

  bfloat16 keeps 8 significant bits (unit roundoff 2**-9), so every gradient of a
  bfloat16 forward pass is off by a few percent; bfloat16 training accepts that for the
  task gradient. The penalty's gradient (a Hessian-vector product along the signs of the
  bfloat16 gradients, where a sign can flip) must not be much worse: here within twice the
  task gradient's relative error, and still pointing the same way (cosine >= 0.99).
  Measured on this SmallCNN: cosine 0.9993, relative error 3.8% (task gradient 4.3%); on
  VGG-like and ResNet-18 at width 1/8, cosines 0.995 and errors ~10% (task gradient 16-20%).
  """
  model = SmallCNN()
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(64, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=64))}
  variables = model.init(jax.random.key(0), batch["image"][:1], train=False)
  penalty = objectives.Penalty(0.001, 0.01)
  parts = {}
  for dtype in ("float32", "bfloat16"):
    apply_fn = models.with_compute_dtype(model, dtype).apply
    _, task_grad, penalty_grad = jax.jit(functools.partial(
        objectives.hvp_parts, apply_fn=apply_fn, penalty=penalty))(
            variables["params"], variables["batch_stats"], batch)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(penalty_grad))
    parts[dtype] = task_grad, penalty_grad
  _, task_error = _cosine_and_relative_error(parts["bfloat16"][0], parts["float32"][0])
  cosine, penalty_error = _cosine_and_relative_error(parts["bfloat16"][1], parts["float32"][1])
  assert 1e-3 < task_error < 0.1  # bfloat16 did compute, and only rounded
  assert cosine >= 0.99 and penalty_error <= 2 * task_error, (cosine, penalty_error, task_error)


def _layer_dtypes(model, variables, image_shape):
  """The dtypes of every layer's output in the model's eval-mode forward pass (shapes only)."""
  _, state = jax.eval_shape(lambda: model.apply(
      variables, jnp.zeros((1, *image_shape)), train=False, capture_intermediates=True,
      mutable=["intermediates"]))
  return {leaf.dtype for leaf in jax.tree.leaves(state["intermediates"])}


def test_bfloat16_run_keeps_float32_state_and_sweeps_in_float32(idx_dir, tmp_path, monkeypatch):
  config = tiny_config(idx_dir)
  config.model.dtype = "bfloat16"
  config.quant.bit_settings = [(None, None)]
  swept_models = []
  sweep = ptq.sweep

  def recording_sweep(config, setup, model, *args):
    swept_models.append(model)
    return sweep(config, setup, model, *args)

  monkeypatch.setattr(ptq, "sweep", recording_sweep)
  results = main.train_and_evaluate(config, str(tmp_path / "run"))
  _, state = latest_state(str(tmp_path / "run"))
  assert {leaf.dtype for leaf in jax.tree.leaves(state)} <= {np.dtype("float32"),
                                                              np.dtype("int32")}
  assert 0.0 <= results["rows"][0]["accuracy"] <= 1.0
  # The model the sweep measured computes every layer in float32; training's, in bfloat16.
  [model] = swept_models
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  assert _layer_dtypes(model, variables, (28, 28, 1)) == {jnp.dtype("float32")}
  assert jnp.dtype("bfloat16") in _layer_dtypes(models.with_compute_dtype(model, "bfloat16"),
                                                variables, (28, 28, 1))
