"""The table's baselines (KURE, STE QAT, l2) and the sweep machinery, against independent computations."""
import contextlib
import json
import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from experiments import run_sweep
from qreg import config as config_lib
from qreg import data, main, models, objectives, ptq, quant, train
from qreg.models import SmallCNN
from qreg.models.layers import QuantizedActivation
from tests.fakes import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kurtosis_penalty_matches_scipy_and_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.standard_t(3, size=(5, 7)))},
              "b": {"kernel": jnp.asarray(rng.uniform(-1, 1, size=(40,))), "bias": jnp.ones(3)}}
    expected = np.mean([(scipy.stats.kurtosis(np.ravel(p["kernel"]), fisher=False) - 1.8) ** 2
                        for p in params.values()])
    np.testing.assert_allclose(objectives.kurtosis_penalty(params), expected, rtol=1e-9)
    grad = jax.grad(objectives.kurtosis_penalty)(params)
    np.testing.assert_array_equal(grad["b"]["bias"], 0.0)  # only kernels are penalized
    direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    eps = 1e-6
    shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
    numeric = (objectives.kurtosis_penalty(shifted(1)) - objectives.kurtosis_penalty(shifted(-1))) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def _qat_problem():
  model = SmallCNN(num_classes=3, widths=(4, 6), pool_after=(True, False), hidden=8)
  keys = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(keys[1], (6, 8, 8, 1))
  variables = model.init(keys[0], images, train=False)
  labels = jax.random.randint(keys[2], (6,), 0, 3)
  return model, variables, images, labels


def test_qat_forward_uses_fake_quantized_kernels():
  model, variables, images, _ = _qat_problem()
  apply_fn = train.quantization_aware_apply_fn(model, 4, None, ptq.QuantSetup())
  qparams = quant.quantize_params(variables["params"], 4)
  np.testing.assert_allclose(apply_fn(variables, images, train=False),
                             model.apply({**variables, "params": qparams}, images, train=False),
                             rtol=1e-6, atol=1e-6)


def test_activation_straight_through_quantizes_with_the_batch_range():
  tap = QuantizedActivation(bits=3, straight_through=True)
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
  out = tap.apply({}, x)
  np.testing.assert_allclose(out, quant.quantize_activation(x, x.min(), x.max(), 3, "asymmetric"),
                             rtol=1e-6, atol=1e-7)
  assert len(np.unique(np.asarray(out))) <= 2**3
  weights = jax.random.normal(jax.random.key(1), x.shape)
  grad = jax.grad(lambda x: jnp.sum(weights * tap.apply({}, x)))(x)
  np.testing.assert_allclose(grad, weights, rtol=1e-6)  # the identity's gradient


def test_qat_gradient_is_straight_through():
  """d/dW L(q(W)) under the STE is dL/dW' evaluated at W' = q(W) (the identity's Jacobian)."""
  model, variables, images, labels = _qat_problem()
  apply_fn = train.quantization_aware_apply_fn(model, 3, None, ptq.QuantSetup())
  loss = lambda p, fn: objectives.cross_entropy(
      fn({**variables, "params": p}, images, train=False), labels)
  got = jax.grad(loss)(variables["params"], apply_fn)
  qparams = quant.quantize_params(variables["params"], 3)
  expected = jax.grad(loss)(qparams, model.apply)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)


def test_method_config_validation(tmp_path):
  config = tiny_config(str(tmp_path))
  model = SmallCNN()
  optimizer = train.build_optimizer(config.optim, 10, 5)
  for field, value, message in [("reg.norm", "l3", "Unknown reg.norm"),
                                ("reg.lambda_kurtosis", -1.0, "lambda_kurtosis"),
                                ("qat.weight_bits", 1, r"qat.weight_bits=1")]:
    bad = tiny_config(str(tmp_path))
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(bad, num_devices=1)
  config.reg.lambda_w = config.reg.lambda_a = 0.0
  assert train.build_method_steps(config, model, optimizer, 1) is None  # no method: plain throughout


class _RealFs:
  """tfds.testing's MockFs minus the mock: the one file TFDS asks for is written for real.

  MockFs redirects every file access of the process while TFDS opens a dataset, which races
  with orbax's checkpoint writes and the other thread's reads (the prefetch thread starts the
  next epoch while the main thread evaluates).
  """

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    return False

  def add_file(self, path, content=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(content or "")


@contextlib.contextmanager
def _mock_tfds(data_dir):
  """tfds.testing.mock_data, 8 random examples a split, safe for several threads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with mock.patch("tensorflow_datasets.testing.test_utils.MockFs", _RealFs), \
      tfds.testing.mock_data(num_examples=8, data_dir=data_dir):
    yield


def _train_metrics(workdir):
  """{step: the train/ metrics logged after it}, from metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  return {int(m["step"]): {k.removeprefix("train/"): v for k, v in m.items()}
          for m in logged if "train/loss" in m}


@pytest.mark.parametrize("table,run_name", [("cifar10_vgg", "l1/seed0"),
                                            ("cifar10_vgg", "ste-qat@4/seed0"),
                                            ("imagenet_resnet18", "kure/seed0")])
def test_paper_table_methods_act_on_mock_tfds_data(tmp_path, table, run_name):
  """A paper-table run through the real TFDS path on mock data, 2 steps of the method: its
  logged objective holds the method's term, and STE QAT's loss is the quantized model's."""
  sweep = run_sweep.load_sweep(os.path.join(REPO, "configs", "tables", f"paper.py:net={table}"))
  config = sweep.config(sweep.run(run_name))
  config.model.width = 0.125  # the full width's code path, at a fraction of its cost
  config.data.download = True  # the mock prepares nothing and fetches nothing
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.image_size = 32
  config.data.batch_size = config.eval.batch_size = 4
  config.train.num_epochs, config.reg.start_epoch, config.train.log_every_steps = 1, 0, 1
  config.quant.bit_settings = [(None, None), (4, 4)]
  config.quant.num_calibration_batches = 1
  workdir = str(tmp_path / "run")
  with _mock_tfds(str(tmp_path / "mock")):
    pipeline = data.build_input_pipeline(config.data)
    results = main.train_and_evaluate(config, workdir, pipeline=pipeline)
    first_batch = next(pipeline.train_batches(config.data.batch_size, config.seed))
  assert [(r["weight_bits"], r["act_bits"]) for r in results["rows"]] == [(None, None), (4, 4)]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])

  method, reg = run_name.split("/")[0], config.reg
  logged = _train_metrics(workdir)
  assert sorted(logged) == [1, 2]
  for step, m in logged.items():
    assert (m["penalty_applied"], m["lambda_w_applied"], m["lambda_a_applied"]) == pytest.approx(
        (1.0, reg.lambda_w, reg.lambda_a) if method == "l1" else (0.0, 0.0, 0.0)), (step, m)
    assert m["grad_l1_weights"] > 0 and m["grad_l1_activations"] > 0
    assert ("kurtosis_penalty" in m) == (method == "kure"), (step, m)
    expected = (m["task_loss"] + m["lambda_w_applied"] * m["grad_l1_weights"]
                + m["lambda_a_applied"] * m["grad_l1_activations"]
                + reg.lambda_kurtosis * m.get("kurtosis_penalty", 0.0))
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-5, err_msg=str(step))
    if method != "ste-qat@4":
      assert m["loss"] > m["task_loss"] * (1 + 1e-4), (step, m)  # the term weighs

  if method == "ste-qat@4":
    # Step 1 starts from the initial parameters (jax.random.key(seed)): its logged task loss is
    # the fake-quantized model's on the first batch, not the float model's.
    model = models.build_model(config.model, pipeline.info.num_classes)
    qat_apply = train.quantization_aware_apply_fn(model, 4, 4, ptq.build_quant_setup(config.quant))

    @jax.jit  # eager takes longer than compiling
    def first_losses(batch):
      v = model.init(jax.random.key(config.seed), jnp.zeros((1, *pipeline.info.image_shape)),
                     train=False)
      return [objectives.task_loss(v["params"], None, v["batch_stats"], batch, apply)[0]
              for apply in (qat_apply, model.apply)]

    qat_loss, plain_loss = map(float, first_losses(first_batch))
    np.testing.assert_allclose(logged[1]["task_loss"], qat_loss, rtol=1e-4)
    assert abs(qat_loss - plain_loss) > 1e-3 * plain_loss, (qat_loss, plain_loss)
