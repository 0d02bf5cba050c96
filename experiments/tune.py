"""Chooses each method's hyperparameter from a tuning sweep, on the validation split.

    python -m experiments.tune --workdir=<tuning sweep root> --out=experiments/results/fashion_mnist_tuning

Reads every run's results.json (accuracies on the validation split; the runs
were made with eval.split='validation') and the tuning config's CRITERION:
among the values whose float accuracy is within MAX_FLOAT_DROP points of
no-reg's, the one with the best mean accuracy over CRITERION_SETTINGS; if
none is within, the one with the best float accuracy. Writes choices.json
(each method's chosen overrides), grid.json and grid.md (the whole grid).
"""
import json
import os

import numpy as np
from absl import app, flags

from experiments import run_sweep
from experiments.make_tables import accuracy
from qreg.quant import setting_name


def choose(sweep_path: str, root: str) -> dict:
  """{"criterion", "no_reg_float", "methods": {method: {"value", "overrides"}}, "grid": [...]}."""
  module = run_sweep.load_sweep_module(sweep_path)
  runs = module.sweep()
  results = {}
  for run in runs:
    path = os.path.join(root, run["name"], "results.json")
    with open(path) as f:
      stored = json.load(f)
    if stored["config"]["eval"]["split"] != "validation":
      raise ValueError(f"{path} was measured on {stored['config']['eval']['split']!r}; tuning "
                       "reads the validation split only.")
    results[run["name"]] = stored["rows"]
  no_reg_float = accuracy(results["no-reg"], (None, None))
  grid, chosen = [], {}
  for method, values in module.GRIDS.items():
    candidates = []
    for i, overrides in enumerate(values):
      rows = results[f"{method}/{i}"]
      score = float(np.mean([accuracy(rows, s) for s in module.CRITERION_SETTINGS]))
      float_acc = accuracy(rows, (None, None))
      eligible = no_reg_float - float_acc <= module.MAX_FLOAT_DROP
      grid.append({"method": method, "value": i, "overrides": overrides, "float": float_acc,
                   "criterion": score, "eligible": eligible,
                   "rows": {f"{setting_name(r['weight_bits'])},{setting_name(r['act_bits'])}":
                            100 * r["accuracy"] for r in rows}})
      candidates.append((eligible, score if eligible else float_acc, i))
    _, _, best = max(candidates)
    chosen[method] = {"value": best, "overrides": values[best]}
  criterion = (f"best mean validation accuracy over {list(module.CRITERION_SETTINGS)} among values "
               f"whose float validation accuracy is within {module.MAX_FLOAT_DROP} points of "
               "no-reg's (else the best float accuracy)")
  no_reg = {f"{setting_name(r['weight_bits'])},{setting_name(r['act_bits'])}": 100 * r["accuracy"]
            for r in results["no-reg"]}
  return {"criterion": criterion, "no_reg_float": no_reg_float, "no_reg_rows": no_reg,
          "methods": chosen, "grid": grid}


def markdown(choice: dict) -> str:
  settings = list(choice["grid"][0]["rows"])
  lines = [f"Criterion: {choice['criterion']}. No-reg float validation accuracy: "
           f"{choice['no_reg_float']:.2f}%.", "",
           "| method | value | overrides | " + " | ".join(settings) + " | criterion | chosen |",
           "|---|---|---|" + "---|" * (len(settings) + 2),
           "| no-reg | | | " + " | ".join(f"{choice['no_reg_rows'][s]:.2f}" for s in settings)
           + " | | |"]
  for g in choice["grid"]:
    mark = "**yes**" if choice["methods"][g["method"]]["value"] == g["value"] else ""
    if not g["eligible"]:
      mark += " (float drop > limit)"
    overrides = ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else
                          f"{k.split('.')[-1]}={v}" for k, v in g["overrides"].items()
                          if not (k.startswith("reg.lambda_") and v == 0 and "kurtosis" not in k))
    lines.append(f"| {g['method']} | {g['value']} | {overrides} | "
                 + " | ".join(f"{g['rows'][s]:.2f}" for s in settings)
                 + f" | {g['criterion']:.2f} | {mark} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  choice = choose(_CONFIG.value, _WORKDIR.value)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "choices.json"), "w") as f:
    json.dump({"criterion": choice["criterion"], "methods": choice["methods"]}, f, indent=2)
  with open(os.path.join(_OUT.value, "grid.json"), "w") as f:
    json.dump(choice, f, indent=2)
  table = markdown(choice)
  with open(os.path.join(_OUT.value, "grid.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  _CONFIG = flags.DEFINE_string("config", "configs/tables/fashion_mnist_tuning.py",
                                "The tuning sweep config (GRIDS, CRITERION_SETTINGS, MAX_FLOAT_DROP).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The tuning sweep's root.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Where to write choices.json, grid.json, grid.md.",
                             required=True)
  app.run(main)
