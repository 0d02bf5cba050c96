"""The bound-aware penalty (qreg.bound, reg.form) against independent computations: a naive
per-channel loop, finite differences, the loss increase of an actual worst-case perturbation,
and the rescalings it must be (and the uniform penalty is not) invariant to."""
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qreg import bound, objectives, quant
from qreg import config as config_lib
from qreg.models import BN_EPSILON
from tests.conftest import latest_state
from tests.test_objectives import MODEL, SHAPE, SmoothMLP

FOLDED = MODEL.clone(folded=True)


def _problem(model=MODEL, seed=0):
  """float64 params, running statistics away from their initial values, a batch."""
  rng = np.random.default_rng(seed)
  variables = model.init(jax.random.key(seed), jnp.zeros(SHAPE), train=False)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables["params"])
  params = jax.tree.map(lambda v: v + 0.2 * jnp.asarray(rng.normal(size=v.shape)), params)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape) if path[-1].key == "var"
                                  else rng.normal(size=v.shape) * 0.3), variables["batch_stats"])
  batch = {"image": jnp.asarray(rng.normal(size=SHAPE)),
           "label": jnp.asarray(rng.integers(0, 3, SHAPE[0]))}
  return params, stats, batch


def _penalty(**kwargs):
  defaults = {"lambda_w": 1.0, "lambda_a": 1.0, "bits": 4, "per_channel": False, "fold": True,
              "differentiate_steps": False, "impl": "nested",
              "folded_apply_fn": FOLDED.apply}
  return bound.BoundPenalty(**{**defaults, **kwargs})


def _value(params, stats, batch, penalty, model=MODEL):
  perturbations = objectives.zero_perturbations(model.apply, params, stats, batch["image"])
  return bound.bound_value(params, stats, batch, model.apply, penalty, perturbations)


def naive_bound(params, stats, batch, bits, per_channel):
  """The folded bound by hand: BatchNorm folded here, each kernel's steps and each tap's range
  read off in numpy, channel by channel."""
  folded = {}
  for name, layer in params.items():
    if "bn" in layer:
      inner = "conv" if "conv" in layer else "dense"
      s = layer["bn"]["scale"] / np.sqrt(stats[name]["bn"]["var"] + BN_EPSILON)
      folded[name] = {inner: {"kernel": layer[inner]["kernel"] * s,
                              "bias": layer["bn"]["bias"] - stats[name]["bn"]["mean"] * s}}
    else:
      folded[name] = layer
  zeros = objectives.zero_perturbations(MODEL.apply, params, stats, batch["image"])

  def loss(folded, perturbations):
    logits = FOLDED.apply({"params": folded, "perturbations": perturbations}, batch["image"],
                          train=False)
    return objectives.cross_entropy(logits, batch["label"])

  grad_w, grad_a = jax.grad(loss, argnums=(0, 1))(folded, zeros)
  qmax_sym, qmax_asym = 2 ** (bits - 1) - 1, 2 ** bits - 1
  weights = 0.0
  for name, layer in folded.items():
    for inner, leaves in layer.items() if "kernel" not in layer else [(None, layer)]:
      kernel = np.asarray(leaves["kernel"])
      grad = np.asarray((grad_w[name][inner] if inner else grad_w[name])["kernel"])
      channels = kernel.shape[-1]
      if per_channel:
        for c in range(channels):
          step = np.max(np.abs(kernel[..., c])) / qmax_sym
          weights += step / 2 * np.sum(np.abs(grad[..., c]))
      else:
        weights += np.max(np.abs(kernel)) / qmax_sym / 2 * np.sum(np.abs(grad))
  _, state = FOLDED.apply({"params": folded}, batch["image"], train=False,
                          capture_intermediates=True, mutable=["intermediates"])
  activations = 0.0
  for name, grads in grad_a.items():
    a = np.asarray(state["intermediates"][name]["__call__"][0])
    low, high = min(a.min(), 0.0), max(a.max(), 0.0)  # the asymmetric grid contains 0
    step = (high - low) / qmax_asym
    activations += step / 2 * np.sum(np.abs(np.asarray(grads["activation"])))
  return weights, activations


@pytest.mark.parametrize("per_channel", [False, True])
def test_bound_equals_a_naive_per_layer_per_channel_loop(per_channel):
  with jax.enable_x64(True):
    params, stats, batch = _problem()
    for bits in (3, 6):
      _, (weights, activations) = _value(params, stats, batch,
                                         _penalty(bits=bits, per_channel=per_channel))
      expected = naive_bound(params, stats, batch, bits, per_channel)
      np.testing.assert_allclose([weights, activations], expected, rtol=1e-10)


@pytest.mark.parametrize("fold", [True, False])
def test_bound_gradient_matches_finite_differences(fold):
  # Differentiated steps: the gradient is the whole derivative of B, so central differences
  # of B check it; the stop-gradient form's is checked through hvp == nested below.
  with jax.enable_x64(True):
    params, stats, batch = _problem(SmoothMLP(), seed=1)
    model = SmoothMLP()
    penalty = _penalty(fold=fold, differentiate_steps=True, lambda_w=0.7, lambda_a=0.4,
                       folded_apply_fn=functools.partial(_smooth_folded_apply, model=model))
    value = lambda p: _value(p, stats, batch, penalty, model)[0]
    grad = jax.grad(value)(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
      eps = 1e-6
      numeric = (value(jax.tree.map(lambda p, d: p + eps * d, params, direction))
                 - value(jax.tree.map(lambda p, d: p - eps * d, params, direction))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                      jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def _smooth_folded_apply(variables, images, *, model, **kwargs):
  """SmoothMLP's folded forward: its DenseBN as a biased dense (SmoothMLP has no folded
  field, so the folded layer is applied through the params' own structure)."""
  params = variables["params"]
  x = images.reshape((images.shape[0], -1))
  taps = variables.get("perturbations") or {}
  fc1 = params["fc1"]["dense"]
  x = jnp.tanh(x @ fc1["kernel"] + fc1["bias"])
  x = x + taps.get("act1", {}).get("activation", 0.0)
  stats = {"act1": x}
  x = jnp.tanh(x @ params["fc2"]["kernel"] + params["fc2"]["bias"])
  x = x + taps.get("act2", {}).get("activation", 0.0)
  stats["act2"] = x
  logits = x @ params["head"]["kernel"] + params["head"]["bias"]
  del model
  sown = {name: {"samples": (jnp.concatenate([a.reshape(-1), jnp.stack([a.min(), a.max()])]),),
                 "symmetric": (jnp.array([False]),)} for name, a in stats.items()}
  if kwargs.get("mutable"):
    return logits, {"activation_stats": sown}
  return logits


@pytest.mark.parametrize("fold,per_channel,differentiate",
                         [(True, False, False), (True, True, True), (False, True, False),
                          (False, False, True)])
def test_hvp_and_finite_difference_match_nested(fold, per_channel, differentiate):
  with jax.enable_x64(True):
    params, stats, batch = _problem()
    penalty = _penalty(fold=fold, per_channel=per_channel, differentiate_steps=differentiate,
                       lambda_w=0.6, lambda_a=0.3)
    nested = bound.penalty_parts(params, stats, batch, MODEL.apply, penalty)
    hvp = bound.penalty_parts(params, stats, batch, MODEL.apply, penalty._replace(impl="hvp"))
    np.testing.assert_allclose(hvp[0], nested[0], rtol=1e-12)
    chex.assert_trees_all_close(hvp[2], nested[2], rtol=1e-9, atol=1e-12)
    fd = bound.penalty_parts(params, stats, batch, MODEL.apply,
                             penalty._replace(impl="finite_difference", fd_step=1e-5))
    np.testing.assert_allclose(fd[0], nested[0], rtol=1e-12)
    # ReLU and max-pool make the gradient jump where the difference crosses a kink (as for the
    # uniform penalty, docs/cost.md): close, not exact.
    error = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(fd[2]),
                                                             jax.tree.leaves(nested[2]))))
    size = np.sqrt(sum(np.sum(b ** 2) for b in jax.tree.leaves(nested[2])))
    assert error < 0.25 * size


def test_bound_predicts_the_loss_increase_of_a_worst_case_perturbation():
  # Moving every folded kernel entry and every tapped activation by half its step, against its
  # gradient's sign, raises the loss by what the bound predicts, to first order: the gap closes
  # as the steps shrink. On the smooth MLP (tanh, no max-pool), whose loss has no kinks.
  with jax.enable_x64(True):
    model = SmoothMLP()
    params, stats, batch = _problem(model, seed=2)
    apply = functools.partial(_smooth_folded_apply, model=model)
    folded = quant.fold_batch_norm(params, stats, BN_EPSILON)
    zeros = objectives.zero_perturbations(model.apply, params, stats, batch["image"])
    loss = lambda f, p: objectives.cross_entropy(apply({"params": f, "perturbations": p},
                                                       batch["image"]), batch["label"])
    grad_w, grad_a = jax.grad(loss, argnums=(0, 1))(folded, zeros)
    _, tap_stats = apply({"params": folded}, batch["image"], mutable=["activation_stats"])
    gaps = []
    for bits in (10, 14, 18):
      for per_channel in (False, True):
        penalty = _penalty(bits=bits, per_channel=per_channel, folded_apply_fn=apply)
        value, _ = _value(params, stats, batch, penalty, model)
        shift_w, shift_a = jax.grad(
            lambda gw, ga: sum(bound.bound_terms(folded, gw, ga, tap_stats["activation_stats"],
                                                 penalty)), argnums=(0, 1))(grad_w, grad_a)
        increase = loss(jax.tree.map(jnp.add, folded, shift_w), shift_a) - loss(folded, zeros)
        gaps.append(abs(float(increase / value) - 1))
    # The gap is second order: each 4 bits more should shrink it ~16x; at least 8x is asserted.
    assert all(gaps[i + 2] < gaps[i] / 8 for i in range(4))
    assert max(gaps[4:]) < 1e-4


def _stats(folded, batch):
  _, state = FOLDED.apply({"params": folded}, batch["image"], train=False,
                          mutable=["activation_stats"])
  return state["activation_stats"]


def _uniform_terms(params, stats, batch):
  """The uniform penalty's per-leaf l1 norms (train mode), by qreg's own task_gradients."""
  zeros = objectives.zero_perturbations(MODEL.apply, params, stats, batch["image"])
  (grad_w, grad_a), (_, (_, logits)) = objectives.task_gradients(params, zeros, stats, batch,
                                                                 MODEL.apply)
  return grad_w, grad_a, logits


def test_rescalings_batchnorm_makes_free_move_the_uniform_terms_but_not_the_bound():
  with jax.enable_x64(True):
    params, stats, batch = _problem()
    s = 2.0
    # 1. A BN-followed kernel scaled by s (the running statistics follow, as training makes them).
    scaled = jax.tree.map(lambda x: x, params)
    scaled["conv2"]["conv"]["kernel"] = s * params["conv2"]["conv"]["kernel"]
    scaled_stats = jax.tree.map(lambda x: x, stats)
    scaled_stats["conv2"]["bn"] = {"mean": s * stats["conv2"]["bn"]["mean"],
                                      "var": s ** 2 * stats["conv2"]["bn"]["var"]}
    # 2. The gamma and beta of the BatchNorm before a tap scaled by s: the tap scales by s and
    # the next BatchNorm's running statistics follow.
    gamma = jax.tree.map(lambda x: x, params)
    gamma["conv1"]["bn"] = {k: s * v for k, v in params["conv1"]["bn"].items()}
    gamma_stats = jax.tree.map(lambda x: x, stats)
    gamma_stats["conv2"]["bn"] = {"mean": s * stats["conv2"]["bn"]["mean"],
                                     "var": s ** 2 * stats["conv2"]["bn"]["var"]}
    grad_w, grad_a, logits = _uniform_terms(params, stats, batch)
    for p, st, in ((scaled, scaled_stats), (gamma, gamma_stats)):
      g_w, g_a, l = _uniform_terms(p, st, batch)
      np.testing.assert_allclose(l, logits, rtol=1e-4, atol=1e-6)  # train mode: the same function
      folded_logits = FOLDED.apply({"params": quant.fold_batch_norm(p, st, BN_EPSILON)},
                                   batch["image"], train=False)
      np.testing.assert_allclose(folded_logits, FOLDED.apply(
          {"params": quant.fold_batch_norm(params, stats, BN_EPSILON)}, batch["image"],
          train=False), rtol=1e-4, atol=1e-6)  # and the same folded (quantized) network
      for per_channel in (False, True):
        penalty = _penalty(per_channel=per_channel)
        np.testing.assert_allclose(_value(p, st, batch, penalty)[1],
                                   _value(params, stats, batch, penalty)[1], rtol=1e-4)
    l1 = lambda x: float(jnp.sum(jnp.abs(x)))
    kernel = lambda g: g["conv2"]["conv"]["kernel"]
    np.testing.assert_allclose(l1(kernel(_uniform_terms(scaled, scaled_stats, batch)[0])),
                               l1(kernel(grad_w)) / s, rtol=1e-4)
    tap = lambda g: g["act1"]["activation"]
    np.testing.assert_allclose(l1(tap(_uniform_terms(gamma, gamma_stats, batch)[1])),
                               l1(tap(grad_a)) / s, rtol=1e-4)


def test_a_scale_moved_across_a_relu_changes_neither_the_quantized_model_nor_the_bound():
  with jax.enable_x64(True):
    params, stats, batch = _problem()
    folded = quant.fold_batch_norm(params, stats, BN_EPSILON)
    s = 4.0  # a power of 2: the quantized model is the same to the last bit
    moved = jax.tree.map(lambda x: x, folded)
    moved["fc1"]["dense"] = {k: s * v for k, v in folded["fc1"]["dense"].items()}
    moved["head"] = {"kernel": folded["head"]["kernel"] / s, "bias": folded["head"]["bias"]}

    def quantized_logits(f):
      qparams = quant.quantize_params(f, 4)
      stats = _stats(qparams, batch)
      ranges = {name: {"min": v["samples"][0][-2], "max": v["samples"][0][-1]}
                for name, v in stats.items()}
      return FOLDED.clone(act_bits=4).apply(
          {"params": qparams, "activation_ranges": ranges}, batch["image"], train=False)

    np.testing.assert_allclose(quantized_logits(moved), quantized_logits(folded), rtol=1e-12,
                               atol=1e-12)
    # The bound on already-folded params: the per-layer view of the folded model.
    penalty = _penalty(fold=False)
    values = [bound.bound_value(f, {}, batch, FOLDED.apply, penalty,
                                objectives.zero_perturbations(FOLDED.apply, f, {},
                                                              batch["image"]))[1]
              for f in (folded, moved)]
    np.testing.assert_allclose(values[1], values[0], rtol=1e-10)


def test_bound_forms_are_checked():
  base = config_lib.base_config()
  base.data.data_dir = "/nonexistent"
  base.reg.lambda_w = base.reg.lambda_a = 1.0
  for overrides, message in [({"reg.form": "exact"}, "reg.form"),
                             ({"reg.form": "bound", "reg.norm": "l2"}, "l1 bound"),
                             ({"reg.form": "bound", "quant.weight_scheme": "asymmetric"},
                              "symmetric absmax"),
                             ({"reg.form": "layer_bound", "qat.weight_bits": 4}, "STE QAT"),
                             ({"reg.form": "bound", "reg.bound_steps": "both"}, "bound_steps"),
                             ({"reg.form": "bound", "reg.bound_bits": 1}, "reg.bound_bits")]:
    with pytest.raises(ValueError, match=message):
      config_lib.validate(config_lib.with_overrides(base, overrides), num_devices=1)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_train_step_adds_the_bound_gradient_to_the_task_gradient(fraction):
  import optax  # pylint: disable=g-import-not-at-top
  from qreg import parallel, train  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    params, stats, batch = _problem()
    penalty = _penalty(impl="hvp", lambda_w=0.5, lambda_a=0.2, per_channel=True)
    optimizer = optax.sgd(0.1)
    state = train.TrainState(step=jnp.int32(0), params=params, batch_stats=stats,
                             opt_state=optimizer.init(params))
    sub_batch = None if fraction == 1 else (3, 1)
    step = train.make_train_step(MODEL.apply, optimizer, penalty, penalty_sub_batch=sub_batch)
    new_state, metrics = step(state, batch)
    task_grad = jax.grad(lambda p: objectives.task_loss(p, None, stats, batch, MODEL.apply)[0])(
        params)
    penalty_batch = batch if sub_batch is None else parallel.leading_per_device(batch, 3, 1)
    value, (weights, _), bound_grad = bound.penalty_parts(
        params, stats, penalty_batch, MODEL.apply, penalty._replace(impl="nested"))
    expected = jax.tree.map(lambda p, g, b: p - 0.1 * (g + b), params, task_grad, bound_grad)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics["bound_weights"], weights, rtol=1e-10)
    np.testing.assert_allclose(metrics["loss"] - metrics["task_loss"], value, rtol=1e-10)


def test_a_bound_run_trains_with_the_lazy_schedules(idx_dir, tmp_path):
  from qreg import main  # pylint: disable=g-import-not-at-top
  from tests.fakes import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir)
  config.reg.form, config.reg.bound_bits = "bound", 3
  config.reg.every_k_steps, config.reg.penalty_batch_fraction = 2, 0.5
  config.reg.bound_steps = "differentiated"
  config.train.log_norms = True
  main.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert any("train/bound_weights" in r for r in records)  # logged on the regularized epoch
  # train.log_norms: the last window's norms are the final checkpoint's, by numpy.
  step, state = latest_state(str(tmp_path / "run"))
  logged = [r for r in records if r["step"] == step and any(k.startswith("norms/") for k in r)][-1]
  params = state["params"]
  expected = {"norms/conv1/conv/kernel": params["conv1"]["conv"]["kernel"],
              "norms/conv1/bn_scale": params["conv1"]["bn"]["scale"],
              "norms/head/kernel": params["head"]["kernel"]}
  for key, array in expected.items():
    np.testing.assert_allclose(logged[key], np.sqrt(np.sum(np.square(np.asarray(array)))),
                               rtol=1e-6)
  assert len([k for k in logged if k.startswith("norms/")]) == 5 + 4  # kernels, BatchNorms


def test_first_steps_replay_a_bound_runs_own_regularized_steps(idx_dir, tmp_path):
  """experiments.bound_first_steps takes the run's own steps: from the checkpoint it warm-started
  at, each regularized step's task loss and bound terms equal what the run logged at that step
  (train.log_every_steps=1); a variant that changes BatchNorm's momentum changes the steps after
  the first (the fold's running statistics), and the momentum is restored after it."""
  from experiments import bound_first_steps  # pylint: disable=g-import-not-at-top
  from qreg import main  # pylint: disable=g-import-not-at-top
  from qreg.models import layers  # pylint: disable=g-import-not-at-top
  from tests.fakes import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir)
  config.reg.form, config.reg.bound_bits = "bound", 4
  config.train.log_every_steps = 1
  workdir = str(tmp_path / "run")
  main.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = {r["step"]: r for r in map(json.loads, f) if "train/task_loss" in r}
  step_dir = bound_first_steps.start_checkpoint(config, workdir)
  first = int(os.path.basename(step_dir))
  rows = bound_first_steps.first_steps(config, step_dir, 3)
  for i, row in enumerate(rows):
    for key in ("task_loss", "bound_weights", "bound_activations", "grad_norm"):
      assert row[key] == logged[first + i + 1][f"train/{key}"], (i, key)
  momentum = layers.BN_MOMENTUM
  moved = bound_first_steps.first_steps(config, step_dir, 2, bn_momentum=0.0)
  assert layers.BN_MOMENTUM == momentum
  assert moved[0] == rows[0]  # the first step folds the checkpoint's running statistics
  assert moved[1]["bound_weights"] != rows[1]["bound_weights"]
