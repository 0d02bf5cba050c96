"""experiments.study end to end on a tiny fabricated network: tune on the validation split, the
tuned table on the test set, both protocols' tables; resumed, it redoes nothing but what is
unfinished."""
import json
import os
import shutil

import pytest

from experiments import bound_tightness, run_sweep, study

TUNING = '''
from tests.fakes import tiny_config
IDX = {idx!r}
CRITERION_SETTINGS = ((4, 4),)
MAX_FLOAT_DROP = 100.0
def get_config(arg=None):
  config = tiny_config(IDX)
  config.data.validation_size = 16
  config.eval.split = "validation"
  config.quant.bit_settings = [(None, None), (4, 4)]
  return config
def sweep(arg=None):
  no_penalty = {{"reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}
  return [{{"name": "no-reg", "labels": {{"method": "no-reg", "seed": 0}}, "overrides": no_penalty}}] + [
      {{"name": f"l1/{{i}}", "labels": {{"method": "l1", "value": i, "seed": 0}},
       "overrides": {{"reg.lambda_a": a, "reg.lambda_w": a / 10}}, "warm_start": "no-reg"}}
      for i, a in enumerate((0.001, 0.01))]
'''
TUNED = '''
import importlib.util, os
spec = importlib.util.spec_from_file_location("tuning", os.path.join(os.path.dirname(__file__), "tuning.py"))
tuning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tuning)
SEEDS = (0, 1)
def get_config(arg=None):
  config = tuning.get_config(arg)
  config.eval.split = "test"
  return config
def sweep(arg=None, *, choices):
  chosen = {{"no-reg": {{"reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}, **choices}}
  return [{{"name": f"{{m}}/seed{{s}}", "labels": {{"method": m, "seed": s}},
           "overrides": {{**o, "seed": s}}, "warm_start": None if m == "no-reg" else f"no-reg/seed{{s}}"}}
          for s in SEEDS for m, o in chosen.items()]
'''


DEFAULT = '''
from tests.fakes import tiny_config
def get_config(arg=None):
  return tiny_config({idx!r})
def sweep(arg=None):
  return [{{"name": "l1", "overrides": {{}}}},
          {{"name": "no_reg", "overrides": {{"reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}}}]
'''


@pytest.fixture
def tiny_study(idx_dir, tmp_path, monkeypatch):
  """A network `tiny` whose tuning and tuned sweeps train tiny_config; results in tmp_path."""
  tables = tmp_path / "tables"
  tables.mkdir()
  (tables / "tuning.py").write_text(TUNING.format(idx=idx_dir))
  (tables / "tuned.py").write_text(TUNED.format())
  (tables / "default.py").write_text(DEFAULT.format(idx=idx_dir))
  monkeypatch.setattr(study, "TABLES", str(tables))
  monkeypatch.setattr(study, "RESULTS", str(tmp_path / "results"))
  monkeypatch.setattr(study, "NETWORKS", {"tiny": study.Network("tiny/tuning", "tiny")})
  # The bound's tightness each table run records as it ends: at one width, on one batch here.
  monkeypatch.setattr(bound_tightness, "WIDTHS", (4,))
  monkeypatch.setattr(bound_tightness, "NUM_BATCHES", 1)
  return tmp_path / "workdirs", tmp_path / "results"


def test_network_table_study_end_to_end_and_resumed(tiny_study, tmp_path, capsys, monkeypatch):
  """The study end to end, each run archived as it ends (--archive); resumed, it redoes only
  what is unfinished; with --tuning=committed it retrains nothing of the tuning; and a workdir
  lost comes back from the archive, nothing trained or re-swept again, the tables the same."""
  workdir, results = tiny_study
  archived = tmp_path / "archive"
  study.run_study("network_table", str(workdir), "tiny", archive_dir=str(archived))

  choices = json.loads((results / "tiny" / "tuning" / "choices.json").read_text())
  assert list(choices["methods"]) == ["l1"]
  # The tuned sweep ran the choice, handed over by the study: each seed's l1 run has its lambdas.
  chosen = choices["methods"]["l1"]["overrides"]
  for seed in (0, 1):
    run = json.loads((workdir / "tiny" / "tuned" / "l1" / f"seed{seed}" / "run.json").read_text())
    assert run["overrides"] == {**chosen, "seed": seed}
    config = json.loads((workdir / "tiny" / "tuned" / "l1" / f"seed{seed}" / "config.json").read_text())
    assert config["eval"]["split"] == "test"
    assert (config["reg"]["lambda_a"], config["seed"]) == (chosen["reg.lambda_a"], seed)
  for protocol in ("paper", "strong"):
    per_seed = json.loads((results / "tiny" / protocol / "per_seed.json").read_text())
    assert {m: [r["seed"] for r in runs] for m, runs in per_seed.items()} == {
        "no-reg": [0, 1], "l1": [0, 1]}
    assert (results / "tiny" / protocol / "gains.md").exists()
  for run in ("no-reg/seed0", "l1/seed1"):  # the bound's tightness, measured as each run ended
    tightness = json.loads((workdir / "tiny" / "tuned" / run / "tightness.json").read_text())
    assert set(tightness["measured"]["both"]) == {"4"} and tightness["batches"] == 1
  strong = json.loads((workdir / "tiny" / "tuned" / "l1" / "seed1" / "results_strong.json").read_text())
  assert strong["config"]["quant"]["per_channel"] and strong["config"]["quant"]["bias_correction"]

  # Resumed: finished runs and re-sweeps are kept; a results.json cut short while being written
  # is run again (its sweep only), and the tables come back the same.
  runs = sorted((workdir / "tiny").glob("*/**/results*.json"))
  mtimes = {path: os.path.getmtime(path) for path in runs}
  tables = {p: (results / "tiny" / p / "table.md").read_text() for p in ("paper", "strong")}
  cut = workdir / "tiny" / "tuned" / "no-reg" / "seed1" / "results.json"
  cut.write_text(cut.read_text()[:200])
  study.run_study("network_table", str(workdir), "tiny")
  assert run_sweep.is_finished(str(cut.parent))
  assert {path for path in runs if os.path.getmtime(path) != mtimes[path]} == {cut}
  assert {p: (results / "tiny" / p / "table.md").read_text() for p in tables} == tables

  # --tuning=committed: a table run whose workdir is gone is retrained at the committed choices,
  # nothing of the tuning trained, and the table comes back the same (one run: each costs).
  shutil.rmtree(workdir / "tiny" / "tuning")
  shutil.rmtree(workdir / "tiny" / "tuned" / "l1" / "seed1")
  study.run_study("network_table", str(workdir), "tiny", tuning="committed")
  assert not (workdir / "tiny" / "tuning").exists()
  assert {p: (results / "tiny" / p / "table.md").read_text() for p in tables} == tables

  # --archive: the workdir lost, the study comes back from the archive (the first run's records).
  assert (archived / "tiny" / "tuned" / "l1" / "seed1" / "results_strong.json").exists()
  assert (archived / "tiny" / "tuned" / "l1" / "seed1" / "tightness.json").exists()
  shutil.rmtree(workdir)
  capsys.readouterr()
  study.run_study("network_table", str(workdir), "tiny", archive_dir=str(archived))
  out = capsys.readouterr().out
  assert "runs to train" not in out and ": strong ===" not in out and "tightness ===" not in out
  assert {p: (results / "tiny" / p / "table.md").read_text() for p in tables} == tables
  machines = json.loads((results / "tiny" / "paper" / "machines.json").read_text())
  assert list(machines.values()) == [4]  # this machine: no-reg and l1, 2 seeds

  # An extension table in the restored workdir: share_into_extensions links in the tuned runs
  # that train as its runs do (no-reg; l1 at the same choice), not a run at another λ.
  ext = results / "tiny" / "bound" / "tuning" / "choices.json"
  ext.parent.mkdir(parents=True)
  ext.write_text(json.dumps({"methods": {
      "l1": {"overrides": chosen},
      "l1-other": {"overrides": {**chosen, "reg.lambda_a": chosen["reg.lambda_a"] * 3}}}}))
  (workdir / "tiny" / "bound").mkdir()
  monkeypatch.setattr(study.tuned, "SEEDS", (0, 1))  # the tiny tuned table's seeds
  study.share_into_extensions(str(workdir / "tiny"), "tiny")
  linked = {f"{m}/seed{s}" for m in ("no-reg", "l1", "l1-other") for s in (0, 1)
            if (workdir / "tiny" / "bound" / m / f"seed{s}").is_symlink()}
  assert linked == {"no-reg/seed0", "no-reg/seed1", "l1/seed0", "l1/seed1"}
  assert os.path.samefile(workdir / "tiny" / "bound" / "l1" / "seed1",
                          workdir / "tiny" / "tuned" / "l1" / "seed1")


def test_committed_tuning_needs_the_committed_choices(tiny_study):
  workdir, results = tiny_study
  with pytest.raises(FileNotFoundError, match="--tuning=committed: .*choices.json not found"):
    study.run_study("network_table", str(workdir), "tiny", tuning="committed")
  with pytest.raises(ValueError, match="--tuning=latest: expected one of run, committed"):
    study.run_study("network_table", str(workdir), "tiny", tuning="latest")
  assert not workdir.exists() and not results.exists()


def test_default_comparison_study(tiny_study):
  """The default run and its no-reg twin per-tensor and per-channel, and the l1 run's exports,
  each export evaluated at the sweep's accuracy."""
  workdir, results = tiny_study
  study.run_study("default_comparison", str(workdir))
  out = results / "default_comparison"
  comparison = (out / "comparison.md").read_text()
  assert comparison.startswith("| weight bits | activation bits | no-reg per-tensor (%) | "
                               "l1 per-tensor (%) | no-reg per-channel (%) | l1 per-channel (%) |")
  per_tensor = json.loads((out / "l1.json").read_text())["rows"]
  per_channel = json.loads((out / "l1_per_channel.json").read_text())
  assert per_channel["config"]["quant"]["per_channel"]
  assert [r["accuracy"] for r in per_channel["rows"]][0] == per_tensor[0]["accuracy"]  # float
  sizes = (out / "export_sizes.md").read_text()
  for bits in (8, 6, 4):
    assert f"| {bits}-bit export (.npz) |" in sizes
  # The 4-bit file, evaluated, gives the sweep's accuracy at (4,4) exactly.
  exported = json.loads((workdir / "small_cnn" / "default" / "l1" / "export_w4_results.json")
                        .read_text())["rows"]
  assert [(r["weight_bits"], r["act_bits"]) for r in exported] == [(4, 4)]
  assert exported[0]["accuracy"] == next(r["accuracy"] for r in per_tensor
                                         if (r["weight_bits"], r["act_bits"]) == (4, 4))
  assert (out / "export_w4_results.md").exists()
