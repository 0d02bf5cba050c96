"""Mixed precision (qreg.mixed, ptq.mixed_precision): the budget, the allocation against a brute
force, each sensitivity against an independent computation, and the sweep's rows."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qreg import config as config_lib
from qreg import data, mixed, parallel, ptq, quant
from qreg.models import BN_EPSILON, SmallCNN
from tests.conftest import jit_init
from tests.fakes import fake_split

CHOICES = (2, 3, 4, 6, 8)


def brute_force(sensitivity, sizes, budget, fixed=None):
  """The least total sensitivity over every assignment within the budget, by enumeration."""
  fixed = fixed or {}
  free = [p for p in sizes if p not in fixed]
  best = None
  for bits in itertools.product(*(sorted(sensitivity[p]) for p in free)):
    widths = {**fixed, **dict(zip(free, bits))}
    average = sum(sizes[p] * widths[p] for p in sizes) / sum(sizes.values())
    if average <= budget:
      value = sum(sensitivity[p][b] for p, b in zip(free, bits))
      best = value if best is None else min(best, value)
  return best


def random_toy(seed, num_layers=3):
  rng = np.random.default_rng(seed)
  sizes = {f"l{i}/kernel": int(rng.integers(10, 5000)) for i in range(num_layers)}
  # Decreasing in bits, as sensitivities are, but neither convex nor alike across layers.
  sensitivity = {p: dict(zip(CHOICES, np.sort(rng.exponential(size=len(CHOICES)))[::-1]
                             * rng.exponential()))
                 for p in sizes}
  return sizes, sensitivity


def value_of(widths, sensitivity, fixed=()):
  return sum(sensitivity[p][b] for p, b in widths.items() if p not in fixed)


def test_bit_budget_counts_every_kernel_element():
  sizes = {"a/kernel": 100, "b/kernel": 300, "c/kernel": 600}
  assert quant.bit_budget({"a/kernel": 8, "b/kernel": 2, "c/kernel": 4}, sizes) == (
      (800 + 600 + 2400) / 1000)
  # A float kernel counts 32 bits.
  assert quant.bit_budget({"a/kernel": None, "b/kernel": 2, "c/kernel": 2}, sizes) == (
      (3200 + 1800) / 1000)
  params = {"conv": {"kernel": np.zeros((3, 3, 2, 4)), "bias": np.zeros(4)},
            "head": {"kernel": np.zeros((5, 10))}}
  assert quant.kernel_sizes(params) == {"conv/kernel": 72, "head/kernel": 50}


@pytest.mark.parametrize("seed", range(12))
def test_the_knapsack_is_the_brute_force_optimum_within_the_budget(seed):
  sizes, sensitivity = random_toy(seed)
  for budget in (2.0, 2.6, 3.0, 3.7, 5.0, 8.0):
    widths = mixed.allocate(sensitivity, sizes, budget)
    assert list(widths) == list(sizes)
    assert quant.bit_budget(widths, sizes) <= budget
    np.testing.assert_allclose(value_of(widths, sensitivity),
                               brute_force(sensitivity, sizes, budget), rtol=1e-9)


def test_fixed_kernels_keep_their_bits_and_count_in_the_budget():
  sizes, sensitivity = random_toy(3, num_layers=4)
  first = min(sizes, key=sizes.get)
  fixed = {first: 8}
  for budget in (3.0, 4.5):
    widths = mixed.allocate(sensitivity, sizes, budget, fixed=fixed)
    assert widths[first] == 8 and quant.bit_budget(widths, sizes) <= budget
    np.testing.assert_allclose(value_of(widths, sensitivity, fixed),
                               brute_force(sensitivity, sizes, budget, fixed), rtol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_meets_the_budget_and_is_optimal_on_convex_equal_sized_layers(seed):
  sizes, sensitivity = random_toy(seed)
  for budget in (2.5, 3.0, 4.0, 6.0):
    widths = mixed.allocate(sensitivity, sizes, budget, method="greedy")
    assert quant.bit_budget(widths, sizes) <= budget
    assert value_of(widths, sensitivity) >= brute_force(sensitivity, sizes, budget) - 1e-12
  # Unit steps, equal sizes, convex decreasing sensitivities: marginal analysis is exact.
  rng = np.random.default_rng(seed)
  sizes = {f"l{i}": 10 for i in range(3)}
  sensitivity = {p: {b: float(a * 2.0 ** -b) for b in (2, 3, 4, 5)}
                 for p, a in zip(sizes, rng.exponential(size=len(sizes)))}
  for budget in (2.0, 2 + 1 / 3, 3.0, 4 - 1 / 3, 5.0):
    widths = mixed.allocate(sensitivity, sizes, budget, method="greedy")
    np.testing.assert_allclose(value_of(widths, sensitivity),
                               brute_force(sensitivity, sizes, budget), rtol=1e-12)


def test_a_budget_below_what_the_choices_allow_is_a_clear_error():
  sizes, sensitivity = random_toy(0)
  with pytest.raises(ValueError, match="below the least"):
    mixed.allocate(sensitivity, sizes, 1.9)
  with pytest.raises(ValueError, match="below the least"):
    mixed.allocate(sensitivity, sizes, 2.5, fixed={next(iter(sizes)): None})


# Sensitivities on a small folded model.

MODEL = SmallCNN(widths=(4, 8, 8), hidden=16)


@pytest.fixture(scope="module")
def small_model():
  splits = {name: {**split, "image": split["image"][..., None]}
            for name, split in (("train", fake_split(48, seed=1)), ("test", fake_split(32, seed=2)))}
  pipeline = data.pipeline_from_arrays("fashion_mnist", splits)
  variables = jit_init(MODEL, (1, 28, 28, 1))
  stats = jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])
  folded = quant.fold_batch_norm(variables["params"], stats, BN_EPSILON)
  setup = ptq.QuantSetup(per_channel=True, num_calibration_batches=3)
  evaluator = ptq.SweepEvaluator(MODEL, pipeline, parallel.make_mesh(), setup, batch_size=16)
  # The calibration data as one array: the pipeline's first 3 batches of 16 of the training split.
  batches = list(pipeline.eval_batches(16, split="train", num_batches=3))
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  return folded, evaluator, images, labels


def whole_batch_loss(params, images, labels):
  logits = MODEL.clone(folded=True).apply({"params": params}, images, train=False)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def per_channel_quantized(kernel, bits):
  """Symmetric absmax per output channel, by a loop over channels."""
  out = np.empty_like(np.asarray(kernel))
  qmax = 2 ** (bits - 1) - 1
  for c in range(kernel.shape[-1]):
    channel = np.asarray(kernel[..., c], np.float64)
    step = np.max(np.abs(channel)) / qmax
    out[..., c] = np.clip(np.round(channel / step), -qmax, qmax) * step
  return out


def test_the_evaluator_hands_out_the_calibration_batches(small_model):
  _, evaluator, images, labels = small_model
  batches = evaluator.calibration_batches()
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)


def test_measured_sensitivity_is_the_loss_increase_of_one_quantized_kernel(small_model):
  folded, evaluator, images, labels = small_model
  paths = quant.kernel_paths(folded)
  got = ptq.layer_sensitivities(evaluator, folded, paths, "measured", (2, 4))
  base = whole_batch_loss(folded, images, labels)
  for path in paths:
    for bits in (2, 4):
      kernel = quant.subtree(folded, path.split("/"))
      changed = quant.replace_leaf(folded, path.split("/"), per_channel_quantized(kernel, bits))
      expected = whole_batch_loss(changed, images, labels) - base
      np.testing.assert_allclose(got[path][bits], expected, rtol=1e-4, atol=1e-6)


def test_bound_sensitivity_is_half_the_step_times_the_gradient_per_channel(small_model):
  folded, evaluator, images, labels = small_model
  paths = quant.kernel_paths(folded)
  got = ptq.layer_sensitivities(evaluator, folded, paths, "bound", (3, 8))
  gradient = jax.grad(whole_batch_loss)(folded, images, labels)
  for path in paths:
    kernel = np.asarray(quant.subtree(folded, path.split("/")), np.float64)
    g = np.asarray(quant.subtree(gradient, path.split("/")), np.float64)
    for bits in (3, 8):
      expected = sum(np.max(np.abs(kernel[..., c])) / (2 ** (bits - 1) - 1) / 2
                     * np.sum(np.abs(g[..., c])) for c in range(kernel.shape[-1]))
      np.testing.assert_allclose(got[path][bits], expected, rtol=1e-4)
  # It is a first-order bound: at 8 bits it holds the measured increase of each kernel.
  measured = ptq.layer_sensitivities(evaluator, folded, paths, "measured", (8,))
  assert all(measured[p][8] <= got[p][8] * 1.5 + 1e-6 for p in paths)


def test_hutchinson_traces_approach_the_exact_hessian_traces(small_model):
  folded, evaluator, images, labels = small_model
  paths = ["conv1/conv/kernel", "head/kernel"]
  samples = 50
  estimated = mixed.hessian_traces(evaluator._apply_fn(None), folded,
                                   evaluator.calibration_batches(), paths, num_samples=samples)
  for path in paths:
    kernel = quant.subtree(folded, path.split("/"))
    loss_of = lambda flat: whole_batch_loss(quant.replace_leaf(
        folded, path.split("/"), flat.reshape(kernel.shape)), images, labels)
    hessian = np.asarray(jax.jit(jax.hessian(loss_of))(kernel.ravel()), np.float64)
    # Rademacher v: v^T H v has mean Tr(H) and variance 2 sum_{i != j} H_ij^2.
    exact = np.trace(hessian)
    standard_error = np.sqrt(2 * (np.sum(hessian ** 2) - np.sum(np.diag(hessian) ** 2)) / samples)
    assert abs(estimated[path] - exact) <= 4 * standard_error, path
    assert standard_error < 0.25 * abs(exact), path  # the check has teeth
  sensitivity = ptq.layer_sensitivities(evaluator, folded, paths[1:], "hessian", (4,),
                                        hutchinson_samples=samples)
  kernel = quant.subtree(folded, paths[1].split("/"))
  np.testing.assert_allclose(
      sensitivity[paths[1]][4],
      estimated[paths[1]] / kernel.size * np.sum((per_channel_quantized(kernel, 4) - kernel) ** 2),
      rtol=1e-4)


def test_the_sweep_allocates_each_budget_and_measures_it_as_rules_would(small_model):
  folded, evaluator, _, _ = small_model
  config = config_lib.base_config()
  config.quant.bit_budgets = (3.0, 5.0)
  config.quant.budget_sensitivities = ("measured", "bound")
  config.quant.budget_act_bits = 8
  rules = (quant.WeightRule("conv1/conv/kernel", 8),)
  fixed_evaluator = evaluator.with_setup(
      ptq.QuantSetup(per_channel=True, num_calibration_batches=3, weight_rules=rules))
  events = list(ptq.mixed_precision(fixed_evaluator, folded, config.quant))
  assert [kind for kind, _ in events[:2]] == ["layer_sensitivities"] * 2
  assert "conv1/conv/kernel" not in events[0][1]["values"]
  rows = [row for kind, row in events if kind == "mixed"]
  assert [(r["bit_budget"], r["sensitivity"]) for r in rows] == [
      (3.0, "measured"), (3.0, "bound"), (5.0, "measured"), (5.0, "bound")]
  sizes = quant.kernel_sizes(folded)
  for row in rows:
    assert row["layer_bits"]["conv1/conv/kernel"] == 8
    assert row["average_bits"] == quant.bit_budget(row["layer_bits"], sizes) <= row["bit_budget"]
    # The same widths as user rules give the same accuracy.
    as_rules = tuple(quant.WeightRule(p, b) for p, b in row["layer_bits"].items())
    ruled = evaluator.with_setup(
        ptq.QuantSetup(per_channel=True, num_calibration_batches=3, weight_rules=as_rules))
    assert ruled.accuracy(ruled.setup.quantize_weights(folded, 8), 8) == row["accuracy"]
