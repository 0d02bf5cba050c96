"""Multi-bit QAT (qat.bit_set): the widths drawn per step, its quantized forward against an
explicit fake quantization, and resuming mid-epoch."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qreg import config as config_lib
from qreg import main, objectives, ptq, train
from qreg.models import SmallCNN
from tests.conftest import assert_trees_bit_identical, latest_state
from tests.fakes import tiny_config

BIT_SET = (2, 3, 4, 5, 6, 8)


def test_the_widths_drawn_at_a_step_are_a_function_of_the_step():
  draw = jax.jit(train.drawn_bit_indices, static_argnums=(2, 3))
  steps = range(300)
  first = [tuple(np.asarray(draw(0, jnp.int32(s), len(BIT_SET), 2))) for s in steps]
  again = [tuple(np.asarray(train.drawn_bit_indices(0, s, len(BIT_SET), 2))) for s in reversed(steps)]
  assert first == again[::-1]  # the same draw whatever came before, jitted or not
  assert all(a != b for a, b in first)  # distinct widths within a step
  counts = np.bincount(np.ravel(first), minlength=len(BIT_SET))
  assert counts.min() > 0.6 * counts.mean()  # every width drawn, about equally often
  other_seed = [tuple(np.asarray(draw(1, jnp.int32(s), len(BIT_SET), 2))) for s in steps]
  assert other_seed != first


def explicit_quantized_loss(model, params, batch_stats, batch, bits):
  """The task loss at W = A = bits, with every kernel fake-quantized here by hand (symmetric,
  per tensor: integers in [-(2^(b-1) - 1), 2^(b-1) - 1]) and the activations by the model's
  taps at each batch's min-max range."""
  def fake_quantize(path, leaf):
    if path[-1].key != "kernel":
      return leaf
    scale = jnp.max(jnp.abs(leaf)) / (2 ** (bits - 1) - 1)
    return jnp.round(leaf / scale) * scale

  quantized = jax.tree_util.tree_map_with_path(fake_quantize, params)
  logits, _ = model.clone(act_bits=bits, act_scheme="asymmetric", act_straight_through=True).apply(
      {"params": quantized, "batch_stats": batch_stats}, batch["image"], train=True,
      mutable=["batch_stats"])
  return objectives.cross_entropy(logits, batch["label"])


@pytest.mark.parametrize("seed", [0, 3])
def test_the_step_trains_the_fake_quantized_model_at_the_drawn_width(seed):
  model = SmallCNN(widths=(4, 4, 4), hidden=8)
  optimizer = optax.sgd(0.1)
  state = train.create_train_state(jax.random.key(0), model, optimizer, (28, 28, 1))
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8))}
  setup = ptq.build_quant_setup(config_lib.base_config().quant)
  for s in (0, 1, 2):
    (bits,) = train.drawn_widths(seed, s, BIT_SET, 1)
    assert bits == BIT_SET[int(train.drawn_bit_indices(seed, s, len(BIT_SET), 1)[0])]
    step = jax.jit(train.make_multibit_train_step(model, optimizer, (bits,), setup))
    _, metrics = step(state, batch)
    assert float(metrics["qat_bits"]) == bits
    expected = explicit_quantized_loss(model, state.params, state.batch_stats, batch, bits)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)


def test_two_widths_a_step_average_their_losses():
  model = SmallCNN(widths=(4, 4, 4), hidden=8)
  optimizer = optax.sgd(0.0)
  state = train.create_train_state(jax.random.key(1), model, optimizer, (28, 28, 1))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8))}
  setup = ptq.build_quant_setup(config_lib.base_config().quant)
  first, second = train.drawn_widths(0, 0, BIT_SET, 2)
  _, metrics = jax.jit(train.make_multibit_train_step(model, optimizer, (first, second), setup))(
      state, batch)
  # The second width's forward sees the BatchNorm statistics the first one updated; in train
  # mode the batch's own statistics normalize, so both losses are the plain ones.
  expected = np.mean([explicit_quantized_loss(model, state.params, state.batch_stats, batch, b)
                      for b in (first, second)])
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_resuming_mid_epoch_is_bit_identical(idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.reg.lambda_w = config.reg.lambda_a = 0.0
  config.qat.bit_set, config.qat.bits_per_step = (2, 4, 8), 2
  config.train.checkpoint_every_steps = 4
  whole = str(tmp_path / "whole")
  main.train_and_evaluate(config, whole)
  # A run stopped at step 12, in the middle of the multi-bit epoch (8 steps an epoch), resumes.
  resumed = str(tmp_path / "resumed")
  os.makedirs(os.path.join(resumed, "checkpoints"))
  shutil.copytree(os.path.join(whole, "checkpoints", "12"),
                  os.path.join(resumed, "checkpoints", "12"))
  main.train_and_evaluate(config, resumed)
  (step, expected), (resumed_step, actual) = latest_state(whole), latest_state(resumed)
  assert step == resumed_step == 16
  assert_trees_bit_identical(actual, expected)


def test_multibit_config_is_checked(tmp_path):
  config = config_lib.base_config()
  config.data.data_dir = str(tmp_path)
  config.reg.lambda_w = config.reg.lambda_a = 0.0
  for overrides, message in [({"qat.bit_set": (4, 4)}, "each bit-width once"),
                             ({"qat.bit_set": (1, 4)}, "qat.bit_set entry"),
                             ({"qat.bit_set": (2, 4), "qat.bits_per_step": 3}, "exceeds the 2"),
                             ({"qat.bit_set": (2, 4), "reg.lambda_a": 0.01}, "reg.lambda_a"),
                             ({"qat.bit_set": (2, 4), "qat.weight_bits": 4}, "qat.weight_bits")]:
    with pytest.raises(ValueError, match=message):
      config_lib.validate(config_lib.with_overrides(config, overrides), num_devices=1)
  config_lib.validate(config_lib.with_overrides(config, {"qat.bit_set": (2, 4)}), num_devices=1)
