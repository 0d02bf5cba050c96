"""Finished runs' records kept in the repository, so that a study resumes in a fresh checkout.

    python -m experiments.study <study> --net=<network> --archive=experiments/runs

A study's workdir holds checkpoints and is not committed: a session that loses it retrains every
run. With --archive, each run's records (the JSON files beside its checkpoints: run.json,
config.json, results.json, its re-sweeps results_<protocol>.json, tightness.json, diverged.json)
are copied to <archive>/<the run's path under the workdir> as soon as they are written, and so is
the checkpoint that a sweep warm-starts from (a source run's at reg.start_epoch). At the start
of a study, the records archived for its network and missing from the workdir are copied in: a
restored run counts as finished and its re-sweeps as done, and runs still to train warm-start
from the archived checkpoint, so runs trained in different sessions share their first epochs
exactly. Runs finished in the workdir but not archived yet are archived then too.

Every archived file is recorded in its run's archive.json with where it was archived (CPU
model, backend, the archiving process's commit, time; a run is archived where it was trained):
trained numbers are not bit-identical across CPU models, and tables that mix machines say so.
A restored run has no checkpoint of its trained model (only its records come back, and the
checkpoint others warm-start from): a re-sweep it lacks cannot be computed (reevaluate says so,
run_sweep.load_finished_run), so studies re-sweep each run before archiving it where they can.
"""
import datetime
import functools
import json
import os
import shutil
import subprocess

from qreg import report

PROVENANCE = "archive.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_roots: tuple[str, str] | None = None  # (workdir, archive), set by configure()


def configure(workdir: str | None, archive: str | None) -> None:
  """Archive runs under workdir into archive (None: archiving off)."""
  global _roots
  _roots = (os.path.realpath(workdir), os.path.abspath(archive)) if archive else None


def enabled() -> bool:
  return _roots is not None


@functools.cache
def _machine() -> dict:
  """Where this process runs; the same for its whole life, so read once."""
  cpu = report.cpu_model()
  try:
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  import jax  # pylint: disable=g-import-not-at-top
  return {"cpu": cpu, "backend": jax.default_backend(), "commit": commit}


def _target(path: str) -> str | None:
  """path's place in the archive, or None if archiving is off or path is outside the workdir."""
  if _roots is None:
    return None
  workdir, archive = _roots
  real = os.path.realpath(path)
  if os.path.commonpath([real, workdir]) != workdir:
    return None
  return os.path.join(archive, os.path.relpath(real, workdir))


def _records(run_dir: str) -> list[str]:
  return sorted(name for name in os.listdir(run_dir)
                if name.endswith(".json") and name != PROVENANCE
                and os.path.isfile(os.path.join(run_dir, name)))


def _same(a: str, b: str) -> bool:
  with open(a, "rb") as f, open(b, "rb") as g:
    return f.read() == g.read()


def _note(target: str, names: list[str]) -> None:
  path = os.path.join(target, PROVENANCE)
  provenance = {}
  if os.path.exists(path):
    with open(path) as f:
      provenance = json.load(f)
  stamp = {**_machine(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")}
  for name in names:
    provenance[name] = stamp
  report.write_json_atomic(path, dict(sorted(provenance.items())))


def save(run_dir: str) -> None:
  """Copies run_dir's records that the archive lacks or holds otherwise."""
  target = _target(run_dir)
  if target is None:
    return
  os.makedirs(target, exist_ok=True)
  copied = []
  for name in _records(run_dir):
    source, dest = os.path.join(run_dir, name), os.path.join(target, name)
    if not os.path.exists(dest) or not _same(source, dest):
      shutil.copyfile(source, dest + ".tmp")
      os.replace(dest + ".tmp", dest)
      copied.append(name)
  if copied:
    _note(target, copied)


def kept(run_dir: str, name: str, batches: int, compute) -> dict:
  """A finished run's record computed from its checkpoint (compute(): a dict whose "batches"
  says over how many batches), kept as run_dir/name and archived with the run's records, so that
  a run restored without its checkpoint still has it; read, not computed again, where an earlier
  call wrote it over as many batches."""
  path = os.path.join(run_dir, name)
  try:
    with open(path) as f:
      found = json.load(f)
  except (OSError, ValueError):
    found = None
  if isinstance(found, dict) and found.get("batches") == batches:
    return found
  found = compute()
  report.write_json_atomic(path, found)
  save(run_dir)
  return found


def save_checkpoint(step_dir: str) -> None:
  """Archives a checkpoint directory (a warm start's source), once."""
  target = _target(step_dir)
  if target is None or os.path.isdir(target):
    return
  shutil.copytree(step_dir, target + ".tmp", dirs_exist_ok=True)
  os.replace(target + ".tmp", target)
  _note(os.path.dirname(os.path.dirname(target)), [f"checkpoints/{os.path.basename(step_dir)}"])


def _run_dirs(root: str):
  for dirpath, dirnames, files in os.walk(root):
    if "checkpoints" in dirnames:
      dirnames.remove("checkpoints")
    if "run.json" in files:
      yield dirpath


def archived_checkpoint(step_dir: str) -> str | None:
  """The archive's copy of a checkpoint directory, if it holds one."""
  target = _target(step_dir)
  return target if target is not None and os.path.isdir(target) else None


def sync(subdir: str) -> tuple[int, int]:
  """Restores the records the archive holds under subdir (relative to the workdir) and the
  workdir lacks (not checkpoints: warm starts read them from the archive, and a restored run has
  none, so nothing re-sweeps it on other weights); archives the workdir's finished runs there.
  Returns (runs restored, runs archived)."""
  if _roots is None:
    return 0, 0
  workdir, archive = _roots
  restored = 0
  for target in _run_dirs(os.path.join(archive, subdir)):
    run_dir = os.path.join(workdir, os.path.relpath(target, archive))
    if os.path.islink(run_dir):
      continue  # a link to another sweep's run, which is restored where it lives
    names = [n for n in _records(target) if not os.path.exists(os.path.join(run_dir, n))]
    if names:
      os.makedirs(run_dir, exist_ok=True)
      for name in names:
        shutil.copyfile(os.path.join(target, name), os.path.join(run_dir, name))
      restored += 1
  archived = 0
  for run_dir in _run_dirs(os.path.join(workdir, subdir)):
    finished = report.read_finished_results(os.path.join(run_dir, "results.json")) is not None
    if finished or os.path.exists(os.path.join(run_dir, "diverged.json")):
      archived += not os.path.exists(os.path.join(_target(run_dir), PROVENANCE))
      save(run_dir)
  return restored, archived


def write_machines(root: str, out: str, results_name: str = "results.json") -> dict[str, int]:
  """machines.json in out, where the archived runs under root were trained: {"<CPU model>
  (<backend>)": number of runs}, from each run's archive.json (nothing is written where archiving
  is off or no run is archived)."""
  found = {}
  for dirpath, _, files in os.walk(root, followlinks=True):
    target = _target(dirpath) if results_name in files else None
    path = os.path.join(target, PROVENANCE) if target else None
    if path is None or not os.path.exists(path):
      continue
    with open(path) as f:
      stamp = json.load(f).get(results_name)
    if stamp:
      name = f"{stamp['cpu']} ({stamp['backend']})"
      found[name] = found.get(name, 0) + 1
  if found:
    report.write_json_atomic(os.path.join(out, "machines.json"), dict(sorted(found.items())))
  return found
