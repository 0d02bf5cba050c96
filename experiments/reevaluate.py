"""Re-runs the quantization sweep of trained runs under another PTQ protocol, no retraining.

    python -m experiments.reevaluate --workdir=<sweep root> --protocol=strong
        writes <run>/results_strong.json for every finished run (make_tables --results=...)
    python -m experiments.reevaluate --ladder --workdirs=<no-reg run>,<l1 run> --labels=no-reg,l1 \
        --out=<dir>
        the protocol ladder (configs/tables/protocols.py LADDER): one row per added step

Each run's own config.json gives the model, data and calibration; the
protocol's overrides (configs/tables/protocols.py) change only config.quant.
"""
import json
import os
import time

import jax
from absl import flags

from configs.tables import protocols
from experiments import archive, run_sweep
from qreg import cli, data, parallel, ptq, report
from qreg import config as config_lib
from qreg.quant import setting_name


def protocol_results(workdir: str, overrides: dict, bit_settings=None) -> dict:
  """The sweep of a trained workdir under config.quant overrides (results dict, not written)."""
  run = run_sweep.load_finished_run(workdir)
  settings = {} if bit_settings is None else {"quant.bit_settings": bit_settings}
  config = config_lib.with_overrides(run.config, {**overrides, **settings})
  mesh = parallel.make_mesh()
  config_lib.validate(config, mesh.devices.size)
  pipeline = data.build_input_pipeline(config.data)
  start = time.time()
  setup = ptq.sweep_setup(config, run.model, pipeline.info.image_shape)
  results = report.collect_sweep(
      ptq.sweep(config, setup, run.model, run.variables["params"], run.variables["batch_stats"],
                pipeline, mesh), setup.describe())
  results.update(overrides=overrides, seconds=time.time() - start,
                 split=config.eval.split, config=json.loads(config.to_json_best_effort()),
                 environment=report.environment())
  return results


def results_name(protocol: str) -> str:
  """The results file of a re-sweep under `protocol`, beside each run's results.json."""
  return f"results_{protocol.replace('+', '_')}.json"


def reevaluate_sweep(root: str, protocol: str) -> None:
  """results_<protocol>.json beside every finished run's results.json under root; runs already
  re-swept (a readable file) are skipped, a truncated one is redone. Several workers share the
  runs as a sweep's (run_sweep.for_each_claimed)."""
  name = results_name(protocol)
  todo = [dirpath for dirpath, _, files in sorted(os.walk(root, followlinks=True))
          if "run.json" in files and run_sweep.is_finished(dirpath)
          and not run_sweep.is_finished(dirpath, name)]

  def resweep(dirpath: str) -> None:
    if run_sweep.is_finished(dirpath, name):  # by another worker meanwhile
      return
    if not os.path.isdir(os.path.join(dirpath, "checkpoints")):
      raise FileNotFoundError(
          f"{dirpath} has no checkpoint to re-sweep under {protocol} (a run restored from "
          f"experiments.archive without it): remove the run from the workdir and the archive to "
          f"retrain it.")
    print(f"=== {os.path.relpath(dirpath, root)}: {protocol} ===", flush=True)
    results = protocol_results(dirpath, protocols.PROTOCOLS[protocol],
                               protocols.PROTOCOL_BIT_SETTINGS.get(protocol))
    report.write_json_atomic(os.path.join(dirpath, name), results)
    archive.save(dirpath)
    jax.clear_caches()  # as run_sweep does after each run

  # Claimed like a sweep's runs, so that several workers on one study share the re-sweeps.
  run_sweep.for_each_claimed(todo, lambda dirpath: dirpath, resweep)


def ladder(workdirs: list[str], labels: list[str], out: str) -> str:
  """The LADDER's cumulative protocols on each workdir: ladder.json and ladder.md in out."""
  os.makedirs(out, exist_ok=True)
  rows, overrides = [], {}
  for step_name, step in protocols.LADDER:
    overrides = {**overrides, **step}
    for workdir, label in zip(workdirs, labels):
      results = protocol_results(workdir, overrides, protocols.LADDER_BIT_SETTINGS)
      rows.append({"protocol": step_name, "run": label, "overrides": overrides,
                   "seconds": results["seconds"], "rows": results["rows"]})
      report.write_json_atomic(os.path.join(out, "ladder.json"), rows)
  settings = [(r["weight_bits"], r["act_bits"]) for r in rows[0]["rows"]]
  lines = ["| protocol | run | " + " | ".join(f"W{setting_name(w)}A{setting_name(a)}"
                                             for w, a in settings) + " | sweep time (s) |",
           "|---|---|" + "---|" * (len(settings) + 1)]
  for row in rows:
    accuracy = {(r["weight_bits"], r["act_bits"]): r["accuracy"] for r in row["rows"]}
    lines.append(f"| {row['protocol']} | {row['run']} | "
                 + " | ".join(f"{100 * accuracy[s]:.2f}" for s in settings)
                 + f" | {row['seconds']:.0f} |")
  table = "\n".join(lines) + "\n"
  report.write_text_atomic(os.path.join(out, "ladder.md"), table)
  return table


def _main(argv):
  del argv
  cli.configure_logging()
  if _LADDER.value:
    labels = _LABELS.value or [os.path.basename(os.path.normpath(w)) for w in _WORKDIRS.value]
    print(ladder(_WORKDIRS.value, labels, _OUT.value))
  else:
    reevaluate_sweep(_WORKDIR.value, _PROTOCOL.value)


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A sweep root (reevaluate every finished run).")
  _PROTOCOL = flags.DEFINE_enum("protocol", "strong", list(protocols.PROTOCOLS), "Protocol.")
  _LADDER = flags.DEFINE_bool("ladder", False, "Run the protocol ladder on --workdirs instead.")
  _WORKDIRS = flags.DEFINE_list("workdirs", None, "Trained workdirs, for --ladder.")
  _LABELS = flags.DEFINE_list("labels", None, "One label per workdir.")
  _OUT = flags.DEFINE_string("out", None, "Output directory, for --ladder.")
  cli.run(_main)
