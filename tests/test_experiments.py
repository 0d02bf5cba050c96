"""The sweep configs and the experiments tools (run_sweep, tune, make_tables, reevaluate, table1),
against hand-computed expectations and naive loops."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import chex
import numpy as np
import jax
import optax
import orbax.checkpoint as ocp
import pytest

from configs.tables import lazy, paper, tuning
from experiments import bound_tightness, bound_transfer, cle_ladder, folded_ranges, make_tables, mixed_precision
from experiments import archive, reevaluate
from experiments import run_sweep, study, table1
from experiments import tune
from qreg import config as config_lib
from qreg import checkpoint, evaluate, ptq, train
from qreg.models import SmallCNN
from tests.fakes import tiny_config, write_idx_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(REPO, "configs", "tables")
RESULTS = os.path.join(REPO, "experiments", "results")


def table(name: str, arg: str = "") -> str:
  return os.path.join(TABLES, f"{name}.py") + (f":{arg}" if arg else "")


def validated(sweep, run, tmp_path):
  config = sweep.config(run)
  if config.data.source == "idx":
    config.data.data_dir = str(tmp_path)  # validated without the real files
  config_lib.validate(config, num_devices=1)
  return config


@pytest.mark.parametrize("spec", [table("paper", f"net={net}") for net in paper.CONFIGS]
                         + [table("impls"), table("lambda_search"),
                            table("default")])
def test_table_configs_list_valid_runs(spec, tmp_path):
  sweep = run_sweep.load_sweep(spec)
  if ":net=" in spec:
    assert {r["labels"]["method"] for r in sweep.runs} == {"no-reg", "l2", "l1", "ste-qat@4",
                                                          "kure"}
    assert {r["labels"]["seed"] for r in sweep.runs} == {0, 1, 2}
  model = SmallCNN()
  for run in sweep.runs:
    config = validated(sweep, run, tmp_path)
    optimizer = train.build_optimizer(config.optim, 10, 5)
    plain = config.reg.lambda_w == config.reg.lambda_a == 0
    assert (train.build_method_steps(config, model, optimizer, 1) is None) == (
        plain and run.get("labels", {}).get("method", "no-reg") == "no-reg")
    assert config_lib.parse_bit_settings(config.quant.bit_settings)[0] == (None, None)


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="net='nope'"):
    run_sweep.load_sweep(table("tuning", "net=nope"))
  with pytest.raises(ValueError, match="key one of net, grid"):
    run_sweep.load_sweep(table("tuning", "width=2"))
  with pytest.raises(ValueError, match="grid='low' on net='vgg'"):
    run_sweep.load_sweep(table("tuning", "net=vgg,grid=low"))
  with pytest.raises(ValueError, match="pass --choices"):
    run_sweep.load_sweep(table("tuned", "net=vgg"))
  with pytest.raises(ValueError, match="takes no choices"):
    run_sweep.load_sweep(table("tuning"), choices={})


SWEEP_FILE = '''
from tests.fakes import tiny_config
IDX = {idx!r}
def get_config(arg=None):
  config = tiny_config(IDX)
  config.quant.bit_settings = [(None, None), (4, 4)]
  return config
def sweep(arg=None):
  runs = []
  for seed in (0, 1):
    runs.append({{"name": f"base/seed{{seed}}", "labels": {{"method": "base", "seed": seed}},
                 "overrides": {{"seed": seed, "reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}}})
    runs.append({{"name": f"l1/seed{{seed}}", "labels": {{"method": "l1", "seed": seed}},
                 "overrides": {{"seed": seed}}, "warm_start": f"base/seed{{seed}}"}})
  runs.append({{"name": "l1-scratch", "overrides": {{"seed": 0}}}})
  return runs
'''


@pytest.fixture
def tiny_sweep(tmp_path):
  idx_dir = tmp_path / "idx"
  idx_dir.mkdir()
  write_idx_dir(idx_dir, 64, 20)
  path = tmp_path / "sweep.py"
  path.write_text(SWEEP_FILE.format(idx=str(idx_dir)))
  return str(path), str(idx_dir)


def test_sweep_runner_warm_start_skips_and_tables(tiny_sweep, tmp_path, capsys):
  sweep_path, _ = tiny_sweep
  root = tmp_path / "runs"
  run_sweep.run_sweep(sweep_path, str(root))
  # Progress: what is left to train, each run's place in it, and from the second on an estimate.
  out = capsys.readouterr().out
  assert f"=== {root}: 5 of 5 runs to train ===" in out and "=== base/seed0 (1 of 5) ===" in out
  assert re.search(r"=== l1-scratch \(5 of 5, about \d+ s left\) ===", out)

  # The warm-started run equals the same run trained from scratch.
  final = lambda name: ocp.CheckpointManager(str(root / name / "checkpoints")).restore(16)
  chex.assert_trees_all_equal(final("l1/seed0")["params"], final("l1-scratch")["params"])

  # Finished runs are skipped.
  mtime = os.path.getmtime(root / "l1/seed0" / "results.json")
  run_sweep.run_sweep(sweep_path, str(root))
  assert os.path.getmtime(root / "l1/seed0" / "results.json") == mtime

  table_md = make_tables.make_tables(str(root), str(tmp_path / "tables"))
  accuracies = []
  for seed in (0, 1):
    with open(root / f"l1/seed{seed}" / "results.json") as f:
      accuracies.append([100 * r["accuracy"] for r in json.load(f)["rows"]])
  mean, std = np.mean(accuracies, 0), np.std(accuracies, 0, ddof=1)
  assert f"| l1 | {mean[0]:.2f} ± {std[0]:.2f} | {mean[1]:.2f} ± {std[1]:.2f} | 2 |" in table_md
  assert (tmp_path / "tables" / "accuracy.png").stat().st_size > 0

  # A truncated results.json (a process killed while writing it) is not a finished run: the
  # runner runs it again (its training is done: only the sweep reruns) and the tables skip it.
  path = root / "l1/seed1" / "results.json"
  expected = json.loads(path.read_text())["rows"]
  path.write_text(path.read_text()[:50])
  assert not run_sweep.is_finished(str(root / "l1/seed1"))
  assert [m["seed"] for m in make_tables.collect(str(root))["l1"]] == [0]
  capsys.readouterr()
  run_sweep.run_sweep(sweep_path, str(root), only=["l1/seed1"])
  assert f"=== {root}: 1 of 1 runs to train ===" in capsys.readouterr().out
  assert json.loads(path.read_text())["rows"] == expected
  assert os.path.getmtime(root / "l1/seed0" / "results.json") == mtime


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tiny_sweep, tmp_path):
  _, idx_dir = tiny_sweep
  path = tmp_path / "diverging.py"
  path.write_text(SWEEP_FILE.format(idx=idx_dir).replace(
      'runs.append({"name": "l1-scratch", "overrides": {"seed": 0}})',
      'runs = [{"name": "blows-up", "overrides": {"seed": 0, "optim.learning_rate": 1e30}},'
      ' {"name": "fine", "overrides": {"seed": 0}}]'))
  root = tmp_path / "runs"
  run_sweep.run_sweep(str(path), str(root))
  assert "Non-finite training metrics" in run_sweep.diverged(str(root / "blows-up"))["message"]
  assert not run_sweep.is_finished(str(root / "blows-up"))
  assert run_sweep.is_finished(str(root / "fine"))
  mtime = os.path.getmtime(root / "blows-up" / run_sweep.DIVERGED)
  run_sweep.run_sweep(str(path), str(root))  # skipped, not retrained
  assert os.path.getmtime(root / "blows-up" / run_sweep.DIVERGED) == mtime


def test_workers_share_a_sweep_by_claiming_runs(tiny_sweep, tmp_path, capsys, caplog,
                                                monkeypatch):
  """Several workers on one sweep: each trains the runs no live worker claims; one that runs out
  waits for the runs others hold, then does those they left undone, so that what follows the
  sweep starts only once every run is done."""
  sweep_path, _ = tiny_sweep
  monkeypatch.setattr(run_sweep, "POLL_SECONDS", 0.1)
  root = tmp_path / "runs"
  only = ["base/seed0", "l1/seed0", "base/seed1", "l1-scratch"]
  held = ["l1/seed0", "base/seed1"]  # by the other worker
  with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as other:
    claim = {"pid": other.pid, "host": socket.gethostname(), "since": "earlier"}
    for name in held:
      (root / name).mkdir(parents=True)
      (root / name / run_sweep.CLAIM).write_text(json.dumps(claim))

    def other_ends():  # it finishes l1/seed0 and dies in base/seed1, leaving both claims behind
      shutil.copy(root / "base/seed0" / "results.json", root / "l1/seed0")
      other.kill()
      other.wait()

    def after_run(run_dir):
      # A run's re-sweeps run under its claim (study.resweeps), not waiting for themselves.
      reevaluate.reevaluate_sweep(run_dir, "paper")
      if run_dir.endswith("base/seed0"):
        # l1-scratch ends in another worker while base/seed0 trains here; the other holder is
        # still alive when this worker runs out of runs, and ends while it waits.
        os.makedirs(root / "l1-scratch")
        shutil.copy(os.path.join(run_dir, "results.json"), root / "l1-scratch")
        threading.Timer(3.0, other_ends).start()

    with caplog.at_level("INFO"):
      run_sweep.run_sweep(sweep_path, str(root), only=only, after_run=after_run)
  out = capsys.readouterr().out
  assert f"=== waiting for 2 runs other workers hold ({root / 'l1/seed0'}" in out
  assert "Skipping l1-scratch: finished by another worker." in caplog.text
  assert "Skipping l1/seed0: finished by another worker." in caplog.text
  assert sorted(os.listdir(root / "l1-scratch")) == ["results.json"]  # not trained again
  assert sorted(os.listdir(root / "l1/seed0")) == ["results.json"]
  for name in ("base/seed0", "base/seed1"):  # base/seed1: the dead worker's, trained here
    assert run_sweep.is_finished(str(root / name))
    assert run_sweep.is_finished(str(root / name), reevaluate.results_name("paper"))
  assert not list(root.glob("**/" + run_sweep.CLAIM))


def test_a_worker_that_does_not_wait_leaves_the_held_runs_and_returns(tmp_path, capsys):
  """wait=False: one pass over the items, work done on the free ones under their claims, the ones
  a live worker holds left to it, and no waiting (a study trains a second sweep's free runs
  before it waits for the first's)."""
  done = []
  with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as other:
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / run_sweep.CLAIM).write_text(json.dumps(
        {"pid": other.pid, "host": socket.gethostname(), "since": "earlier"}))

    def work(name):
      assert (tmp_path / name / run_sweep.CLAIM).exists()  # under its claim
      done.append(name)

    start = time.time()
    run_sweep.for_each_claimed(["free", "held", "also-free"], lambda name: str(tmp_path / name),
                               work, wait=False)
    assert time.time() - start < run_sweep.POLL_SECONDS
    other.kill()
  assert done == ["free", "also-free"]
  assert "waiting" not in capsys.readouterr().out
  assert not (tmp_path / "free" / run_sweep.CLAIM).exists()  # released


def test_a_run_waits_for_the_run_it_warm_starts_from_while_another_worker_trains_it(
    tiny_sweep, tmp_path, capsys, caplog, monkeypatch):
  """A worker does not train a warm-started run's shared epochs again while another worker is
  training its source: it takes other runs first, then waits, then starts from the source's
  checkpoint, and the run equals the one a single worker trains."""
  sweep_path, _ = tiny_sweep
  monkeypatch.setattr(run_sweep, "POLL_SECONDS", 0.1)
  single, root = tmp_path / "single", tmp_path / "runs"
  run_sweep.run_sweep(sweep_path, str(single), only=["base/seed0", "l1/seed0"])
  capsys.readouterr()
  with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as other:
    (root / "base/seed0").mkdir(parents=True)  # the other worker is training it
    (root / "base/seed0" / run_sweep.CLAIM).write_text(json.dumps(
        {"pid": other.pid, "host": socket.gethostname(), "since": "earlier"}))

    def other_ends():  # it finishes base/seed0 and releases its claim
      shutil.copytree(single / "base/seed0", root / "base/seed0", dirs_exist_ok=True)
      other.kill()
      other.wait()

    def after_run(run_dir):
      if run_dir.endswith("base/seed1"):
        threading.Timer(2.0, other_ends).start()

    with caplog.at_level("INFO"):
      run_sweep.run_sweep(sweep_path, str(root), only=["l1/seed0", "base/seed1"],
                          after_run=after_run)
  out = capsys.readouterr().out
  assert out.index("=== base/seed1 (1 of 2) ===") < out.index("=== l1/seed0 (2 of 2")
  assert f"=== waiting for 1 runs other workers hold ({root / 'base/seed0'})" in out
  assert "it starts from" in caplog.text
  assert "l1/seed0 starts from base/seed0's checkpoint at epoch 1." in caplog.text
  rows = lambda run_dir: json.load(open(run_dir / "results.json"))["rows"]
  assert rows(root / "l1/seed0") == rows(single / "l1/seed0")
  assert not list(root.glob("**/" + run_sweep.CLAIM))


def test_a_restored_run_without_its_final_checkpoint_is_not_re_swept(tiny_sweep, tmp_path):
  """A run restored from the archive keeps only the checkpoint others warm-start from: a re-sweep
  (or any analysis of the trained model) must not take that earlier step for the trained one."""
  sweep_path, _ = tiny_sweep
  root = tmp_path / "runs"
  run_sweep.run_sweep(sweep_path, str(root), only=["base/seed0"])
  run_dir = root / "base/seed0"
  steps = sorted(int(step) for step in os.listdir(run_dir / "checkpoints") if step.isdigit())
  assert run_sweep.load_finished_run(str(run_dir)).step == steps[-1] == 16 and len(steps) > 1
  for step in steps[1:]:  # what the archive restores of a source run: its first checkpoint
    shutil.rmtree(run_dir / "checkpoints" / str(step))
  with pytest.raises(FileNotFoundError, match=f"its results are of step 16, its latest "
                                              f"checkpoint is of step {steps[0]}"):
    reevaluate.reevaluate_sweep(str(root), "paper")
  assert not (run_dir / reevaluate.results_name("paper")).exists()


def test_a_run_that_trains_as_a_finished_one_reuses_its_training(tiny_sweep, tmp_path):
  """A run measuring other bit settings than a finished run with the same training starts from
  that run's last checkpoint: only its sweep runs, and it equals the run trained from scratch."""
  sweep_path, idx_dir = tiny_sweep
  run_sweep.run_sweep(sweep_path, str(tmp_path / "a"), only=["l1-scratch"])
  more = tmp_path / "more_settings.py"
  more.write_text(SWEEP_FILE.format(idx=idx_dir).replace("[(None, None), (4, 4)]",
                                                          "[(None, None), (3, 3), (4, 4)]"))
  sweep = run_sweep.load_sweep(str(more))
  source, reused = str(tmp_path / "a" / "l1-scratch"), str(tmp_path / "b" / "l1-scratch")
  # Another worker of the same study puts the run there while this one copies: it keeps theirs.
  raced, write_run_config = str(tmp_path / "raced" / "l1-scratch"), checkpoint.write_run_config
  def other_worker_first(config, workdir):
    write_run_config(config, workdir)
    os.makedirs(os.path.join(raced, "theirs"))
  with mock.patch.object(checkpoint, "write_run_config", other_worker_first):
    assert not run_sweep.reuse_training(source, raced, sweep.config(sweep.run("l1-scratch")))
  assert os.listdir(raced) == ["theirs"] and os.listdir(tmp_path / "raced") == ["l1-scratch"]
  assert run_sweep.reuse_training(source, reused, sweep.config(sweep.run("l1-scratch")))
  assert not run_sweep.reuse_training(source, reused, sweep.config(sweep.run("l1-scratch")))
  run_sweep.run_sweep(str(more), str(tmp_path / "b"), only=["l1-scratch"])
  assert os.listdir(os.path.join(reused, "checkpoints")) == ["16"]  # nothing trained
  run_sweep.run_sweep(str(more), str(tmp_path / "c"), only=["l1-scratch"])  # from scratch
  rows = lambda run_dir: json.load(open(os.path.join(run_dir, "results.json")))["rows"]
  accuracies = lambda run_dir: [(r["weight_bits"], r["act_bits"], r["accuracy"])
                                for r in rows(run_dir)]
  assert accuracies(reused) == accuracies(str(tmp_path / "c" / "l1-scratch"))
  assert [r for r in accuracies(reused) if r[:2] != (3, 3)] == accuracies(source)
  assert list(checkpoint.read_run_config(reused).quant.bit_settings) == [(None, None), (3, 3),
                                                                        (4, 4)]


def test_archive_kept_computes_a_record_once_per_batch_count_and_archives_it(tmp_path):
  run_dir, archived = tmp_path / "work" / "run", tmp_path / "archive"
  run_dir.mkdir(parents=True)
  calls = []

  def compute(batches):
    calls.append(batches)
    return {"value": len(calls), "batches": batches}

  try:
    archive.configure(str(tmp_path / "work"), str(archived))
    assert archive.kept(str(run_dir), "rec.json", 2, lambda: compute(2)) == {"value": 1, "batches": 2}
    assert archive.kept(str(run_dir), "rec.json", 2, lambda: compute(2)) == {"value": 1, "batches": 2}
    assert json.loads((archived / "run" / "rec.json").read_text()) == {"value": 1, "batches": 2}
    assert archive.kept(str(run_dir), "rec.json", 3, lambda: compute(3))["value"] == 2
    (run_dir / "rec.json").write_text("[1, 2]")  # not a record: computed again
    assert archive.kept(str(run_dir), "rec.json", 3, lambda: compute(3))["value"] == 3
    assert calls == [2, 3, 3]
    assert set(json.loads((archived / "run" / "archive.json").read_text())) == {"rec.json"}
  finally:
    archive.configure(None, None)


def test_archive_resumes_a_sweep_in_a_fresh_workdir(tiny_sweep, tmp_path, capsys):
  """A session trains base/seed0 with archiving on, and its workdir is lost. The next one, in an
  empty workdir, gets base/seed0's records back (not retrained), warm-starts l1/seed0 from the
  archived checkpoint (same weights as training from scratch), and cannot re-sweep the restored
  run on weights it no longer has."""
  sweep_path, _ = tiny_sweep
  archived = tmp_path / "archive"
  try:
    archive.configure(str(tmp_path / "lost"), str(archived))
    run_sweep.run_sweep(sweep_path, str(tmp_path / "lost" / "runs"), only=["base/seed0"])
    first = (tmp_path / "lost" / "runs" / "base/seed0" / "results.json").read_bytes()
    kept = archived / "runs" / "base/seed0"
    assert sorted(p.name for p in kept.iterdir()) == [
        "archive.json", "checkpoints", "config.json", "results.json", "run.json"]
    assert [p.name for p in (kept / "checkpoints").iterdir()] == ["8"]  # epoch 1 of 2: 8 steps
    provenance = json.loads((kept / "archive.json").read_text())
    assert set(provenance) == {"checkpoints/8", "config.json", "results.json", "run.json"}
    assert provenance["results.json"]["backend"] == "cpu"

    workdir = tmp_path / "fresh"
    archive.configure(str(workdir), str(archived))
    assert archive.sync("") == (1, 0)
    assert archive.sync("") == (0, 0)  # nothing left to restore, nothing new to archive
    assert not (workdir / "runs" / "base/seed0" / "checkpoints").exists()
    capsys.readouterr()
    run_sweep.run_sweep(sweep_path, str(workdir / "runs"), only=["base/seed0", "l1/seed0",
                                                                  "l1-scratch"])
    assert f"=== {workdir / 'runs'}: 2 of 3 runs to train ===" in capsys.readouterr().out
    assert (workdir / "runs" / "base/seed0" / "results.json").read_bytes() == first
    final = lambda name: ocp.CheckpointManager(
        str(workdir / "runs" / name / "checkpoints")).restore(16)
    chex.assert_trees_all_equal(final("l1/seed0")["params"], final("l1-scratch")["params"])
    assert (archived / "runs" / "l1/seed0" / "results.json").read_bytes() == (
        workdir / "runs" / "l1/seed0" / "results.json").read_bytes()
    tables = make_tables.make_tables(str(workdir / "runs"), str(tmp_path / "tables"))
    assert "| l1 |" in tables  # the restored and the new runs alike, and where they were trained:
    machines = json.loads((tmp_path / "tables" / "machines.json").read_text())
    assert list(machines.values()) == [3] and list(machines)[0].endswith("(cpu)")
    with pytest.raises(FileNotFoundError, match="no checkpoint to re-sweep"):
      reevaluate.reevaluate_sweep(str(workdir / "runs" / "base"), "strong")
  finally:
    archive.configure(None, None)


def test_a_restored_run_is_rebuilt_as_a_twin_equal_to_its_trained_model(tiny_sweep, tmp_path,
                                                                        capsys):
  """A run restored from the archive lacks its trained model; its twin, retrained from the
  archived checkpoint it started from (a warm start's, or its own), has the trained weights
  bit for bit (one machine), and a record says the twin's results equal the run's."""
  sweep_path, _ = tiny_sweep
  lost, fresh = tmp_path / "lost" / "runs", tmp_path / "fresh" / "runs"
  try:
    archive.configure(str(tmp_path / "lost"), str(tmp_path / "archive"))
    run_sweep.run_sweep(sweep_path, str(lost), only=["base/seed0", "l1/seed0"])
    trained = {name: ocp.CheckpointManager(str(lost / name / "checkpoints")).restore(16)
               for name in ("base/seed0", "l1/seed0")}
    archive.configure(str(tmp_path / "fresh"), str(tmp_path / "archive"))
    archive.sync("")
    for name in ("l1/seed0", "base/seed0"):
      run_dir = str(fresh / name)
      assert not run_sweep.has_trained_model(run_dir)
      assert run_sweep.trained_model_dir(run_dir) == run_dir  # rebuilding is asked for
      with pytest.raises(checkpoint.CheckpointError, match="No checkpoint"):
        run_sweep.load_finished_run(run_dir)
      twin = run_sweep.trained_model_dir(run_dir, rebuild=True)
      assert twin == os.path.join(run_dir, run_sweep.TWIN)
      # It started from the archived checkpoint at epoch 1 (8 steps) and trained the rest.
      assert sorted(os.listdir(os.path.join(twin, "checkpoints"))) == ["16", "8"]
      chex.assert_trees_all_equal(run_sweep.load_finished_run(twin).variables["params"],
                                  trained[name]["params"])
      assert run_sweep.read_twin_record(twin)["identical"] is True
      assert run_sweep.read_twin_record(twin)["max_accuracy_difference"] == 0
    capsys.readouterr()
    assert run_sweep.trained_model_dir(str(fresh / "l1/seed0"), rebuild=True).endswith("twin")
    assert "rebuilding" not in capsys.readouterr().out  # made once
    # The twin is neither a run of the sweep's tables nor archived.
    assert sorted(make_tables.collect(str(fresh))) == ["base", "l1"]
    assert not (tmp_path / "archive" / "runs" / "l1/seed0" / run_sweep.TWIN).exists()
    # The tightness of a restored run, measured on its twin, is the trained run's.
    measured = bound_tightness.measure(str(fresh / "l1/seed0"), num_batches=1, rebuild=True)
    assert measured.pop("twin")["identical"] is True
    own = bound_tightness.run_tightness(str(lost / "l1/seed0"), num_batches=1)
    assert measured == {**own, "batches": 1}
    # A run whose warm start is gone everywhere says so.
    shutil.rmtree(tmp_path / "archive" / "runs" / "base/seed0" / "checkpoints")
    shutil.rmtree(fresh / "base/seed0" / run_sweep.TWIN)
    with pytest.raises(FileNotFoundError, match="cannot be rebuilt: .*neither in the workdir"):
      run_sweep.rebuild_twin(str(fresh / "base/seed0"))
  finally:
    archive.configure(None, None)


def test_sweep_runner_rejects_bad_sweeps(tiny_sweep, tmp_path):
  sweep_path, idx_dir = tiny_sweep
  with pytest.raises(ValueError, match="--only names no run .*: nope"):
    run_sweep.run_sweep(sweep_path, str(tmp_path / "r"), only=["nope"])

  def write(sweep_body):
    path = tmp_path / "bad.py"
    path.write_text(f"from tests.fakes import tiny_config\n"
                    f"def get_config(arg=None):\n  return tiny_config({idx_dir!r})\n"
                    f"def sweep(arg=None):\n  return {sweep_body}\n")
    return str(path)

  with pytest.raises(ValueError, match="repeated: a"):
    run_sweep.load_sweep(write('[{"name": "a"}, {"name": "a"}]'))
  with pytest.raises(ValueError, match="warm_start names no run of the sweep: b"):
    run_sweep.load_sweep(write('[{"name": "a", "warm_start": "b"}]'))
  with pytest.raises(ValueError, match="reg.no_such_field"):
    run_sweep.run_sweep(write('[{"name": "a", "overrides": {"reg.no_such_field": 1}}]'),
                        str(tmp_path / "r"))
  # A warm start from a run that differs in more than the method fields.
  mismatch = write('[{"name": "a", "overrides": {"seed": 0}},'
                   ' {"name": "b", "overrides": {"seed": 1}, "warm_start": "a"}]')
  with pytest.raises(ValueError, match="Cannot warm-start .*differ in more than the method"):
    run_sweep.run_sweep(mismatch, str(tmp_path / "w"), only=["b"])
  with pytest.raises(FileNotFoundError, match="No sweep config"):
    run_sweep.load_sweep(str(tmp_path / "missing.py"))


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


def test_cle_ladder_pairs_methods_and_protocols_seed_by_seed(tmp_path):
  rng = np.random.default_rng(1)
  files = dict(cle_ladder.PROTOCOLS)
  settings = ((None, None), (8, 8), (4, 4), (3, 3))
  acc = {(p, m, seed): rng.uniform(0.1, 0.9, len(settings))
         for p in files for m in ("no-reg", "l1", "ste-qat") for seed in range(3)}
  for (p, m, seed), values in acc.items():
    run = tmp_path / m / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"name": f"{m}/seed{seed}",
                                              "labels": {"method": m, "seed": seed}}))
    rows = [{"weight_bits": w, "act_bits": a, "accuracy": float(v)}
            for (w, a), v in zip(settings, values)]
    if p == "strong":  # a protocol without (3,3): the ladder's columns are those all have
      rows = rows[:3]
    (run / files[p]).write_text(json.dumps({"rows": rows}))
  table = cle_ladder.write_ladder(str(tmp_path), str(tmp_path / "out"))
  assert "ste-qat" not in table  # not one of the ladder's methods
  with open(tmp_path / "out" / "ladder.json") as f:
    rows = json.load(f)
  assert {(r["protocol"], r["method"]) for r in rows} == {
      (p, m) for p in files for m in ("no-reg", "l1")}
  assert all([[a["weight_bits"], a["act_bits"]] for a in r["accuracy"]] == [
      list(s) for s in settings[:3]] for r in rows)
  # The paired gain of l1 over no-reg after CLE at (4,4), and what CLE buys l1 at (8,8).
  lines = table.splitlines()
  naive = [100 * (acc["cle", "l1", s][2] - acc["cle", "no-reg", s][2]) for s in range(3)]
  row = next(line for line in lines[lines.index(next(l for l in lines if "Paired gain" in l)):]
             if line.startswith("| cle | l1 |"))
  assert row.split(" | ")[4].startswith(f"{np.mean(naive):+.2f} ± {np.std(naive, ddof=1):.2f} (")
  naive = [100 * (acc["cle", "l1", s][1] - acc["paper", "l1", s][1]) for s in range(3)]
  row = [line for line in lines if line.startswith("| cle | l1 |")][-1]
  assert row.split(" | ")[3] == (f"{np.mean(naive):+.2f} ± {np.std(naive, ddof=1):.2f} ("
                                 + " / ".join(f"{d:+.1f}" for d in naive) + ")")


def committed_tables():
  return sorted(os.path.relpath(d, RESULTS) for d, _, files in os.walk(RESULTS)
                if "per_seed.json" in files)


@pytest.mark.parametrize("tables", committed_tables())
def test_committed_tables_regenerate_byte_identical_from_their_runs(tables, tmp_path):
  """Each committed table's runs, laid out as a sweep root, give back its committed files."""
  out = os.path.join(RESULTS, tables)
  with open(os.path.join(out, "per_seed.json")) as f:
    per_seed = json.load(f)
  names = []
  for method, runs in per_seed.items():
    for run in runs:
      name = f"{method}/seed{run['seed']}"
      (tmp_path / "root" / name).mkdir(parents=True)
      (tmp_path / "root" / name / "run.json").write_text(json.dumps(
          {"name": name, "labels": {"method": method, "seed": run["seed"]}}))
      (tmp_path / "root" / name / "results.json").write_text(json.dumps({"rows": run["rows"]}))
      names.append(name)
  (tmp_path / "root" / "sweep.json").write_text(json.dumps({"runs": names}))
  make_tables.make_tables(str(tmp_path / "root"), str(tmp_path / "out"))
  for name in ("table.md", "table.json", "per_seed.json", "gains.md", "gains.json"):
    if os.path.exists(os.path.join(out, name)):
      assert (tmp_path / "out" / name).read_bytes() == open(os.path.join(out, name), "rb").read(), name


def test_table1_regenerates_byte_identical(tmp_path, monkeypatch):
  monkeypatch.setattr(table1, "RESULTS", str(tmp_path))
  for network in table1.NETWORKS:
    for protocol in table1.PROTOCOLS:
      # The table's own runs and the supplements that join it (multi-bit QAT, bound forms, ...).
      for folder in [(protocol,)] + [(s, protocol) for s in table1.SUPPLEMENTS]:
        source = os.path.join(RESULTS, network, *folder, "per_seed.json")
        if os.path.exists(source):
          (tmp_path / network).joinpath(*folder).mkdir(parents=True)
          (tmp_path / network).joinpath(*folder, "per_seed.json").write_bytes(
              open(source, "rb").read())
  table1.write_table1()
  for name in ("table1.md", "table1.json"):
    assert (tmp_path / name).read_bytes() == open(os.path.join(RESULTS, name), "rb").read()


def test_table1_breaking_width_and_gains_against_a_naive_reading(tmp_path, monkeypatch):
  monkeypatch.setattr(table1, "RESULTS", str(tmp_path))
  rng = np.random.default_rng(1)
  # no-reg loses 2 points at 6 bits, 12 at 5 bits: it breaks at W5A5.
  drop = {None: 0.0, 8: 0.5, 6: 2.0, 5: 12.0, 4: 30.0, 3: 60.0, 2: 80.0}
  per_seed = {}
  for method, shift in (("no-reg", 0.0), ("l1", 5.0)):
    per_seed[method] = [{"seed": seed, "rows": [
        {"weight_bits": w, "act_bits": w,
         "accuracy": (90.0 - drop[w] + (shift + rng.normal() if w else 0.0)) / 100}
        for w in table1.WIDTHS]} for seed in (0, 1, 2)]
  (tmp_path / "vgg" / "paper").mkdir(parents=True)
  (tmp_path / "vgg" / "paper" / "per_seed.json").write_text(json.dumps(per_seed))
  found = table1.read_network("vgg", "paper")
  assert found["breaking_width"] == 5
  at = lambda m, s: 100 * next(r["accuracy"] for r in per_seed[m][s]["rows"] if r["weight_bits"] == 5)
  naive = [at("l1", s) - at("no-reg", s) for s in range(3)]
  np.testing.assert_allclose(found["gains"]["l1"], (np.mean(naive), np.std(naive, ddof=1)),
                             rtol=1e-12)
  assert "| vgg | paper | W5A5 |" in table1.markdown({"vgg": {"paper": found}})
  # A supplement's rows (experiments.study multibit_qat) join the table, each paired against
  # its own sweep's no-reg runs.
  supplement = {"no-reg": [dict(run, rows=[dict(r, accuracy=r["accuracy"] - 0.01 * run["seed"])
                                           for r in run["rows"]]) for run in per_seed["no-reg"]],
                "multibit-qat": per_seed["l1"][::-1]}
  (tmp_path / "vgg" / "multibit" / "paper").mkdir(parents=True)
  (tmp_path / "vgg" / "multibit" / "paper" / "per_seed.json").write_text(json.dumps(supplement))
  found = table1.read_network("vgg", "paper")
  assert list(found["table"]) == ["no-reg", "l1", "multibit-qat"]
  np.testing.assert_allclose(list(found["table"]["multibit-qat"].values()),
                             list(found["table"]["l1"].values()), rtol=1e-12)
  naive = [at("l1", s) - (at("no-reg", s) - s) for s in range(3)]
  np.testing.assert_allclose(found["gains"]["multibit-qat"], (np.mean(naive), np.std(naive, ddof=1)),
                             rtol=1e-12)
  assert found["no_reg_differs"] == {"multibit": True}
  assert "differ from the table's in: vgg paper (multibit)" in table1.markdown(
      {"vgg": {"paper": found}})


def write_tuning_results(root, grid_runs, float_and_low):
  """Fake validation results: {run name: (float accuracy, accuracy at every other setting)}."""
  for name, (float_acc, low_acc) in float_and_low.items():
    os.makedirs(root / name, exist_ok=True)
    rows = [{"weight_bits": w, "act_bits": a,
             "accuracy": float_acc if w is None and a is None else low_acc}
            for w, a in ((None, None), (4, 4), (3, 3))]
    (root / name / "results.json").write_text(json.dumps(
        {"rows": rows, "config": {"eval": {"split": "validation"}}}))
  return [{"name": "no-reg", "overrides": {}, "labels": {"method": "no-reg"}}] + grid_runs


def grid_runs(method, n):
  return [{"name": f"{method}/{i}", "overrides": {"v": i}, "labels": {"method": method, "value": i}}
          for i in range(n)]


def test_tune_chooses_by_the_criterion_with_its_fallback_ties_and_limit(tmp_path):
  runs = write_tuning_results(tmp_path, grid_runs("a", 4) + grid_runs("b", 3) + grid_runs("c", 3), {
      "no-reg": (0.92, 0.5),
      # a: value 3 scores best but loses 7 points; value 1 loses exactly the limit (1 point).
      "a/0": (0.92, 0.6), "a/1": (0.91, 0.8), "a/2": (0.905, 0.9), "a/3": (0.85, 0.95),
      # b: every value loses more than the limit: the best float accuracy is chosen.
      "b/0": (0.80, 0.9), "b/1": (0.85, 0.7), "b/2": (0.82, 0.95),
      # c: a tie on the criterion goes to the larger value.
      "c/0": (0.92, 0.7), "c/1": (0.92, 0.7), "c/2": (0.80, 0.99)})
  choice = tune.choose(runs, str(tmp_path), ((4, 4), (3, 3)), 1.0)
  assert {m: c["value"] for m, c in choice["methods"].items()} == {"a": 1, "b": 1, "c": 1}
  assert choice["methods"]["a"]["overrides"] == {"v": 1}
  eligible = {(g["method"], g["value"]): g["eligible"] for g in choice["grid"]}
  assert eligible[("a", 1)] and not eligible[("a", 2)]  # 1.0 point is within, 1.5 is not
  assert "(float drop > limit)" in tune.markdown(choice)

  # A run the sweep runner recorded as diverged is never chosen, and says so in the grid.
  os.makedirs(tmp_path / "d/1")
  (tmp_path / "d/1" / run_sweep.DIVERGED).write_text(json.dumps({"message": "NaN"}))
  write_tuning_results(tmp_path, [], {"d/0": (0.92, 0.6)})
  with_diverged = runs + grid_runs("d", 2)
  choice = tune.choose(with_diverged, str(tmp_path), ((4, 4), (3, 3)), 1.0)
  assert choice["methods"]["d"]["value"] == 0
  assert "| d | 1 | v=1 |  |  |  |  | diverged (training went non-finite) |" in tune.markdown(choice)
  (tmp_path / "d/0" / "results.json").unlink()
  os.makedirs(tmp_path / "d/0", exist_ok=True)
  (tmp_path / "d/0" / run_sweep.DIVERGED).write_text(json.dumps({"message": "NaN"}))
  with pytest.raises(ValueError, match="Every tuning run of d diverged"):
    tune.choose(with_diverged, str(tmp_path), ((4, 4), (3, 3)), 1.0)

  (tmp_path / "a/0" / "results.json").write_text(json.dumps(
      {"rows": [], "config": {"eval": {"split": "test"}}}))
  with pytest.raises(ValueError, match="reads the validation split only"):
    tune.choose(runs, str(tmp_path), ((4, 4), (3, 3)), 1.0)
  (tmp_path / "a/0" / "results.json").write_text('{"rows": [')
  with pytest.raises(FileNotFoundError, match="a/0 has not finished"):
    tune.choose(runs, str(tmp_path), ((4, 4), (3, 3)), 1.0)


def test_tuning_grids_have_equal_budgets_on_the_validation_split(tmp_path):
  assert len({len(grid) for grid in tuning.GRIDS.values()}) == 1
  assert min(len(grid) for grid in tuning.GRIDS.values()) >= 4
  sweep = run_sweep.load_sweep(table("tuning"))
  for run in sweep.runs:
    assert validated(sweep, run, tmp_path).eval.split == "validation"  # never the test set


@pytest.mark.parametrize("arg", ["net=small_cnn", "net=vgg", "net=resnet18,grid=l1_low",
                                 "net=mobilenetv2,grid=low", "net=small_cnn,grid=lazy",
                                 "net=vgg,grid=lazy", "net=mobilenetv2,grid=multibit",
                                 "net=small_cnn,grid=bound", "net=mobilenetv2,grid=kure_high"])
def test_every_tuning_lists_the_grid_that_tune_reads(arg):
  # experiments.tune finds value i of a method's grid in the run <method>/<i>.
  runs = run_sweep.load_sweep(table("tuning", arg)).runs
  listed = {run["name"]: run["overrides"] for run in runs}
  expected = {f"{method}/{i}": overrides for method, grid in tuning.grids(arg).items()
              for i, overrides in enumerate(grid)}
  assert {name: listed.get(name) for name in expected} == expected
  assert set(listed) == set(expected) | {"no-reg"}
  assert all(run["labels"]["value"] == int(run["name"].split("/")[1]) for run in runs[1:])
  # Every tuning of a network shares its no-reg run (experiments.study links it in).
  assert runs[0] == run_sweep.load_sweep(table("tuning", arg.split(",")[0])).runs[0]
  assert (run_sweep.load_sweep(table("tuning", arg)).base.to_json()
          == run_sweep.load_sweep(table("tuning", arg.split(",")[0])).base.to_json())


@pytest.mark.parametrize("net,model_name,width", [
    ("vgg", "vgg_like", 0.125), ("resnet18", "resnet18", 0.125),
    ("mobilenetv2", "mobilenetv2", 0.35)])
def test_paper_network_tuning_is_the_default_tuning_on_that_network(net, model_name, width):
  default = run_sweep.load_sweep(table("tuning"))
  sweep = run_sweep.load_sweep(table("tuning", f"net={net}"))
  assert sweep.runs == default.runs  # the same grids, seed and warm starts
  tuned_config = run_sweep.load_sweep(table("tuned", f"net={net}"), choices={}).base
  assert tuned_config.eval.split == "test"
  tuned_config.eval.split = "validation"
  assert tuned_config.to_json() == sweep.base.to_json()  # the test set is all that changes
  config = sweep.base
  assert (config.model.name, config.model.width) == (model_name, width)
  config.model.name, config.model.width, config.model.stem = "small_cnn", 1.0, "cifar"
  assert config.to_json() == default.base.to_json()  # only the model differs


@pytest.mark.parametrize("net", ["small_cnn", "vgg"])
def test_lazy_table_varies_only_the_penalty_schedule(net, tmp_path):
  l1 = {"reg.norm": "l1", "reg.lambda_a": 0.01, "reg.lambda_w": 0.001}
  retuned = {**l1, "reg.lambda_a": 0.003, "reg.every_k_steps": 4,
             "reg.penalty_batch_fraction": 0.25}
  sweep = run_sweep.load_sweep(table("lazy", f"net={net}"),
                               choices={"l1": l1, "l1-k4-f0.25-retuned": retuned})
  schedules = set()
  for run in sweep.runs:
    config = validated(sweep, run, tmp_path)
    method = run["labels"]["method"]
    if method != "no-reg":
      assert run["warm_start"] == f"no-reg/seed{run['labels']['seed']}"
    if method == "l1-k4-f0.25-retuned":
      assert {k: run["overrides"][k] for k in retuned} == retuned
    elif method != "no-reg":
      schedules.add((config.reg.every_k_steps, config.reg.penalty_batch_fraction,
                     config.reg.lambda_w, config.reg.lambda_a))
  assert {(k, f) for k, f, _, _ in schedules} == {(k, f) for k in lazy.EVERY_K for f in lazy.FRACTIONS}
  assert {(w, a) for _, _, w, a in schedules} == {(0.001, 0.01)}  # scaled by k inside only
  # Its no-reg runs are the tuned table's, so experiments.study shares them.
  tuned_sweep = run_sweep.load_sweep(table("tuned", f"net={net}"), choices={})
  assert [r for r in sweep.runs if r["labels"]["method"] == "no-reg"] == tuned_sweep.runs


@pytest.mark.parametrize("net", ["small_cnn", "mobilenetv2"])
def test_kure_high_continues_the_grid_above_and_takes_its_runs(net):
  grid = tuning.EXTENSIONS[net, "kure_high"]["kure"]
  kappas = [o["reg.lambda_kurtosis"] for o in grid]
  assert grid[:4] == tuning.GRIDS["kure"] and len(grid) == 6  # the whole grid, 2 values above
  assert all(2.9 < b / a < 3.5 for a, b in zip(kappas, kappas[1:]))
  # experiments.study links the pre-registered runs (same training) instead of retraining them.
  shared = study.same_training(run_sweep.load_sweep(table("tuning", f"net={net}")),
                               run_sweep.load_sweep(table("tuning", f"net={net},grid=kure_high")))
  assert shared == {"no-reg": "no-reg", **{f"kure/{i}": f"kure/{i}" for i in range(4)}}


@pytest.mark.parametrize("net,ext,methods", [("resnet18", "l1_low", {"l1"}),
                                              ("mobilenetv2", "low", {"l1", "l2"})])
def test_grid_extensions_continue_the_grids_below_the_tuning(net, ext, methods):
  runs = run_sweep.load_sweep(table("tuning", f"net={net},grid={ext}")).runs
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


def test_bound_low_continues_layer_bounds_grid_to_weaker_widths():
  runs = run_sweep.load_sweep(table("tuning", "net=mobilenetv2,grid=bound_low")).runs
  assert [run["name"] for run in runs] == ["no-reg", "layer-bound/0", "layer-bound/1"]
  assert all(run["warm_start"] == "no-reg" for run in runs[1:])
  default = [o["reg.bound_bits"] for o in tuning.BOUND_GRIDS["layer-bound"]]
  bits = [run["overrides"]["reg.bound_bits"] for run in runs[1:]]
  assert min(bits) > max(default)  # weaker than every pre-registered width (a bit fewer: 2x)
  assert all(b - a == 2 for a, b in zip(sorted(default + bits), sorted(default + bits)[1:]))
  assert all({k: v for k, v in run["overrides"].items() if k != "reg.bound_bits"}
             == {k: v for k, v in tuning.BOUND_GRIDS["layer-bound"][0].items()
                 if k != "reg.bound_bits"} for run in runs[1:])


def test_reevaluate_applies_the_protocol_and_redoes_only_unfinished_runs(reference_copy):
  """A re-sweep under a protocol gives the rows that evaluating the checkpoint with the protocol
  in its config gives (not the run's own rows), once per run; a truncated one is redone."""
  overrides = {"quant.per_channel": True, "quant.calibration": "mse"}
  own_rows = json.loads(open(os.path.join(reference_copy, "results.json")).read())["rows"]
  results = reevaluate.protocol_results(reference_copy, overrides)
  config = config_lib.with_overrides(checkpoint.read_run_config(reference_copy), overrides)
  direct = evaluate.evaluate_workdir(config, reference_copy)["rows"]
  assert results["rows"] == direct != own_rows
  assert results["overrides"] == overrides and results["environment"]["process_count"] == 1

  root = os.path.dirname(reference_copy)
  with open(os.path.join(reference_copy, "run.json"), "w") as f:
    json.dump({"name": "run"}, f)
  reevaluate.reevaluate_sweep(root, "strong")
  written = os.path.join(reference_copy, reevaluate.results_name("strong"))
  mtime = os.path.getmtime(written)
  reevaluate.reevaluate_sweep(root, "strong")
  assert os.path.getmtime(written) == mtime  # done: skipped
  with open(written, "r+") as f:
    f.truncate(100)
  reevaluate.reevaluate_sweep(root, "strong")
  assert run_sweep.is_finished(reference_copy, reevaluate.results_name("strong"))


def test_bound_tightness_weight_terms_against_a_naive_gradient_and_rounding(reference_run):
  _, workdir, _ = reference_run
  found = bound_tightness.run_tightness(workdir, num_batches=1, widths=(3,))
  run = checkpoint.load_run(workdir)
  assert not run.config.quant.per_channel  # one step per kernel below
  batch = bound_tightness._batches(run.config, 1)[0]
  folded = ptq.fold(run.variables["params"], run.variables["batch_stats"])
  apply = run.model.clone(folded=True).apply
  loss = lambda p: float(optax.softmax_cross_entropy_with_integer_labels(
      apply({"params": p}, batch["image"], train=False), batch["label"]).mean())
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      apply({"params": p}, batch["image"], train=False), batch["label"]).mean())(folded)
  is_kernel = lambda path: path[-1].key == "kernel"
  for b in (3,):
    predicted, rounded = 0.0, {}
    flat_grads = dict(jax.tree_util.tree_leaves_with_path(grads))
    for path, w in jax.tree_util.tree_leaves_with_path(folded):
      w = np.asarray(w, np.float64)
      if is_kernel(path):
        step = np.abs(w).max() / (2 ** (b - 1) - 1)  # symmetric absmax, per tensor
        predicted += step / 2 * np.abs(np.asarray(flat_grads[path])).sum()
        w = np.round(w / step) * step
      rounded[path] = w.astype(np.float32)
    quantized = jax.tree_util.tree_unflatten(jax.tree.structure(folded),
                                             [rounded[p] for p, _ in
                                              jax.tree_util.tree_leaves_with_path(folded)])
    np.testing.assert_allclose(found["predicted"]["weights"][str(b)], predicted, rtol=1e-4)
    np.testing.assert_allclose(found["measured"]["weights"][str(b)],
                               loss(quantized) - loss(folded), rtol=1e-3, atol=1e-6)
  assert found["float_loss"] == pytest.approx(loss(folded), rel=1e-6)


def test_bound_tightness_is_kept_beside_the_run_and_a_run_without_its_checkpoint_is_left_out(
    reference_run, tmp_path, monkeypatch, capsys):
  _, workdir, _ = reference_run
  root = tmp_path / "sweep"
  for name in ("a/seed0", "a/seed1", "b/seed0", "b/seed1"):
    shutil.copytree(workdir, root / name)
  first = bound_tightness.measure(str(root / "a" / "seed0"), num_batches=1)
  with open(root / "a" / "seed0" / "tightness.json") as f:
    assert json.load(f) == first
  for name in ("a/seed1", "b/seed0"):
    shutil.copy(root / "a" / "seed0" / "tightness.json", root / name / "tightness.json")
  shutil.rmtree(root / "b" / "seed1" / "checkpoints")  # as a run restored from the archive
  with monkeypatch.context() as patch:
    patch.setattr(bound_tightness, "run_tightness", lambda *a, **k: pytest.fail("measured again"))
    assert bound_tightness.measure(str(root / "a" / "seed0"), num_batches=1) == first
  capsys.readouterr()
  runs = bound_tightness.read_or_measure([str(root)], num_batches=1)
  assert sorted(runs["a"]) == [0, 1] and sorted(runs["b"]) == [0]
  assert "b/seed1: left out of the tightness: No checkpoint" in capsys.readouterr().out
  table = bound_tightness.markdown(runs)
  assert "| a | " in table and "| b (seed 0) | " in table


def test_bound_transfer_pairs_the_transferred_rows_with_the_own_choice_per_seed(tmp_path,
                                                                                 monkeypatch):
  monkeypatch.setattr(bound_transfer, "RESULTS", str(tmp_path))
  rng = np.random.default_rng(2)
  settings = [s for _, s in bound_transfer.POINTS]

  def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(obj, f)

  def choices(bits):
    return {"methods": {form: {"overrides": {"reg.bound_bits": b}}
                        for form, b in zip(bound_transfer.FORMS, bits)}}

  write(tmp_path / bound_transfer.SOURCE / "bound/tuning/choices.json", choices((8, 8, 8)))
  write(tmp_path / "resnet18/bound/tuning/choices.json", choices((10, 8, 6)))
  acc = {}
  for kind in ("bound", "bound_transfer"):
    for protocol in ("paper", "strong"):
      per_seed = {}
      for form in bound_transfer.FORMS[:2]:  # layer-bound has no rows: left out
        runs = []
        for seed in (2, 0, 1):
          if (kind, form, seed) == ("bound_transfer", "bound", 1):
            continue  # diverged: no results
          values = rng.uniform(0.1, 0.9, len(settings))
          acc[kind, protocol, form, seed] = values
          runs.append({"seed": seed, "rows": [{"weight_bits": w, "act_bits": a, "accuracy": v}
                                              for (w, a), v in zip(settings, values)]})
        per_seed[form] = runs
      write(tmp_path / "resnet18" / kind / protocol / "per_seed.json", per_seed)
  table = bound_transfer.write_transfer(("vgg", "resnet18"))  # vgg has nothing: no row
  rows = json.loads((tmp_path / "bound_transfer.json").read_text())
  assert [(r["network"], r["form"], r["own_bits"], r["transferred_bits"]) for r in rows] == [
      ("resnet18", "bound", 10, 8), ("resnet18", "bound-diff", 8, 8)]
  i = bound_transfer.POINTS.index(("strong", (2, 2)))
  naive = [100 * (acc["bound_transfer", "strong", "bound", s][i]
                  - acc["bound", "strong", "bound", s][i]) for s in (0, 2)]
  point = rows[0]["points"]["strong (2,2)"]
  assert list(point["per_seed"]) == ["0", "2"]  # JSON keys
  assert (rows[0]["own_seeds"], rows[0]["transferred_seeds"]) == ([0, 1, 2], [0, 2])
  assert "| resnet18 | bound | 10 → 8 | 0, 1, 2 → 0, 2 | " in table
  np.testing.assert_allclose(list(point["per_seed"].values()), naive, rtol=1e-12)
  np.testing.assert_allclose(point["difference"], [np.mean(naive), np.std(naive, ddof=1)])
  assert f"{np.mean(naive):+.2f} ± {np.std(naive, ddof=1):.2f} (" in table


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


def _naive_spearman(a, b):
  """Pearson's correlation of the ranks (no ties in these inputs)."""
  rank = lambda x: np.argsort(np.argsort(x)).astype(float)
  return float(np.corrcoef(rank(a), rank(b))[0, 1])


def test_mixed_precision_summary_against_a_naive_reading(tmp_path):
  rng = np.random.default_rng(0)
  kernels, choices = ["a/kernel", "b/kernel", "c/kernel"], [2, 4, 8]
  accuracy = {}
  for method in ("no-reg", "l1"):
    for seed in (0, 1):
      values = {name: {k: list(rng.normal(size=3)) for k in kernels}
                for name in ("measured", "bound", "hessian")}
      accuracy[method, seed] = {budget: rng.uniform(0.1, 0.9) for budget in (2.0, 3.0)}
      results = {
          "rows": [{"weight_bits": None, "act_bits": None, "accuracy": 0.9},
                   {"weight_bits": 2, "act_bits": 8, "accuracy": 0.5}],
          "layer_sensitivities": [{"sensitivity": name, "seconds": 1.0 + seed,
                                   "bit_choices": choices, "values": values[name]}
                                  for name in values],
          "mixed": [{"bit_budget": budget, "sensitivity": "bound", "average_bits": budget,
                     "accuracy": acc, "layer_bits": dict.fromkeys(kernels, 2)}
                    for budget, acc in accuracy[method, seed].items()]}
      run_dir = tmp_path / method / f"seed{seed}"
      os.makedirs(run_dir)
      with open(run_dir / mixed_precision.RESULTS_NAME, "w") as f:
        json.dump(results, f)
      correlations = mixed_precision.rank_correlations(
          {r["sensitivity"]: r for r in results["layer_sensitivities"]})
      flat = lambda name: [v for k in kernels for v in values[name][k]]
      np.testing.assert_allclose(correlations["bound"]["all_pairs"],
                                 _naive_spearman(flat("measured"), flat("bound")))
      across = [_naive_spearman([values["measured"][k][i] for k in kernels],
                                [values["hessian"][k][i] for k in kernels]) for i in range(3)]
      np.testing.assert_allclose(correlations["hessian"]["across_kernels"], np.mean(across))
  table = mixed_precision.write_mixed(str(tmp_path), str(tmp_path / "out"))
  for method in ("no-reg", "l1"):
    cells = [np.array([100 * accuracy[method, s][b] for s in (0, 1)]) for b in (2.0, 3.0)]
    row = f"| {method} | bound | " + " | ".join(
        f"{c.mean():.2f} ± {c.std(ddof=1):.2f}" for c in cells) + " |"
    assert row in table
    assert f"| {method} | uniform | 50.00 ± 0.00 |  |" in table
  assert os.path.exists(tmp_path / "out" / "mixed.png")


def test_drift_reads_a_runs_kept_record_instead_of_its_checkpoint(tmp_path):
  from experiments import drift  # pylint: disable=g-import-not-at-top
  kept = {"terms": {"kernels": {}}, "norms": {}, "bn_followed": [], "affine_norms": {},
          "batches": drift.NUM_BATCHES}
  (tmp_path / drift.RECORD).write_text(json.dumps(kept))
  assert drift.load(str(tmp_path)) == kept  # no checkpoint here: read, not recomputed
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    drift.load(str(tmp_path), num_batches=drift.NUM_BATCHES + 1)  # another measurement


def test_drift_attributes_a_pure_kernel_rescaling_wholly_to_kernel_growth():
  from experiments import drift  # pylint: disable=g-import-not-at-top
  from qreg import quant  # pylint: disable=g-import-not-at-top
  from tests.conftest import jit_init  # pylint: disable=g-import-not-at-top
  model = SmallCNN(widths=(4, 8, 8), hidden=16)
  variables = jit_init(model, (1, 28, 28, 1))
  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
              rng.integers(0, 10, 16).astype(np.int32)) for _ in range(2)]
  params, stats = variables["params"], variables["batch_stats"]
  path = ["conv2", "conv", "kernel"]
  grown = quant.replace_leaf(params, path, 2.0 * quant.subtree(params, path))
  bn = quant.subtree(params, ["conv1", "bn"])  # and conv1's BatchNorm scaled by 3: act1 by 3
  grown = quant.replace_leaf(grown, ["conv1", "bn"], {k: 3.0 * v for k, v in bn.items()})
  runs = [drift.record(p, drift.gradient_terms(p, stats, model.apply, batches))
          for p in (params, grown)]
  runs = json.loads(json.dumps(runs))  # a record is plain JSON: it is kept beside the run
  # BatchNorm makes the train-mode loss blind to conv2's scale: its gradient halves.
  np.testing.assert_allclose(runs[1]["terms"]["kernels"]["conv2/conv/kernel"],
                             runs[0]["terms"]["kernels"]["conv2/conv/kernel"] / 2, rtol=1e-4)
  result = drift.compare(*runs)
  np.testing.assert_allclose(result["weight_term_at_reference_norms"],
                             result["weight_term_reference"], rtol=1e-4)
  np.testing.assert_allclose(result["explained_by_kernel_growth"], 1.0, rtol=1e-3)
  np.testing.assert_allclose(result["norm_ratios"]["conv2/conv/kernel"], 2.0, rtol=1e-6)
  # Each conv's BatchNorm frees the tap after it; fc1's does not (the head has no BatchNorm).
  assert result["freed_taps"] == {f"conv{i}/bn": f"act{i}/activation" for i in (1, 2, 3)}
  np.testing.assert_allclose(runs[1]["terms"]["taps"]["act1/activation"],
                             runs[0]["terms"]["taps"]["act1/activation"] / 3, rtol=1e-4)
  np.testing.assert_allclose(result["activation_term_at_reference_affine"],
                             result["activation_term_reference"], rtol=1e-4)
  np.testing.assert_allclose(result["activation_explained_by_affine_growth"], 1.0, rtol=1e-3)
  assert not drift._bn_followed(params, "head/kernel")  # pylint: disable=protected-access
