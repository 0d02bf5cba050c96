"""The table's baselines (KURE, STE QAT, l2) and the sweep machinery, against independent computations."""
import glob
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.stats

from experiments import folded_ranges, make_tables, run_sweep, tune
from qreg import config as config_lib
from qreg import objectives, ptq, quant, train
from qreg.models import SmallCNN
from qreg.models.layers import QuantizedActivation
from tests.fakes import tiny_config, write_idx_dir

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


@pytest.mark.parametrize("table", ["fashion_mnist", "cifar10_vgg", "cifar10_resnet18",
                                   "cifar10_mobilenetv2", "imagenet_mobilenetv2",
                                   "imagenet_resnet18", "fashion_mnist_ablations",
                                   "fashion_mnist_impls"])
def test_table_configs_list_valid_runs(table, tmp_path):
  get_config, runs = run_sweep.load_sweep(os.path.join(REPO, "configs", "tables", f"{table}.py"))
  if table not in ("fashion_mnist_ablations", "fashion_mnist_impls"):
    assert {r["labels"]["method"] for r in runs} == {"no-reg", "l2", "l1", "ste-qat@4", "kure"}
  assert {r["labels"]["seed"] for r in runs} == {0, 1, 2}
  model = SmallCNN()
  for run in runs:
    config = run_sweep.run_config(get_config, run)
    if config.data.source == "idx":
      config.data.data_dir = str(tmp_path)  # validated without the real files
    optimizer = train.build_optimizer(config.optim, 10, 5)
    step = train.build_method_steps(config, model, optimizer, 1)
    assert (step is None) == (run["labels"]["method"] == "no-reg")
    config_lib.validate(config, num_devices=1)
    assert config_lib.parse_bit_settings(config.quant.bit_settings)[0] == (None, None)


SWEEP_FILE = '''
from tests.fakes import tiny_config
IDX = {idx!r}
def get_config():
  config = tiny_config(IDX)
  config.quant.bit_settings = [(None, None), (4, 4)]
  return config
def sweep():
  runs = []
  for seed in (0, 1):
    runs.append({{"name": f"base/seed{{seed}}", "labels": {{"method": "base", "seed": seed}},
                 "overrides": {{"seed": seed, "reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}}})
    runs.append({{"name": f"l1/seed{{seed}}", "labels": {{"method": "l1", "seed": seed}},
                 "overrides": {{"seed": seed}}, "warm_start": f"base/seed{{seed}}"}})
  runs.append({{"name": "l1-scratch", "overrides": {{"seed": 0}}}})
  return runs
'''


def test_sweep_runner_warm_start_and_tables(tmp_path):
  idx_dir = tmp_path / "idx"
  idx_dir.mkdir()
  write_idx_dir(idx_dir, 64, 20)
  sweep_path = tmp_path / "sweep.py"
  sweep_path.write_text(SWEEP_FILE.format(idx=str(idx_dir)))
  root = tmp_path / "runs"
  run_sweep.run_sweep(str(sweep_path), str(root))

  # The warm-started run equals the same run trained from scratch.
  final = lambda name: ocp.CheckpointManager(str(root / name / "checkpoints")).restore(16)
  chex.assert_trees_all_equal(final("l1/seed0")["params"], final("l1-scratch")["params"])

  # Finished runs are skipped.
  mtime = os.path.getmtime(root / "l1/seed0" / "results.json")
  run_sweep.run_sweep(str(sweep_path), str(root))
  assert os.path.getmtime(root / "l1/seed0" / "results.json") == mtime

  table = make_tables.make_tables(str(root), str(tmp_path / "tables"))
  accuracies = []
  for seed in (0, 1):
    with open(root / f"l1/seed{seed}" / "results.json") as f:
      accuracies.append([100 * r["accuracy"] for r in json.load(f)["rows"]])
  mean, std = np.mean(accuracies, 0), np.std(accuracies, 0, ddof=1)
  assert f"| l1 | {mean[0]:.2f} ± {std[0]:.2f} | {mean[1]:.2f} ± {std[1]:.2f} | 2 |" in table
  assert (tmp_path / "tables" / "accuracy.png").stat().st_size > 0


def test_paired_gains_subtract_no_reg_seed_by_seed(tmp_path):
  rng = np.random.default_rng(0)
  acc = {(m, seed): rng.uniform(0.1, 0.9, 2) for m in ("no-reg", "l1") for seed in range(3)}
  rows = lambda m, seed: [{"weight_bits": w, "act_bits": w, "accuracy": float(acc[m, seed][i])}
                          for i, w in enumerate((None, 4))]
  root = tmp_path / "runs"
  # l1 has seeds 2 and 0 only, written in that order: pairs follow the seed, not the order.
  for m, seeds in (("no-reg", (0, 1, 2)), ("l1", (2, 0))):
    for seed in seeds:
      run = root / m / f"seed{seed}"
      run.mkdir(parents=True)
      (run / "run.json").write_text(json.dumps({"name": f"{m}/seed{seed}",
                                                "labels": {"method": m, "seed": seed}}))
      (run / "results.json").write_text(json.dumps({"rows": rows(m, seed)}))
  make_tables.make_tables(str(root), str(tmp_path / "tables"))
  with open(tmp_path / "tables" / "gains.json") as f:
    gains = {(g["weight_bits"], g["act_bits"]): g["gains"] for g in json.load(f)}
  for i, setting in enumerate(((None, None), (4, 4))):
    naive = [100 * (acc["l1", seed][i] - acc["no-reg", seed][i]) for seed in (0, 2)]
    g = gains[setting]["l1"]
    np.testing.assert_allclose(list(g["per_seed"].values()), naive, rtol=1e-12)
    assert list(g["per_seed"]) == ["0", "2"]
    np.testing.assert_allclose([g["mean"], g["std"]], [np.mean(naive), np.std(naive, ddof=1)],
                               rtol=1e-12)
  assert "no-reg" not in gains[(4, 4)]
  lines = (tmp_path / "tables" / "gains.md").read_text().splitlines()
  assert lines[-1].startswith(f"| l1 | {gains[(None, None)]['l1']['mean']:+.2f} ± ")


@pytest.mark.parametrize("table,run_name", [("cifar10_vgg", "l1/seed0"),
                                            ("imagenet_resnet18", "ste-qat@4/seed0")])
def test_paper_table_runs_on_mock_tfds_data(tmp_path, table, run_name):
  """A paper-table run through the real TFDS path on mock data, a couple of steps."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  get_config, runs = run_sweep.load_sweep(os.path.join(REPO, "configs", "tables", f"{table}.py"))
  config = run_sweep.run_config(get_config, next(r for r in runs if r["name"] == run_name))
  config.data.download = True  # the mock prepares nothing and fetches nothing
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.image_size = 32
  config.data.batch_size = config.eval.batch_size = 4
  config.train.num_epochs, config.reg.start_epoch = 1, 0
  config.quant.bit_settings = [(None, None), (4, 4)]
  config.quant.num_calibration_batches = 1
  with tfds.testing.mock_data(num_examples=8):
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert [(r["weight_bits"], r["act_bits"]) for r in results["rows"]] == [(None, None), (4, 4)]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rows"])


def test_tuning_grids_have_equal_budgets_and_choose_by_the_stated_criterion(tmp_path):
  path = os.path.join(REPO, "configs", "tables", "fashion_mnist_tuning.py")
  get_config, runs = run_sweep.load_sweep(path)
  module = run_sweep.load_sweep_module(path)
  assert len({len(grid) for grid in module.GRIDS.values()}) == 1
  assert min(len(grid) for grid in module.GRIDS.values()) >= 4
  for run in runs:
    config = run_sweep.run_config(get_config, run)
    config.data.data_dir = str(tmp_path)
    config_lib.validate(config, num_devices=1)
    assert config.eval.split == "validation"  # tuning never measures the test set

  # Fake validation results: value 2 of each method is best at (4,4)/(3,3) but value 3 is
  # better still and loses too much float accuracy, so it must not be chosen.
  def write(name, float_acc, low_acc):
    os.makedirs(tmp_path / name, exist_ok=True)
    rows = [{"weight_bits": w, "act_bits": a,
             "accuracy": float_acc if w is None and a is None else low_acc}
            for w, a in config.quant.bit_settings]
    with open(tmp_path / name / "results.json", "w") as f:
      json.dump({"rows": rows, "config": {"eval": {"split": "validation"}}}, f)

  write("no-reg", 0.92, 0.5)
  for method, grid in module.GRIDS.items():
    for i in range(len(grid)):
      write(f"{method}/{i}", [0.92, 0.918, 0.915, 0.85][i], [0.6, 0.7, 0.8, 0.9][i])
  choice = tune.choose(path, str(tmp_path))
  assert {m: c["value"] for m, c in choice["methods"].items()} == {m: 2 for m in module.GRIDS}


@pytest.mark.parametrize("table", sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "tables",
                                                             "*_tuning.py"))))
def test_every_tuning_table_lists_the_grids_that_tune_reads(table):
  path = os.path.join(REPO, "configs", "tables", f"{table}.py")
  module = run_sweep.load_sweep_module(path)
  _, runs = run_sweep.load_sweep(path)
  # experiments.tune reads GRIDS, CRITERION_SETTINGS and MAX_FLOAT_DROP from the module and
  # finds value i of a method's grid in the run <method>/<i>.
  assert set(module.CRITERION_SETTINGS) and module.MAX_FLOAT_DROP >= 0
  listed = {run["name"]: run["overrides"] for run in runs}
  expected = {f"{method}/{i}": overrides for method, grid in module.GRIDS.items()
              for i, overrides in enumerate(grid)}
  assert {name: listed.get(name) for name in expected} == expected
  assert "no-reg" in listed and set(listed) == set(expected) | {"no-reg"}


@pytest.mark.parametrize("network,model_name,width", [
    ("vgg", "vgg_like", 0.125), ("resnet18", "resnet18", 0.125),
    ("mobilenetv2", "mobilenetv2", 0.35)])
def test_paper_network_tuning_is_the_default_tuning_on_that_network(network, model_name, width,
                                                                    tmp_path):
  default_get_config, default_runs = run_sweep.load_sweep(
      os.path.join(REPO, "configs", "tables", "fashion_mnist_tuning.py"))
  get_config, runs = run_sweep.load_sweep(
      os.path.join(REPO, "configs", "tables", f"fashion_mnist_{network}_tuning.py"))
  assert runs == default_runs  # the same grids, seed and warm starts
  config = get_config()
  assert (config.model.name, config.model.width) == (model_name, width)
  config.model.name, config.model.width, config.model.stem = "small_cnn", 1.0, "cifar"
  assert config.to_json() == default_get_config().to_json()  # only the model differs
  tuned_get_config, _ = run_sweep.load_sweep(
      os.path.join(REPO, "configs", "tables", f"fashion_mnist_{network}_tuned.py"))
  assert tuned_get_config().eval.split == "test"


@pytest.mark.parametrize("table", ["fashion_mnist_lazy", "fashion_mnist_vgg_lazy"])
def test_lazy_table_varies_only_the_penalty_schedule(table, tmp_path):
  get_config, runs = run_sweep.load_sweep(os.path.join(REPO, "configs", "tables", f"{table}.py"))
  schedules = set()
  for run in runs:
    config = run_sweep.run_config(get_config, run)
    config.data.data_dir = str(tmp_path)
    config_lib.validate(config, num_devices=1)
    if run["labels"]["method"] != "no-reg":
      assert run["warm_start"] == f"no-reg/seed{run['labels']['seed']}"
    if run["labels"]["method"] != "no-reg" and not run["labels"]["method"].endswith("-retuned"):
      schedules.add((config.reg.every_k_steps, config.reg.penalty_batch_fraction,
                     config.reg.lambda_w, config.reg.lambda_a))
  assert {(k, f) for k, f, _, _ in schedules} == {(k, f) for k in (1, 4, 16) for f in (1.0, 0.25)}
  assert len({(w, a) for _, _, w, a in schedules}) == 1  # one lambda pair, scaled only inside
  # A retuned schedule (once chosen) has its own lambdas, from the lazy tuning's choices.
  module = run_sweep.load_sweep_module(os.path.join(REPO, "configs", "tables", f"{table}.py"))
  if os.path.exists(module.RETUNED):
    with open(module.RETUNED) as f:
      retuned = json.load(f)["methods"]
    for run in runs:
      method = run["labels"]["method"]
      if method.endswith("-retuned"):
        overrides = retuned[method.removesuffix("-retuned")]["overrides"]
        assert {k: run["overrides"][k] for k in overrides} == overrides


def test_vgg_lazy_tuning_is_the_default_lazy_tuning_on_vgg():
  default_get_config, default_runs = run_sweep.load_sweep(
      os.path.join(REPO, "configs", "tables", "fashion_mnist_lazy_tuning.py"))
  get_config, runs = run_sweep.load_sweep(
      os.path.join(REPO, "configs", "tables", "fashion_mnist_vgg_lazy_tuning.py"))
  assert runs == default_runs  # the same grid, seed and warm start
  # Its no-reg run is the VGG tuning's, so experiments/lazy_parity.sh can share it.
  tuning_get_config, tuning_runs = run_sweep.load_sweep(
      os.path.join(REPO, "configs", "tables", "fashion_mnist_vgg_tuning.py"))
  assert get_config().to_json() == tuning_get_config().to_json()
  assert runs[0] == tuning_runs[0] and runs[0]["name"] == "no-reg"


@pytest.mark.parametrize("net,ext,methods", [("resnet18", "l1_low", {"l1"}),
                                              ("mobilenetv2", "low", {"l1", "l2"})])
def test_grid_extensions_continue_the_grids_below_the_tuning_and_share_its_no_reg_runs(
    net, ext, methods):
  tables = os.path.join(REPO, "configs", "tables")
  get_config, runs = run_sweep.load_sweep(
      os.path.join(tables, f"fashion_mnist_{net}_{ext}_tuning.py"))
  tuning_get_config, tuning_runs = run_sweep.load_sweep(
      os.path.join(tables, f"fashion_mnist_{net}_tuning.py"))
  # experiments/extend_grids.sh links the tuning's no-reg run in: same config, same run.
  assert get_config().to_json() == tuning_get_config().to_json()
  assert runs[0] == tuning_runs[0] and runs[0]["name"] == "no-reg"
  tuning = run_sweep.load_sweep_module(os.path.join(tables, "fashion_mnist_tuning.py"))
  assert {run["labels"]["method"] for run in runs[1:]} == methods
  assert all(run["warm_start"] == "no-reg" for run in runs[1:])
  for method in methods:
    default = [g["reg.lambda_a"] for g in tuning.GRIDS[method]]
    extension = [run["overrides"] for run in runs[1:] if run["labels"]["method"] == method]
    lambdas = [o["reg.lambda_a"] for o in extension]
    assert max(lambdas) < min(default)  # strictly below the pre-registered grid
    steps = sorted(default + lambdas)  # and the same factor-~3 spacing continued
    assert all(2.9 < b / a < 3.5 for a, b in zip(steps, steps[1:]))
    assert all(o["reg.norm"] == method and o["reg.lambda_w"] == o["reg.lambda_a"] / 10
               for o in extension)
  # Its test-set table shares the tuned table's no-reg runs.
  low_get_config, low_runs = run_sweep.load_sweep(
      os.path.join(tables, f"fashion_mnist_{net}_{ext}.py"))
  tuned_get_config, tuned_runs = run_sweep.load_sweep(
      os.path.join(tables, f"fashion_mnist_{net}_tuned.py"))
  assert low_get_config().to_json() == tuned_get_config().to_json()
  no_reg = [run for run in tuned_runs if run["labels"]["method"] == "no-reg"]
  assert [run for run in low_runs if run["labels"]["method"] == "no-reg"] == no_reg
  assert {run["labels"]["method"] for run in low_runs} <= {"no-reg"} | methods


def test_folded_ranges_reads_each_output_channels_range():
  rng = np.random.default_rng(0)
  wide = rng.normal(size=(3, 3, 1, 8)).astype(np.float32)
  wide[..., 5] *= 100.0
  params = {"a": {"conv": {"kernel": wide, "bias": np.ones(8)}},
            "b": {"kernel": rng.normal(size=(4, 6)).astype(np.float32)}}
  spreads = folded_ranges.channel_spread(params)
  naive = [max(abs(wide[..., c]).max() for c in range(8)),
           np.median([abs(wide[..., c]).max() for c in range(8)])]
  assert [path for _, path, _ in spreads] == ["a/conv/kernel", "b/kernel"]
  np.testing.assert_allclose(spreads[0][0], naive[0] / naive[1], rtol=1e-6)
  np.testing.assert_allclose(spreads[0][2], naive[0], rtol=1e-6)
