"""The trade-off grids (configs/tables/tradeoff.py) against their rule and the committed tuning
runs, and experiments.curves against a naive reading of synthetic runs."""
import itertools
import json
import os

import numpy as np
import pytest

from configs.tables import ablations, tradeoff, tuning
from experiments import curves, run_sweep, study
from tests.test_experiments import RESULTS, table, validated

TUNING_RESULTS = {"small_cnn": "fashion_mnist_tuning", "vgg": "vgg/tuning"}
BOUND_TUNING_RESULTS = {"small_cnn": "fashion_mnist_tuned/bound/tuning",
                        "vgg": "vgg/bound/tuning"}
BOUND_FORMS = ("bound", "bound-diff", "layer-bound")
DESCENDING = ("ste-qat", "multibit-qat", *BOUND_FORMS)  # bit-width ladders: stronger when fewer


def ladder_value(method: str, overrides: dict):
  """A grid value's position on its method's ladder: lambda, or the (lowest) bit-width."""
  if method in ("l1", "l2"):
    return overrides["reg.lambda_a"]
  if method == "kure":
    return overrides["reg.lambda_kurtosis"]
  if method == "ste-qat":
    return overrides["qat.weight_bits"]
  if method in BOUND_FORMS:
    return overrides["reg.bound_bits"]
  return min(overrides["qat.bit_set"])


@pytest.mark.parametrize("net", sorted(tradeoff.GRIDS))
def test_tradeoff_grids_follow_the_rule_on_the_committed_tuning_runs(net):
  grids = tradeoff.GRIDS[net]  # as fixed before the test runs; extensions are checked below
  assert list(grids) == ["l1", "l2", "kure", "ste-qat", "multibit-qat"] + (
      list(BOUND_FORMS) if net in BOUND_TUNING_RESULTS else [])
  for method, extension in tradeoff.EXTENSIONS.get(net, {}).items():
    values = [ladder_value(method, o) for o in grids[method] + extension]
    assert len(extension) <= 2 and values[:len(grids[method])] == [
        ladder_value(method, o) for o in tradeoff.grids(f"net={net}")[method]][:len(grids[method])]
    ladder = sorted(values) if method not in DESCENDING else values
    assert all(2.9 < b / a < 3.5 for a, b in zip(ladder, ladder[1:]))  # the ladder, continued
  with open(os.path.join(RESULTS, TUNING_RESULTS[net], "grid.json")) as f:
    tuned = json.load(f)
  cost = {(g["method"], ladder_value(g["method"], g["overrides"])): tuned["no_reg_float"] - g["float"]
          for g in tuned["grid"]}
  if net in BOUND_TUNING_RESULTS:  # its own tuning, beside the same no-reg run
    with open(os.path.join(RESULTS, BOUND_TUNING_RESULTS[net], "grid.json")) as f:
      bound = json.load(f)
    assert bound["no_reg_float"] == tuned["no_reg_float"]
    cost.update({(g["method"], g["overrides"]["reg.bound_bits"]):
                 bound["no_reg_float"] - g["float"] if g["float"] is not None else float("inf")
                 for g in bound["grid"]})  # a diverged run costs everything
  for method, grid in grids.items():
    values = [ladder_value(method, o) for o in grid]
    if method in ("ste-qat", "multibit-qat"):  # bit-widths: consecutive, from 6 down, >= 2
      assert values == list(range(6, 6 - len(values), -1)) and min(values) >= 2
    elif method in BOUND_FORMS:  # reference widths 2 bits apart, as their tuning grid
      assert values == list(range(values[0], values[0] - 2 * len(values), -2))
      assert grid == tuning.BOUND_GRIDS[method][:len(grid)]
    else:  # the tuning grids' factor ~3, continued
      assert values == sorted(values)
      assert all(2.9 < b / a < 3.5 for a, b in zip(values, values[1:]))
      if method != "kure":
        assert all(o["reg.norm"] == method and o["reg.lambda_w"] == o["reg.lambda_a"] / 10
                   for o in grid)
    if method == "multibit-qat":
      assert grid[-1]["qat.bit_set"] == tuning.MULTIBIT_BIT_SET  # its whole ladder
      continue
    measured = [cost[method, v] for v in values if (method, v) in cost]
    tuning_values = [v for v in values if (method, v) in cost]
    # Low end: the first value is the no-effect one, measured or one step beyond a measured one
    # that cost too much; high end: the first value costing >= 3 ends the grid, else two beyond.
    first, weaker = values[0], (lambda v: v > values[0]) if method in DESCENDING else (
        lambda v: v < values[0])
    assert not any(weaker(v) for m, v in cost if m == method)  # nothing nearer no effect
    if (method, first) in cost:
      assert cost[method, first] <= tradeoff.LOW_END_COST
    else:  # one step beyond the tuning grid, whose first value cost too much
      assert cost[method, values[1]] > tradeoff.LOW_END_COST
    if max(measured) >= tradeoff.HIGH_END_COST:
      assert cost[method, values[-1]] >= tradeoff.HIGH_END_COST
      assert all(c < tradeoff.HIGH_END_COST for c in measured[:-1])
    else:  # two steps beyond the tuning grid
      assert values[-3] == tuning_values[-1]
      assert not any((method, v) in cost for v in values[-2:])


@pytest.mark.parametrize("net", sorted(tradeoff.GRIDS))
def test_tradeoff_runs_are_the_tuned_tables_with_shared_no_reg_runs(net, tmp_path):
  sweep = run_sweep.load_sweep(table("tradeoff", f"net={net}"))
  tuned = run_sweep.load_sweep(table("tuned", f"net={net}"),
                               choices={"l1": tradeoff.GRIDS[net]["l1"][1]})
  for run in sweep.runs:
    config = validated(sweep, run, tmp_path)
    assert config.eval.split == "test" and config.data.validation_size == 5000
    seed = run["labels"]["seed"]
    assert run["warm_start"] == (None if run["labels"]["method"] == "no-reg" else f"no-reg/seed{seed}")
  methods = {run["labels"]["method"] for run in sweep.runs}
  assert len(sweep.runs) == 3 + 3 * sum(len(g) for g in tradeoff.grids(f"net={net}").values())
  assert methods == {"no-reg", *tradeoff.GRIDS[net]}
  # The runs that train as a tuned table's run does are linked in, and only those.
  key = lambda s, r: study._training_key(s.config(r))  # pylint: disable=protected-access
  tuned_keys = {key(tuned, r): r["name"] for r in tuned.runs}
  shared = {r["name"]: tuned_keys[key(sweep, r)] for r in sweep.runs if key(sweep, r) in tuned_keys}
  assert shared == {**{f"no-reg/seed{s}": f"no-reg/seed{s}" for s in (0, 1, 2)},
                    **{f"l1/1/seed{s}": f"l1/seed{s}" for s in (0, 1, 2)}}


@pytest.mark.parametrize("net", ["small_cnn", "vgg"])
def test_ablations_vary_only_the_l1_terms_and_schedule(net, tmp_path):
  with open(os.path.join(RESULTS, TUNING_RESULTS[net], "choices.json")) as f:
    l1 = json.load(f)["methods"]["l1"]["overrides"]
  sweep = run_sweep.load_sweep(table("ablations", f"net={net}"), choices={"l1": l1})
  found = {}
  for run in sweep.runs:
    config = validated(sweep, run, tmp_path)
    assert config.eval.split == "test" and config.data.validation_size == 5000
    method, seed = run["labels"]["method"], run["labels"]["seed"]
    found[method, seed] = (config.reg.lambda_w, config.reg.lambda_a, config.reg.start_epoch)
    assert run["warm_start"] == (None if method == "no-reg" or "from the start" in method
                                 else f"no-reg/seed{seed}")
  for seed in (0, 1, 2):
    w, a = l1["reg.lambda_w"], l1["reg.lambda_a"]
    assert found["no-reg", seed] == (0.0, 0.0, 3)
    assert found[ablations.REFERENCE, seed] == (w, a, 3)
    assert found["l1 weights only", seed] == (w, 0.0, 3)
    assert found["l1 activations only", seed] == (0.0, a, 3)
    assert found["l1 both, from the start", seed] == (w, a, 0)
  # "both, last epoch" trains as the tuned table's l1 run does: experiments.study links it in.
  tuned = run_sweep.load_sweep(table("tuned", f"net={net}"), choices={"l1": l1})
  key = lambda s, r: study._training_key(s.config(r))  # pylint: disable=protected-access
  tuned_keys = {key(tuned, r): r["name"] for r in tuned.runs}
  assert {r["name"]: tuned_keys.get(key(sweep, r)) for r in sweep.runs
          if key(sweep, r) in tuned_keys} == {
              **{f"no-reg/seed{s}": f"no-reg/seed{s}" for s in (0, 1, 2)},
              **{f"l1_both_last_epoch/seed{s}": f"l1/seed{s}" for s in (0, 1, 2)}}
  with pytest.raises(ValueError, match="l1 choice"):
    run_sweep.load_sweep(table("ablations", f"net={net}"), choices={})


def test_drift_runs_train_the_bound_choice_from_the_start_beside_the_tables_no_reg(tmp_path):
  with open(os.path.join(RESULTS, BOUND_TUNING_RESULTS["small_cnn"], "choices.json")) as f:
    bound = json.load(f)["methods"]["bound"]["overrides"]
  sweep = run_sweep.load_sweep(table("drift", "net=small_cnn"), choices={"bound": bound})
  for run in sweep.runs:
    config = validated(sweep, run, tmp_path)
    if run["labels"]["method"] == "no-reg":
      continue
    assert run["warm_start"] is None and run["name"].startswith("bound_from_the_start/seed")
    assert (config.reg.form, config.reg.bound_bits, config.reg.start_epoch) == (
        "bound", bound["reg.bound_bits"], 0)
    assert config.train.log_norms and config.eval.split == "test"
  tuned = run_sweep.load_sweep(table("tuned", "net=small_cnn"), choices={})
  assert study.same_training(tuned, sweep) == {f"no-reg/seed{s}": f"no-reg/seed{s}"
                                              for s in (0, 1, 2)}
  with pytest.raises(ValueError, match="bound tuning's choice"):
    run_sweep.load_sweep(table("drift", "net=small_cnn"), choices={})


def write_run(root, name, labels, overrides, paper, strong):
  run = root / name
  run.mkdir(parents=True)
  (run / "run.json").write_text(json.dumps({"name": name, "labels": labels,
                                            "overrides": {**overrides, "seed": labels["seed"]}}))
  for file, accuracies in (("results.json", paper), ("results_strong.json", strong)):
    rows = [{"weight_bits": w, "act_bits": a, "accuracy": accuracies[w, a]}
            for (w, a) in accuracies]
    (run / file).write_text(json.dumps({"rows": rows}))


def test_curves_pair_against_no_reg_and_pick_the_best_value_within_each_budget(tmp_path):
  rng = np.random.default_rng(0)
  settings = [(None, None), (3, 3), (2, 2), (2, 8)]
  grids = {"l1": [{"reg.lambda_a": a} for a in (0.003, 0.01, 0.03)],
           "ste-qat": [{"qat.weight_bits": b} for b in (6, 4)]}
  acc = {}
  root = tmp_path / "runs"
  for seed in (0, 1, 2):
    acc["no-reg", None, seed] = {p: {s: rng.uniform(0.5, 0.93) for s in settings}
                                 for p in ("paper", "strong")}
    acc["no-reg", None, seed]["paper"][None, None] = 0.92 + 0.002 * seed
    for method, grid in grids.items():
      for i, _ in enumerate(grid):
        a = {p: {s: rng.uniform(0.1, 0.9) for s in settings} for p in ("paper", "strong")}
        # float costs growing along the grid: ~0.1, ~0.8, ~3 points
        a["paper"][None, None] = 0.92 + 0.002 * seed - [0.001, 0.008, 0.03][i] - 0.001 * seed
        acc[method, i, seed] = a
  for (method, i, seed), a in acc.items():
    labels = {"method": method, "seed": seed, **({} if i is None else {"value": i})}
    write_run(root, f"{method}/{i}/seed{seed}", labels,
              {} if i is None else grids[method][i], a["paper"], a["strong"])
  # An unfinished run (no strong results) is left out.
  (root / "l1/2/seed2" / "results_strong.json").unlink()

  result = curves.curves(str(root))
  iso = curves.iso_float_cost(result)
  points = {curves.point_name(p): p for p in curves.POINTS}
  for method, grid in grids.items():
    assert [p["value"] for p in result["methods"][method]] == list(range(len(grid)))
    for p in result["methods"][method]:
      seeds = [s for s in (0, 1, 2) if (method, p["value"], s) != ("l1", 2, 2)]
      assert p["seeds"] == seeds
      naive_cost = [100 * (acc["no-reg", None, s]["paper"][None, None]
                           - acc[method, p["value"], s]["paper"][None, None]) for s in seeds]
      np.testing.assert_allclose(list(p["float_cost"]["per_seed"].values()), naive_cost)
      np.testing.assert_allclose(p["float_cost"]["std"], np.std(naive_cost, ddof=1))
      for name, (protocol, setting) in points.items():
        naive = [100 * (acc[method, p["value"], s][protocol][setting]
                        - acc["no-reg", None, s][protocol][setting]) for s in seeds]
        np.testing.assert_allclose(p["gain"][name]["mean"], np.mean(naive))
  # Brute force: over every (method, value), the best mean accuracy among values within budget.
  for name, (budget, method) in itertools.product(points, itertools.product(curves.BUDGETS, grids)):
    candidates = [p for p in result["methods"][method] if p["float_cost"]["mean"] <= budget]
    best = iso[name][str(budget)][method]
    if not candidates:
      assert best is None
      continue
    top = max(p["accuracy"][name]["mean"] for p in candidates)
    assert best["accuracy"]["mean"] == top
  assert iso["strong W2A2"]["0.25"]["l1"]["value"] == 0  # only the first l1 value is that cheap
  e = curves.ends(result["methods"]["l1"])
  assert e["low_end"] and e["high_end"]
  assert not curves.ends(result["methods"]["ste-qat"])["high_end"]
  text = curves.write_curves(str(root), str(tmp_path / "out"), "toy")
  assert "| ste-qat | 2 |" in text and "NOT reached" in text
  with open(tmp_path / "out" / "curves.json") as f:
    written = json.load(f)
  assert written["ends"]["ste-qat"]["high_end"] is False
  assert os.path.getsize(tmp_path / "out" / "curves.png") > 10_000


def test_curves_need_no_reg_runs(tmp_path):
  write_run(tmp_path, "l1/0/seed0", {"method": "l1", "value": 0, "seed": 0}, {},
            {(None, None): 0.9, (3, 3): 0.5, (2, 2): 0.1, (2, 8): 0.1},
            {(None, None): 0.9, (3, 3): 0.5, (2, 2): 0.1, (2, 8): 0.1})
  with pytest.raises(FileNotFoundError, match="No finished no-reg run"):
    curves.curves(str(tmp_path))


def test_a_diverged_value_reaches_the_high_end_and_leaves_the_curve(tmp_path):
  """A grid value that diverged on any seed is listed, not plotted or picked: its float cost is
  unbounded, so it ends the grid (as configs/tables/tradeoff.py counts it in the tuning)."""
  settings = [(None, None), (3, 3), (2, 2), (2, 8)]
  accuracies = lambda f: {s: f if s == (None, None) else 0.5 for s in settings}
  grid = [{"reg.bound_bits": b} for b in (8, 6, 4)]
  for seed in (0, 1, 2):
    write_run(tmp_path, f"no-reg/seed{seed}", {"method": "no-reg", "seed": seed}, {},
              accuracies(0.92), accuracies(0.92))
    write_run(tmp_path, f"bound/0/seed{seed}", {"method": "bound", "value": 0, "seed": seed},
              grid[0], accuracies(0.919), accuracies(0.919))
    for value in (1, 2):
      name, labels = f"bound/{value}/seed{seed}", {"method": "bound", "value": value, "seed": seed}
      if (value, seed) == (2, 0):  # finished on one seed, diverged on the others
        write_run(tmp_path, name, labels, grid[value], accuracies(0.9), accuracies(0.9))
        continue
      run = tmp_path / name
      run.mkdir(parents=True)
      (run / "run.json").write_text(json.dumps({"name": name, "labels": labels,
                                                "overrides": {**grid[value], "seed": seed}}))
      (run / run_sweep.DIVERGED).write_text(json.dumps({"message": "Non-finite loss"}))
  result = curves.curves(str(tmp_path))
  assert [p["value"] for p in result["methods"]["bound"]] == [0]
  assert [(d["label"], d["seeds"]) for d in result["diverged"]["bound"]] == [
      ("b_ref=6", [0, 1, 2]), ("b_ref=4", [1, 2])]
  e = curves.ends(result["methods"]["bound"], result["diverged"]["bound"])
  assert e["high_end"] and e["diverged"] and e["low_end"]
  assert not curves.ends(result["methods"]["bound"])["high_end"]
  iso = curves.iso_float_cost(result)
  assert {iso[n][str(b)]["bound"]["value"] for n in iso for b in curves.BUDGETS} == {0}
  text = curves.write_curves(str(tmp_path), str(tmp_path / "out"), "toy")
  assert "| bound | b_ref=6 | 3 | diverged (seed 0, 1, 2) |" in text
  assert "| bound | 3 | +0.10 | diverged | reached | reached |" in text


def test_runs_linked_from_other_sweeps_are_read_at_their_grid_value(tmp_path):
  """A run linked into the curves from another sweep (the bound table's, the transfer's) has that
  sweep's labels, without a grid value: its value is its place in the curves' sweep, so two such
  values of one method stay two points."""
  settings = [(None, None), (3, 3), (2, 2), (2, 8)]
  accuracies = lambda f: {s: f if s == (None, None) else 0.5 for s in settings}
  root = tmp_path / "curves"
  for seed in (0, 1, 2):
    write_run(root, f"no-reg/seed{seed}", {"method": "no-reg", "seed": seed}, {},
              accuracies(0.92), accuracies(0.92))
    write_run(root, f"bound/0/seed{seed}", {"method": "bound", "value": 0, "seed": seed},
              {"reg.bound_bits": 12}, accuracies(0.92), accuracies(0.92))
    for value, bits, float_acc in ((1, 10, 0.918), (2, 8, 0.80)):
      write_run(tmp_path / "elsewhere" / f"b{bits}", f"seed{seed}",
                {"method": "bound", "seed": seed}, {"reg.bound_bits": bits},
                accuracies(float_acc), accuracies(float_acc))
      os.makedirs(root / "bound" / str(value), exist_ok=True)
      os.symlink(tmp_path / "elsewhere" / f"b{bits}" / f"seed{seed}",
                 root / "bound" / str(value) / f"seed{seed}")
  (root / "sweep.json").write_text(json.dumps({"runs": [
      f"{name}/seed{seed}" for name in ("no-reg", "bound/0", "bound/1", "bound/2")
      for seed in (0, 1, 2)]}))
  points = curves.curves(str(root))["methods"]["bound"]
  assert [(p["value"], p["label"], p["seeds"]) for p in points] == [
      (0, "b_ref=12", [0, 1, 2]), (1, "b_ref=10", [0, 1, 2]), (2, "b_ref=8", [0, 1, 2])]
  assert [round(p["float_cost"]["mean"], 6) for p in points] == [0.0, 0.2, 12.0]


def test_the_transfer_tests_runs_are_linked_into_the_vgg_curves(tmp_path):
  """The bound forms' transfer runs (SmallCNN's choices on VGG-like) train as the curves' runs at
  that reference width do: the trade-off links them instead of training them again."""
  root = tmp_path / "vgg"
  transfer = study.transferred_choices()
  transfer_sweep = run_sweep.load_sweep(table("tuned", "net=vgg"), transfer)
  rows = [{"weight_bits": w, "act_bits": a, "accuracy": 0.5}  # every setting the table measures
          for w, a in transfer_sweep.config(transfer_sweep.runs[0]).quant.bit_settings]
  for name in [f"tuned/no-reg/seed{s}" for s in (0, 1, 2)] + [
      f"bound_transfer/{form}/seed{s}" for form in BOUND_FORMS for s in (0, 1, 2)]:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({"rows": rows}))
  sweep = run_sweep.load_sweep(table("tradeoff", "net=vgg"))
  study.share_tuned_runs(str(root), "vgg", sweep, str(root / "tradeoff"))
  linked = {os.path.relpath(path, root / "tradeoff"): os.path.relpath(os.readlink(path), root)
            for path in root.glob("tradeoff/*/*/seed*") if path.is_symlink()}
  expected = {}
  for form in BOUND_FORMS:
    for i, overrides in enumerate(tradeoff.grids("net=vgg")[form]):
      if overrides == transfer[form]:
        expected.update({f"{form}/{i}/seed{s}": f"bound_transfer/{form}/seed{s}"
                         for s in (0, 1, 2)})
  assert len(expected) == 9 and linked == expected
  # The transfer sweep links the tuned table's no-reg runs, and nothing of its own into itself.
  study.share_tuned_runs(str(root), "vgg", transfer_sweep, str(root / "bound_transfer"))
  assert sorted(str(p.relative_to(root)) for p in root.glob("bound_transfer/*/seed*")
                if p.is_symlink()) == [f"bound_transfer/no-reg/seed{s}" for s in (0, 1, 2)]


def test_the_curves_runs_are_reused_by_the_tables_that_measure_more_settings(tmp_path):
  """A trade-off run at a tuned choice trains as the tuned table's run but measured fewer bit
  settings: the table's run starts from its last checkpoint (and sweeps) instead of linking it;
  a source that measured every setting is linked."""
  root = tmp_path / "vgg"
  curves_sweep = run_sweep.load_sweep(table("tradeoff", "net=vgg"))
  with open(os.path.join(RESULTS, TUNING_RESULTS["vgg"], "choices.json")) as f:
    choices = {m: c["overrides"] for m, c in json.load(f)["methods"].items()}
  tuned_sweep = run_sweep.load_sweep(table("tuned", "net=vgg"), choices)
  pairs = study.same_training(curves_sweep, tuned_sweep)
  assert pairs["l1/1/seed0"] == "l1/seed0" and pairs["kure/1/seed2"] == "kure/seed2"
  for name in ("l1/1/seed0", "l2/2/seed0"):
    run = root / "tradeoff" / name
    (run / "checkpoints" / "1287").mkdir(parents=True)
    (run / "checkpoints" / "1716").mkdir()
    (run / "checkpoints" / "1716" / "state").write_text("weights")
    rows = [{"weight_bits": w, "act_bits": a, "accuracy": 0.5} for w, a in tradeoff.BIT_SETTINGS]
    (run / "results.json").write_text(json.dumps({"rows": rows}))
  every = [{"weight_bits": w, "act_bits": a, "accuracy": 0.5}
           for w, a in tuned_sweep.config(tuned_sweep.run("l2/seed0")).quant.bit_settings]
  (root / "tradeoff" / "l2/2/seed0" / "results.json").write_text(json.dumps({"rows": every}))
  study.share_from(study.curve_runs(str(root), "vgg"), str(root), tuned_sweep, str(root / "tuned"))
  reused = root / "tuned" / "l1/seed0"
  assert not reused.is_symlink() and sorted(os.listdir(reused)) == ["checkpoints", "config.json"]
  assert os.listdir(reused / "checkpoints") == ["1716"]
  assert (reused / "checkpoints" / "1716" / "state").read_text() == "weights"
  assert json.loads((reused / "config.json").read_text())["reg"]["lambda_a"] == 0.003
  assert os.readlink(root / "tuned" / "l2/seed0") == str(root / "tradeoff" / "l2/2/seed0")
  assert sorted(p.name for p in (root / "tuned").glob("*/*")) == ["seed0", "seed0"]
