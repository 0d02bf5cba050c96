"""Chooses each method's hyperparameter from a tuning sweep, on the validation split.

    python -m experiments.tune --config=configs/tables/tuning.py:net=vgg --workdir=<tuning root> \
        --out=experiments/results/vgg/tuning

Reads every run's results.json (accuracies on the validation split; the runs were made with
eval.split='validation') and the tuning config's criterion: among the values whose float
accuracy is within MAX_FLOAT_DROP points of no-reg's, the one with the best mean accuracy over
CRITERION_SETTINGS; if none is within, the one with the best float accuracy (ties: the larger
value index; a run recorded as diverged by the sweep runner is never chosen). Writes choices.json (each method's chosen overrides), grid.json and grid.md (the
whole grid). experiments.study hands the choices to the table sweep.
"""
import os
from collections.abc import Sequence

import numpy as np
from absl import flags

from experiments import run_sweep
from experiments.make_tables import accuracy
from qreg import cli, report
from qreg.quant import setting_name


def _setting_key(row) -> str:
  return f"{setting_name(row['weight_bits'])},{setting_name(row['act_bits'])}"


def choose(runs: Sequence[dict], root: str, criterion_settings, max_float_drop: float) -> dict:
  """{"criterion", "no_reg_float", "methods": {method: {"value", "overrides"}}, "grid": [...]}.

  runs: the tuning sweep's runs, no-reg and each method's grid value i as `<method>/<i>`
  (labels "method" and "value"), in grid order.
  """
  results = {}
  for run in runs:
    path = os.path.join(root, run["name"], "results.json")
    stored = report.read_finished_results(path)
    if stored is None and run["name"] != "no-reg" and run_sweep.diverged(
        os.path.join(root, run["name"])):
      results[run["name"]] = None  # training went non-finite: never chosen
      continue
    if stored is None:
      raise FileNotFoundError(f"{path} is missing or unreadable: the tuning run {run['name']} "
                              "has not finished; run its sweep first.")
    if stored["config"]["eval"]["split"] != "validation":
      raise ValueError(f"{path} was measured on {stored['config']['eval']['split']!r}; tuning "
                       "reads the validation split only.")
    results[run["name"]] = stored["rows"]
  no_reg_float = accuracy(results["no-reg"], (None, None))
  grid, candidates = [], {}
  for run in runs:
    if run["name"] == "no-reg":
      continue
    method, i = run["labels"]["method"], run["labels"]["value"]
    rows = results[run["name"]]
    if rows is None:
      grid.append({"method": method, "value": i, "overrides": run["overrides"], "float": None,
                   "criterion": None, "eligible": False, "diverged": True, "rows": {}})
      continue
    score = float(np.mean([accuracy(rows, s) for s in criterion_settings]))
    float_acc = accuracy(rows, (None, None))
    eligible = no_reg_float - float_acc <= max_float_drop
    grid.append({"method": method, "value": i, "overrides": run["overrides"], "float": float_acc,
                 "criterion": score, "eligible": eligible,
                 "rows": {_setting_key(r): 100 * r["accuracy"] for r in rows}})
    candidates.setdefault(method, []).append((eligible, score if eligible else float_acc, i,
                                              run["overrides"]))
  chosen = {}
  for method in dict.fromkeys(g["method"] for g in grid):
    if method not in candidates:
      raise ValueError(f"Every tuning run of {method} diverged: nothing to choose.")
  for method, scored in candidates.items():
    _, _, best, overrides = max(scored, key=lambda c: c[:3])
    chosen[method] = {"value": best, "overrides": overrides}
  criterion = (f"best mean validation accuracy over {list(criterion_settings)} among values "
               f"whose float validation accuracy is within {max_float_drop} points of "
               "no-reg's (else the best float accuracy)")
  no_reg = {_setting_key(r): 100 * r["accuracy"] for r in results["no-reg"]}
  return {"criterion": criterion, "no_reg_float": no_reg_float, "no_reg_rows": no_reg,
          "methods": chosen, "grid": grid}


def markdown(choice: dict) -> str:
  settings = list(choice["no_reg_rows"])
  lines = [f"Criterion: {choice['criterion']}. No-reg float validation accuracy: "
           f"{choice['no_reg_float']:.2f}%.", "",
           "| method | value | overrides | " + " | ".join(settings) + " | criterion | chosen |",
           "|---|---|---|" + "---|" * (len(settings) + 2),
           "| no-reg | | | " + " | ".join(f"{choice['no_reg_rows'][s]:.2f}" for s in settings)
           + " | | |"]
  for g in choice["grid"]:
    mark = "**yes**" if choice["methods"][g["method"]]["value"] == g["value"] else ""
    if g.get("diverged"):
      mark = "diverged (training went non-finite)"
    elif not g["eligible"]:
      mark += " (float drop > limit)"
    overrides = ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else
                          f"{k.split('.')[-1]}={v}" for k, v in g["overrides"].items()
                          if not (k.startswith("reg.lambda_") and v == 0 and "kurtosis" not in k))
    lines.append(f"| {g['method']} | {g['value']} | {overrides} | "
                 + " | ".join(f"{g['rows'][s]:.2f}" if s in g["rows"] else "" for s in settings)
                 + f" | {'' if g['criterion'] is None else format(g['criterion'], '.2f')} | "
                 f"{mark} |")
  return "\n".join(lines) + "\n"


def tune(sweep: run_sweep.Sweep, root: str, out: str) -> dict[str, dict]:
  """Chooses on the tuning sweep run in root, writes choices.json, grid.json and grid.md to
  out, and returns {method: chosen overrides}."""
  choice = choose(sweep.runs, root, sweep.module.CRITERION_SETTINGS, sweep.module.MAX_FLOAT_DROP)
  os.makedirs(out, exist_ok=True)
  report.write_json_atomic(os.path.join(out, "choices.json"),
                           {"criterion": choice["criterion"], "methods": choice["methods"]})
  report.write_json_atomic(os.path.join(out, "grid.json"), choice)
  table = markdown(choice)
  report.write_text_atomic(os.path.join(out, "grid.md"), table)
  print(table, flush=True)
  return {method: c["overrides"] for method, c in choice["methods"].items()}


if __name__ == "__main__":
  _CONFIG = flags.DEFINE_string("config", None,
                                "The tuning sweep config[:arg] (CRITERION_SETTINGS, MAX_FLOAT_DROP).",
                                required=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The tuning sweep's root.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Where to write choices.json, grid.json, grid.md.",
                             required=True)
  cli.run(lambda argv: tune(run_sweep.load_sweep(_CONFIG.value), _WORKDIR.value, _OUT.value))
