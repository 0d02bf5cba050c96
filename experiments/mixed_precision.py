"""Mixed precision against average bits, per method, and how well each cheap proxy ranks layers.

    python -m experiments.mixed_precision --workdir=<a table's root, e.g. .../small_cnn/tuned> --out=<dir>

Reads results_mixed.json (experiments.reevaluate --protocol=mixed) of every finished run under
<root>/<method>/seed<s> for METHODS, and writes to --out:
- mixed.json: per method, seed, budget and sensitivity the accuracy and average bits; the uniform
  rows (W=b, A8); each proxy's rank correlation with `measured` and its seconds;
- mixed.md: accuracy (mean ± std over seeds) at each budget by each sensitivity beside uniform
  widths, the rank correlations and the costs (median and range: a run's time counts whatever
  else the machine was doing);
- mixed.png: accuracy against average bits, one panel per method, one line per sensitivity and
  the uniform widths.

Rank correlation: Spearman's rho between a proxy's and `measured`'s values over every (kernel,
bits) pair of a run (all pairs), and across kernels at each bit-width, averaged over the widths
(across kernels: what an allocation compares).
"""
import collections
import json
import os

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import reevaluate, run_sweep  # pylint: disable=g-import-not-at-top
from qreg import cli, report  # pylint: disable=g-import-not-at-top

METHODS = ("no-reg", "l1", "l2", "kure")
RESULTS_NAME = reevaluate.results_name("mixed")
PROXIES = ("bound", "hessian")


def _mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def rank_correlations(sensitivities: dict) -> dict[str, dict[str, float]]:
  """{proxy: {'all_pairs': rho, 'across_kernels': mean rho over bit-widths}} against measured,
  from one run's layer_sensitivities rows ({name: row})."""
  measured = sensitivities["measured"]["values"]
  kernels = sorted(measured)
  out = {}
  for proxy in PROXIES:
    if proxy not in sensitivities:
      continue
    values = sensitivities[proxy]["values"]
    flat = lambda table: [v for kernel in kernels for v in table[kernel]]
    across = [stats.spearmanr([measured[k][i] for k in kernels],
                              [values[k][i] for k in kernels]).statistic
              for i in range(len(measured[kernels[0]]))]
    out[proxy] = {"all_pairs": float(stats.spearmanr(flat(measured), flat(values)).statistic),
                  "across_kernels": float(np.nanmean(across))}
  return out


def read_runs(root: str, methods=METHODS) -> dict:
  """{method: {seed: results_mixed.json}} of the finished runs."""
  runs = collections.defaultdict(dict)
  for method in methods:
    method_dir = os.path.join(root, method)
    if not os.path.isdir(method_dir):
      continue
    for name in sorted(os.listdir(method_dir)):
      path = os.path.join(method_dir, name)
      if name.startswith("seed") and run_sweep.is_finished(path, RESULTS_NAME):
        with open(os.path.join(path, RESULTS_NAME)) as f:
          runs[method][int(name[4:])] = json.load(f)
  return dict(runs)


def summarize(runs: dict) -> dict:
  """Per method and seed: {'uniform': {bits: acc %}, 'mixed': {(sensitivity, budget): (acc %,
  average bits)}, 'correlations', 'seconds'}."""
  summary = {}
  for method, seeds in runs.items():
    summary[method] = {}
    for seed, results in seeds.items():
      sensitivities = {r["sensitivity"]: r for r in results["layer_sensitivities"]}
      summary[method][seed] = {
          "uniform": {r["weight_bits"]: 100 * r["accuracy"] for r in results["rows"]
                      if r["act_bits"] == 8},
          "float": next(100 * r["accuracy"] for r in results["rows"] if r["weight_bits"] is None),
          "mixed": {f"{r['sensitivity']}@{r['bit_budget']:g}":
                    {"accuracy": 100 * r["accuracy"], "average_bits": r["average_bits"],
                     "layer_bits": r["layer_bits"]} for r in results["mixed"]},
          "correlations": rank_correlations(sensitivities),
          "seconds": {name: r["seconds"] for name, r in sensitivities.items()}}
  return summary


def _budgets_and_sensitivities(summary: dict) -> tuple[list[float], list[str]]:
  keys = {key for seeds in summary.values() for s in seeds.values() for key in s["mixed"]}
  budgets = sorted({float(key.split("@")[1]) for key in keys})
  sensitivities = [name for name in ("measured", "bound", "hessian")
                   if any(key.startswith(name + "@") for key in keys)]
  return budgets, sensitivities


def markdown(summary: dict) -> str:
  budgets, sensitivities = _budgets_and_sensitivities(summary)
  lines = ["## Accuracy (%) at each average-bits budget, mean ± std over seeds\n",
           "Mixed: per-kernel bits from {2, 3, 4, 5, 6, 8} by the exact knapsack on each "
           "sensitivity; uniform: every kernel at b bits. Activations 8 bits throughout.\n",
           "| method | allocation | " + " | ".join(f"{b:g} bits" for b in budgets) + " |",
           "|---|---|" + "---|" * len(budgets)]
  for method, seeds in summary.items():
    uniform = [_mean_std([s["uniform"][int(b)] for s in seeds.values()])
               if float(b).is_integer() and all(int(b) in s["uniform"] for s in seeds.values())
               else "" for b in budgets]
    lines.append(f"| {method} | uniform | " + " | ".join(uniform) + " |")
    for name in sensitivities:
      cells = [_mean_std([s["mixed"][f"{name}@{b:g}"]["accuracy"] for s in seeds.values()])
               for b in budgets]
      lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
  lines += ["", "## Rank correlation with `measured` (Spearman), mean ± std over runs\n",
            "| proxy | all (kernel, bits) pairs | across kernels, mean over bit-widths |",
            "|---|---|---|"]
  runs = [s for seeds in summary.values() for s in seeds.values()]
  for proxy in PROXIES:
    values = [r["correlations"][proxy] for r in runs if proxy in r["correlations"]]
    if values:
      lines.append(f"| {proxy} | {_mean_std([v['all_pairs'] for v in values])} | "
                   f"{_mean_std([v['across_kernels'] for v in values])} |")
  lines += ["", "## Seconds to compute each sensitivity (every free kernel, every width), "
            "median and range over runs\n", "| sensitivity | median | min | max |",
            "|---|---|---|---|"]
  for name in sensitivities:
    seconds = [r["seconds"][name] for r in runs]
    lines.append(f"| {name} | {np.median(seconds):.1f} | {min(seconds):.1f} | "
                 f"{max(seconds):.1f} |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
  budgets, sensitivities = _budgets_and_sensitivities(summary)
  fig, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.8), sharey=True,
                           squeeze=False)
  for ax, (method, seeds) in zip(axes[0], summary.items()):
    widths = sorted({b for s in seeds.values() for b in s["uniform"] if b is not None})
    ax.errorbar(widths, [np.mean([s["uniform"][b] for s in seeds.values()]) for b in widths],
                [np.std([s["uniform"][b] for s in seeds.values()]) for b in widths],
                fmt="k-o", label="uniform", capsize=2)
    for name in sensitivities:
      cells = [[s["mixed"][f"{name}@{b:g}"] for s in seeds.values()] for b in budgets]
      ax.errorbar([np.mean([c["average_bits"] for c in cell]) for cell in cells],
                  [np.mean([c["accuracy"] for c in cell]) for cell in cells],
                  [np.std([c["accuracy"] for c in cell]) for cell in cells],
                  fmt="-s", label=name, capsize=2, alpha=0.8)
    ax.set_title(method)
    ax.set_xlabel("average bits per weight")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%), activations 8 bits")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  with report.atomic_file(path, "wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)


def write_mixed(root: str, out: str, methods=METHODS) -> str:
  summary = summarize(read_runs(root, methods))
  if not summary:
    raise ValueError(f"No {RESULTS_NAME} under {root}/<method>/seed*.")
  os.makedirs(out, exist_ok=True)
  report.write_json_atomic(os.path.join(out, "mixed.json"), summary)
  table = markdown(summary)
  report.write_text_atomic(os.path.join(out, "mixed.md"), table)
  plot(summary, os.path.join(out, "mixed.png"))
  return table


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A table's root of runs.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
  cli.run(lambda argv: print(write_mixed(_WORKDIR.value, _OUT.value)))
