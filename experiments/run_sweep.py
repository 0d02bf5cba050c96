"""Runs every run listed by a sweep config's sweep(), one workdir each, skipping finished ones.

    python -m experiments.run_sweep --config=configs/tables/paper.py:net=fashion_mnist --workdir=<dir>
    python -m experiments.run_sweep --config=configs/tables/tuned.py:net=vgg \
        --choices=experiments/results/vgg/tuning/choices.json --workdir=<dir>

A sweep config file has get_config(arg=None) (the shared base) and sweep(arg=None) (or
sweep(arg=None, *, choices) for runs at a tuning's choices), a list of dicts: {"name": str,
"overrides": {"dotted.field": value, ...}, "labels": {...}, "warm_start": name of another run
or None}. Run `name` trains in <dir>/<name>; a finished run (a readable results.json) is skipped,
an interrupted one resumes from its checkpoint, and a run whose results.json is truncated or
unreadable is run again (its training is done, so only its sweep reruns). Several workers may run
one sweep at once (processes, or hosts sharing the workdir): each claims the runs it trains
(CLAIM), skips those another holds or whose warm-start source another holds and, once out of
runs, waits for those (for_each_claimed).

warm_start: runs that differ only in what happens from reg.start_epoch on (the method, its λ)
share their first start_epoch epochs exactly, since data order and schedule are deterministic.
Such a run starts from the named run's checkpoint at that epoch instead of retraining it, which
gives the same parameters as training from scratch. The runner checks that the two configs agree
on everything else and falls back to training from scratch when the checkpoint is not there.
"""
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from experiments import archive
from qreg import checkpoint, cli, data, main, report
from qreg import config as config_lib

# Fields a warm-started run may change: they only act from reg.start_epoch on.
_METHOD_FIELDS = ("reg", "qat", "quant", "eval")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep config file loaded with its argument: the module, the base config and its runs."""
  spec: str
  module: Any
  base: ml_collections.ConfigDict
  runs: list[dict[str, Any]]

  def config(self, run: dict[str, Any]) -> ml_collections.ConfigDict:
    return config_lib.with_overrides(self.base, run.get("overrides", {}))

  def run(self, name: str) -> dict[str, Any]:
    return next(run for run in self.runs if run["name"] == name)


def load_module(spec: str):
  """The sweep config file of 'path/to/file.py[:arg]' as a module, and its argument."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No sweep config at {path}.")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path} has no sweep() function listing its runs.")
  return module, arg or None


def load_sweep(spec: str, choices: Mapping[str, dict] | None = None) -> Sweep:
  """The sweep of 'path/to/file.py[:arg]'; choices ({method: overrides}) for a sweep that
  measures a tuning's choices."""
  module, arg = load_module(spec)
  takes_choices = "choices" in inspect.signature(module.sweep).parameters
  if takes_choices and choices is None:
    raise ValueError(f"{spec} measures a tuning's choices: pass --choices=<choices.json> "
                     "(experiments.tune writes it), or run it through experiments.study.")
  if choices is not None and not takes_choices:
    raise ValueError(f"{spec} takes no choices; drop --choices.")
  runs = module.sweep(arg, choices=dict(choices)) if takes_choices else module.sweep(arg)
  names = [run["name"] for run in runs]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"{spec}: run names must be unique; repeated: {', '.join(duplicates)}.")
  unknown = sorted({run["warm_start"] for run in runs if run.get("warm_start")} - set(names))
  if unknown:
    raise ValueError(f"{spec}: warm_start names no run of the sweep: {', '.join(unknown)}.")
  return Sweep(spec, module, module.get_config(arg), runs)


def read_choices(path: str) -> dict[str, dict]:
  """method -> its chosen overrides, from a choices.json of experiments.tune."""
  with open(path) as f:
    return {method: choice["overrides"] for method, choice in json.load(f)["methods"].items()}


def _shared_prefix_fields(config: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in json.loads(config.to_json_best_effort()).items()
          if k not in _METHOD_FIELDS}


def warm_start(config, source_config, source_dir: str, run_dir: str) -> bool:
  """Copies source_dir's checkpoint at config.reg.start_epoch into run_dir; False if there is none."""
  if _shared_prefix_fields(config) != _shared_prefix_fields(source_config):
    raise ValueError(f"Cannot warm-start {run_dir} from {source_dir}: their configs differ in "
                     f"more than the method fields {', '.join(_METHOD_FIELDS)}.")
  if config.reg.start_epoch != source_config.reg.start_epoch:
    raise ValueError(f"Cannot warm-start {run_dir} from {source_dir}: reg.start_epoch differs.")
  if config.reg.start_epoch == 0:
    return False
  step_dir = start_checkpoint(config, source_dir)
  found = step_dir if os.path.isdir(step_dir) else archive.archived_checkpoint(step_dir)
  if found is None:
    return False
  target = os.path.join(run_dir, "checkpoints", os.path.basename(step_dir))
  if not os.path.exists(target):
    shutil.copytree(found, target)
  if found == step_dir:
    archive.save_checkpoint(step_dir)  # where its run was trained before archiving was on
  return True


def start_checkpoint(config, source_dir: str) -> str:
  """Where source_dir's checkpoint at config.reg.start_epoch is (or would be)."""
  steps_per_epoch = data.build_input_pipeline(config.data).steps_per_epoch(config.data.batch_size)
  return os.path.join(source_dir, "checkpoints", str(config.reg.start_epoch * steps_per_epoch))


def is_finished(run_dir: str, results_name: str = "results.json") -> bool:
  """Whether run_dir holds a readable results file (a truncated one does not count)."""
  return report.read_finished_results(os.path.join(run_dir, results_name)) is not None


DIVERGED = "diverged.json"
# A worker holds <run>/claim (its pid and host) from a run's warm start to its archiving, so that
# several workers (processes, or hosts sharing the workdir) can run one sweep: each trains the
# runs no other holds (qreg.checkpoint.workdir_lock; a claim of a dead process on the same host is
# taken over).
CLAIM = "claim"


def diverged(run_dir: str) -> dict | None:
  """The record of a run whose training metrics went non-finite ({'message'}), or None."""
  try:
    with open(os.path.join(run_dir, DIVERGED)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and "message" in record else None


def share_run(source_dir: str, run_dir: str) -> None:
  """Links a finished run of another sweep in as run_dir, where that run is not there yet: a
  sweep whose run has the same config reuses it instead of training it again."""
  if is_finished(source_dir) and not os.path.lexists(run_dir):
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with contextlib.suppress(FileExistsError):  # another worker of the study linked it first
      os.symlink(os.path.abspath(source_dir), run_dir)


def reuse_training(source_dir: str, run_dir: str, config: ml_collections.ConfigDict) -> bool:
  """Starts run_dir, a run that trains as the finished source_dir did but measures other bit
  settings, from the source's last checkpoint (with config, the run's own, as its config.json):
  the runner then only sweeps it. False where there is nothing to reuse or run_dir exists."""
  steps = [int(step) for step in _listdir(os.path.join(source_dir, "checkpoints"))
           if step.isdigit()]
  if not is_finished(source_dir) or not steps or os.path.lexists(run_dir):
    return False
  last = str(max(steps))
  # Built beside run_dir and renamed into place, so that another worker starting the same study
  # at once finds either nothing or the whole run (a directory rename fails if the target exists).
  staging = f"{run_dir}.reuse-{os.getpid()}"
  shutil.copytree(os.path.join(source_dir, "checkpoints", last),
                  os.path.join(staging, "checkpoints", last))
  checkpoint.write_run_config(config, staging)
  try:
    os.rename(staging, run_dir)
  except OSError:  # another worker put it there first
    shutil.rmtree(staging)
    return False
  return True


def load_finished_run(run_dir: str) -> checkpoint.Run:
  """A finished run's checkpoint at the step its results were measured at. A run restored from
  experiments.archive keeps only the checkpoint others warm-start from (an earlier step), which
  must not pass for the trained model."""
  run = checkpoint.load_run(run_dir)
  results = report.read_finished_results(os.path.join(run_dir, "results.json"))
  step = (results or {}).get("step")
  if step is not None and run.step != step:
    raise FileNotFoundError(
        f"{run_dir} has no checkpoint of its trained model: its results are of step {step}, its "
        f"latest checkpoint is of step {run.step} (a run restored from experiments.archive keeps "
        "only the one others warm-start from); rebuild it (trained_model_dir) or remove the run "
        "from the workdir and the archive to retrain it.")
  return run


# A finished run's twin, run_dir/TWIN: its trained model rebuilt where only its records were
# restored (rebuild_twin), with TWIN_RECORD saying whether it reproduced the run's results.
TWIN = "twin"
TWIN_RECORD = "twin.json"


def has_trained_model(run_dir: str) -> bool:
  """Whether run_dir holds the checkpoint its results were measured at."""
  results = report.read_finished_results(os.path.join(run_dir, "results.json"))
  steps = [int(s) for s in _listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit()]
  return bool(results and steps) and results.get("step") in (None, max(steps))


def trained_model_dir(run_dir: str, rebuild: bool = False) -> str:
  """Where a finished run's trained model is: run_dir itself, or, with rebuild, where run_dir
  lacks it (a run restored from experiments.archive), its twin (rebuild_twin)."""
  return rebuild_twin(run_dir) if rebuild and not has_trained_model(run_dir) else run_dir


def rebuild_twin(run_dir: str) -> str:
  """run_dir/twin: a finished run trained again from its config.json and the checkpoint it
  started from (its warm start's at reg.start_epoch, or its own; the archive's copy where the
  workdir lacks it; from scratch where reg.start_epoch is 0), once. Training is deterministic on
  one CPU model, so there the twin is the run's model; twin/twin.json says whether the twin's
  results equal the run's at every setting, and the largest difference. Call it under the run's
  claim (for_each_claimed) where several workers may want the same twin."""
  twin = os.path.join(run_dir, TWIN)
  if is_finished(twin) and os.path.exists(os.path.join(twin, TWIN_RECORD)):
    return twin
  with open(os.path.join(run_dir, "run.json")) as f:
    run = json.load(f)
  config = checkpoint.read_run_config(run_dir)
  if config.reg.start_epoch and not _listdir(os.path.join(twin, "checkpoints")):
    real = os.path.realpath(run_dir)  # a linked run's name is relative to its own sweep
    root = real[:-len(run["name"])] if real.endswith(run["name"]) else None
    if root is None:
      raise ValueError(f"{run_dir}: its run.json names it {run['name']!r}, not its path.")
    source = os.path.join(root, run["warm_start"]) if run.get("warm_start") else real
    if not warm_start(config, checkpoint.read_run_config(source), source, twin):
      raise FileNotFoundError(f"{run_dir} cannot be rebuilt: {start_checkpoint(config, source)}, "
                              "the checkpoint it started from, is neither in the workdir nor in "
                              "the archive.")
  print(f"=== {run_dir}: rebuilding its trained model in {TWIN}/ ===", flush=True)
  main.train_and_evaluate(config, twin)
  rows = lambda d: {(r["weight_bits"], r["act_bits"]): r["accuracy"]
                    for r in report.read_finished_results(os.path.join(d, "results.json"))["rows"]}
  own, rebuilt = rows(run_dir), rows(twin)
  report.write_json_atomic(os.path.join(twin, TWIN_RECORD), {
      "identical": own == rebuilt,
      "max_accuracy_difference": max((abs(own[k] - rebuilt[k]) for k in set(own) & set(rebuilt)),
                                     default=None),
      "cpu": report.cpu_model()})
  jax.clear_caches()
  return twin


def read_twin_record(twin: str) -> dict:
  with open(os.path.join(twin, TWIN_RECORD)) as f:
    return json.load(f)


def _listdir(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  minutes = round(seconds / 60)
  return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_sweep(spec: str, root: str, only: Sequence[str] | None = None,
              choices: Mapping[str, dict] | None = None,
              after_run: Callable[[str], None] | None = None, wait: bool = True) -> Sweep:
  """Trains and sweeps every unfinished run of the sweep in root/<name>; returns the sweep.
  after_run(run_dir) follows each run trained here (e.g. its re-sweeps), before the run is
  archived (experiments.archive). wait=False leaves the runs other workers hold to them
  (for_each_claimed), so that a study can train another sweep's free runs before waiting."""
  sweep = load_sweep(spec, choices)
  names = [run["name"] for run in sweep.runs]
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise ValueError(f"--only names no run of {spec}: {', '.join(unknown)} (runs: "
                     f"{', '.join(names)}).")
  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  report.write_json_atomic(os.path.join(root, "sweep.json"),
                           {"config": spec, "runs": names})
  selected = [run for run in sweep.runs if not only or run["name"] in only]
  todo = []
  for run in selected:
    run_dir = os.path.join(root, run["name"])
    if is_finished(run_dir):
      logging.info("Skipping %s: finished.", run["name"])
    elif diverged(run_dir):
      logging.info("Skipping %s: it diverged (%s).", run["name"], DIVERGED)
    else:
      todo.append(run)
  if todo:
    print(f"=== {root}: {len(todo)} of {len(selected)} runs to train ===", flush=True)
  seconds = []  # the runs trained here, for the estimate

  def train(run: dict[str, Any]) -> None:
    # Another worker may have finished it since the list was made.
    run_dir = os.path.join(root, run["name"])
    if is_finished(run_dir) or diverged(run_dir):
      logging.info("Skipping %s: finished by another worker.", run["name"])
      return
    left = len(todo) - len(seconds)  # at most: other workers may take some
    estimate = f", about {_duration(left * sum(seconds) / len(seconds))} left" if seconds else ""
    print(f"=== {run['name']} ({len(seconds) + 1} of {len(todo)}{estimate}) ===", flush=True)
    start = time.time()
    _train_run(sweep, run, root, after_run)
    seconds.append(time.time() - start)
    # Each run compiles its own steps and sweep: without this, a long sweep's process grew until
    # LLVM could not allocate memory (once, after ~60 runs).
    jax.clear_caches()

  def source(run: dict[str, Any]) -> str | None:
    return os.path.join(root, run["warm_start"]) if run.get("warm_start") else None

  for_each_claimed(todo, lambda run: os.path.join(root, run["name"]), train, source, wait)
  return sweep


def for_each_claimed(items: Sequence[Any], run_dir: Callable[[Any], str],
                     work: Callable[[Any], None],
                     source: Callable[[Any], str | None] = lambda item: None,
                     wait: bool = True) -> None:
  """work(item) for each item while holding its run's claim (CLAIM). Items whose run another
  live worker holds are skipped, then waited for: once their workers release them, each is
  claimed and work(item) called again, so work re-checks whether it is still to do (the other
  worker may have done it, or have stopped part-way). What follows (a sweep's tables, the next
  step of a study) therefore starts only once every item is done, in whichever worker ends
  last. An item whose source(item) (the run it warm-starts from) another worker holds waits
  for it the same way, instead of training that run's shared epochs again. wait=False returns
  after one pass instead of waiting, leaving the held items to their workers."""
  pending = list(items)
  while pending:
    busy, held = [], []
    for item in pending:
      path = os.path.realpath(run_dir(item))
      os.makedirs(path, exist_ok=True)
      if path in _CLAIMED_HERE:  # e.g. a run's re-sweeps after its training, under its claim
        work(item)
        continue
      first = source(item)
      if first and _claimed(first):
        logging.info("Skipping %s for now: it starts from %s, which another worker has.", path,
                     first)
        busy.append(item)
        held.append(first)
        continue
      with contextlib.ExitStack() as claim:
        try:
          claim.enter_context(checkpoint.workdir_lock(path, CLAIM))
        except checkpoint.WorkdirBusy as e:
          logging.info("Skipping %s for now: another worker has it. %s", path, e)
          busy.append(item)
          held.append(run_dir(item))
          continue
        _CLAIMED_HERE.add(path)
        try:
          work(item)
        finally:
          _CLAIMED_HERE.discard(path)
    if not wait:
      return
    _wait_for_others(held)
    pending = busy


# The runs whose claims this process holds.
_CLAIMED_HERE: set[str] = set()
# How often a worker that waits for another's runs looks again, in seconds.
POLL_SECONDS = 30.0


def _wait_for_others(run_dirs: Sequence[str]) -> None:
  """Returns once a live worker's claim on one of run_dirs is released (at once if none is
  held): what was waiting for it can go on while the others are still held."""
  held = list(dict.fromkeys(d for d in run_dirs if _claimed(d)))
  if held:
    print(f"=== waiting for {len(held)} runs other workers hold ({', '.join(held[:3])}"
          f"{', ...' if len(held) > 3 else ''}); a claim of a process on another host that is no "
          "longer running has to be deleted by hand ===", flush=True)
  while held and all(_claimed(d) for d in held):
    time.sleep(POLL_SECONDS)


def _train_run(sweep: Sweep, run: dict[str, Any], root: str,
               after_run: Callable[[str], None] | None) -> None:
  """Trains and sweeps one run (warm-started where it can be), then after_run and archiving."""
  run_dir = os.path.join(root, run["name"])
  config = sweep.config(run)
  report.write_json_atomic(os.path.join(run_dir, "run.json"), run)
  source = run.get("warm_start")
  if source and not os.path.exists(os.path.join(run_dir, "checkpoints")):
    if warm_start(config, sweep.config(sweep.run(source)), os.path.join(root, source), run_dir):
      logging.info("%s starts from %s's checkpoint at epoch %d.", run["name"], source,
                   config.reg.start_epoch)
  start = time.time()
  try:
    main.train_and_evaluate(config, run_dir)
  except FloatingPointError as e:
    # A grid that reaches a value strong enough to break training is meant to: the run is
    # recorded as diverged (training is deterministic, so it would diverge again) and the
    # sweep goes on; tuning never chooses it and tables leave it out.
    report.write_json_atomic(os.path.join(run_dir, DIVERGED), {"message": str(e)})
    archive.save(run_dir)
    print(f"=== {run['name']} diverged: {e} ===", flush=True)
    return
  if after_run is not None:
    after_run(run_dir)
  archive.save(run_dir)
  # The checkpoint the sweep's other runs warm-start from, archived with its run.
  dependent = next((r for r in sweep.runs if r.get("warm_start") == run["name"]), None)
  if archive.enabled() and dependent:
    dependent_config = sweep.config(dependent)
    step_dir = start_checkpoint(dependent_config, run_dir)
    if dependent_config.reg.start_epoch and os.path.isdir(step_dir):
      archive.save_checkpoint(step_dir)
  print(f"=== {run['name']} done in {time.time() - start:.0f}s ===", flush=True)


def _claimed(run_dir: str) -> bool:
  """Whether a live worker holds run_dir's claim."""
  if not os.path.exists(os.path.join(run_dir, CLAIM)):
    return False
  try:
    with checkpoint.workdir_lock(run_dir, CLAIM):
      return False
  except checkpoint.WorkdirBusy:
    return True


def _main(argv) -> None:
  del argv
  cli.configure_logging()
  choices = read_choices(_CHOICES.value) if _CHOICES.value else None
  run_sweep(_CONFIG.value, _WORKDIR.value, _ONLY.value, choices)


if __name__ == "__main__":
  _CONFIG = flags.DEFINE_string("config", None, "Sweep config file[:arg] (get_config, sweep).",
                                required=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per run.",
                                 required=True)
  _ONLY = flags.DEFINE_list("only", None, "Run only these run names (default: all).")
  _CHOICES = flags.DEFINE_string("choices", None,
                                 "choices.json of experiments.tune, for a sweep of tuned runs.")
  cli.run(_main)
