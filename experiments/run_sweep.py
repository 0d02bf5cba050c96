"""Runs every run listed by a config file's sweep(), one workdir each, skipping finished ones.

    python -m experiments.run_sweep --config=configs/tables/fashion_mnist.py --workdir=<dir>

A sweep config file has get_config() (the shared base) and sweep(), a list of
dicts: {"name": str, "overrides": {"dotted.field": value, ...}, "labels": {...},
"warm_start": name of another run or None}. Run `name` trains in
<dir>/<name>; a finished run (results.json present) is skipped, an
interrupted one resumes from its checkpoint.

warm_start: runs that differ only in what happens from reg.start_epoch on
(the method, its λ) share their first start_epoch epochs exactly, since data
order and schedule are deterministic. Such a run starts from the named run's
checkpoint at that epoch instead of retraining it, which gives the same
parameters as training from scratch. The runner checks that the two configs
agree on everything else and falls back to training from scratch when the
checkpoint is not there.
"""
import importlib.util
import json
import os
import shutil
import time

import ml_collections
from absl import app, flags, logging

from qreg import cli, data, train

# Fields a warm-started run may change: they only act from reg.start_epoch on.
_METHOD_FIELDS = ("reg", "qat", "quant", "eval")


def load_sweep_module(path: str):
  """The sweep config file as a module."""
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"No sweep config at {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str):
  """(get_config, runs) of a sweep config file."""
  module = load_sweep_module(path)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path} has no sweep() function listing its runs.")
  runs = module.sweep()
  names = [run["name"] for run in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: run names must be unique, got {names}.")
  return module.get_config, runs


def run_config(get_config, run) -> ml_collections.ConfigDict:
  config = get_config()
  for field, value in run.get("overrides", {}).items():
    *parents, key = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if key not in node:
      raise KeyError(f"Run {run['name']!r}: unknown config field {field!r}.")
    node[key] = value
  return config


def _shared_prefix_fields(config: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in _METHOD_FIELDS}


def warm_start(config, source_config, source_dir: str, run_dir: str) -> bool:
  """Copies source_dir's checkpoint at config.reg.start_epoch into run_dir; False if there is none."""
  if _shared_prefix_fields(config) != _shared_prefix_fields(source_config):
    raise ValueError(f"Cannot warm-start {run_dir} from {source_dir}: their configs differ in "
                     "more than the method fields " + str(_METHOD_FIELDS))
  if config.reg.start_epoch != source_config.reg.start_epoch:
    raise ValueError(f"Cannot warm-start {run_dir} from {source_dir}: reg.start_epoch differs.")
  steps_per_epoch = data.build_input_pipeline(config.data).steps_per_epoch(config.data.batch_size)
  step_dir = os.path.join(source_dir, "checkpoints", str(config.reg.start_epoch * steps_per_epoch))
  if config.reg.start_epoch == 0 or not os.path.isdir(step_dir):
    return False
  target = os.path.join(run_dir, "checkpoints", os.path.basename(step_dir))
  if not os.path.exists(target):
    shutil.copytree(step_dir, target)
  return True


def run_sweep(sweep_path: str, root: str, only: list[str] | None = None) -> None:
  get_config, runs = load_sweep(sweep_path)
  by_name = {run["name"]: run for run in runs}
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"config": os.path.abspath(sweep_path), "runs": [run["name"] for run in runs]}, f,
              indent=2)
  for run in runs:
    if only and run["name"] not in only:
      continue
    run_dir = os.path.join(os.path.abspath(root), run["name"])
    if os.path.exists(os.path.join(run_dir, "results.json")):
      logging.info("Skipping %s: finished.", run["name"])
      continue
    config = run_config(get_config, run)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
      json.dump(run, f, indent=2)
    source = run.get("warm_start")
    if source and not os.path.exists(os.path.join(run_dir, "checkpoints")):
      source_dir = os.path.join(os.path.abspath(root), source)
      if warm_start(config, run_config(get_config, by_name[source]), source_dir, run_dir):
        logging.info("%s starts from %s's checkpoint at epoch %d.", run["name"], source,
                     config.reg.start_epoch)
    start = time.time()
    print(f"=== {run['name']} ===", flush=True)
    train.train_and_evaluate(config, run_dir)
    print(f"=== {run['name']} done in {time.time() - start:.0f}s ===", flush=True)


def _command_line() -> None:
  config = flags.DEFINE_string("config", None, "Sweep config file (with get_config() and sweep()).")
  workdir = flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per run.")
  only = flags.DEFINE_list("only", None, "Run only these run names (default: all).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.configure_logging()
    run_sweep(config.value, workdir.value, only.value)

  app.run(main)


if __name__ == "__main__":
  _command_line()
