"""Tables (mean ± std over seeds) and plots from a sweep's workdir.

    python -m experiments.make_tables --workdir=<dir> [--out=<dir>]

Reads every <dir>/**/run.json (written by experiments.run_sweep) with the
results.json beside it, groups runs by labels["method"] over labels["seed"],
and writes table.md, table.json and accuracy.png (accuracy against bit-width,
one line per method, error bars = std over seeds), per_seed.json, and, when the
sweep has no-reg runs, gains.md and gains.json: each method's accuracy minus
no-reg's on the same seed (its runs warm-start from that seed's no-reg run), mean
± std over seeds and every seed's value, at every setting.
"""
import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import archive  # pylint: disable=g-import-not-at-top
from qreg import cli, report  # pylint: disable=g-import-not-at-top


def _run_dirs(root: str, results_name: str = "results.json") -> list[str]:
  """Run directories in the sweep's order (root/sweep.json), else in path order."""
  found = sorted(dirpath for dirpath, _, files in os.walk(root, followlinks=True)
                 if "run.json" in files and results_name in files)
  sweep_file = os.path.join(root, "sweep.json")
  if not os.path.exists(sweep_file):
    return found
  with open(sweep_file) as f:
    order = {os.path.join(root, name): i for i, name in enumerate(json.load(f)["runs"])}
  return sorted(found, key=lambda d: order.get(d, len(order)))


def collect(root: str, results_name: str = "results.json") -> dict[str, list[dict]]:
  """method -> [{"seed", "rows"}], in the order methods first appear. A run whose results file
  is truncated or unreadable is left out (report.read_finished_results says which)."""
  by_method = collections.OrderedDict()
  for dirpath in _run_dirs(root, results_name):
    results = report.read_finished_results(os.path.join(dirpath, results_name))
    if results is None:
      continue
    with open(os.path.join(dirpath, "run.json")) as f:
      run = json.load(f)
    labels = run.get("labels", {})
    method = labels.get("method", run["name"])
    by_method.setdefault(method, []).append({"seed": labels.get("seed"), "rows": results["rows"]})
  if not by_method:
    raise FileNotFoundError(f"No finished runs (run.json + results.json) under {root}.")
  return by_method


def summarize(by_method: dict[str, list[dict]]):
  """{method: {(w, a): (mean, std, n)}} and the settings in table order."""
  settings = []
  summary = {}
  for method, runs in by_method.items():
    accuracies = collections.defaultdict(list)
    for run in runs:
      for r in run["rows"]:
        key = (r["weight_bits"], r["act_bits"])
        if key not in settings:
          settings.append(key)
        accuracies[key].append(100 * r["accuracy"])
    summary[method] = {k: (*mean_std(v), len(v)) for k, v in accuracies.items()}
  return summary, settings


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = list(values)
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def accuracy(rows, setting) -> float:
  """Accuracy (%) of a results row list at setting = (weight_bits, act_bits)."""
  return 100 * next(r["accuracy"] for r in rows
                    if (r["weight_bits"], r["act_bits"]) == tuple(setting))


def seed_accuracies(runs: list[dict], setting) -> dict:
  """seed -> accuracy (%) at setting, of one method's runs ({"seed", "rows"})."""
  return {run["seed"]: accuracy(run["rows"], setting) for run in runs}


def paired_gains(by_method: dict[str, list[dict]], setting,
                 reference: str = "no-reg") -> dict[str, dict]:
  """method -> {"mean", "std", "per_seed": {seed: points}}: its accuracy minus the reference
  method's (no-reg's) at setting, seed by seed, over the seeds both have; empty without
  reference runs."""
  if reference not in by_method:
    return {}
  base = seed_accuracies(by_method[reference], setting)
  gains = {}
  for method, runs in by_method.items():
    if method == reference:
      continue
    own = seed_accuracies(runs, setting)
    per_seed = {seed: own[seed] - base[seed] for seed in sorted(base) if seed in own}
    if per_seed:
      mean, std = mean_std(per_seed.values())
      gains[method] = {"mean": mean, "std": std, "per_seed": per_seed}
  return gains


def paired_cell(differences) -> str:
  """Paired differences (points) in a table cell: mean ± std, then each one."""
  differences = list(differences)
  mean, std = mean_std(differences)
  return f"{mean:+.2f} ± {std:.2f} (" + " / ".join(f"{d:+.1f}" for d in differences) + ")"


def gains_markdown(gains_by_setting: dict, settings, reference: str = "no-reg") -> str:
  lines = [f"Paired gain over {reference} (points): a method's test accuracy minus "
           f"{reference}'s on the same seed; mean ± std over seeds, then each seed's value.", "",
           "| method | " + " | ".join(_setting_label(s) for s in settings) + " |",
           "|---|" + "---|" * len(settings)]
  methods = list(dict.fromkeys(m for gains in gains_by_setting.values() for m in gains))
  for method in methods:
    cells = []
    for setting in settings:
      g = gains_by_setting[setting].get(method)
      cells.append("" if g is None else paired_cell(g["per_seed"].values()))
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _setting_label(setting) -> str:
  w, a = setting
  return "float" if w is None and a is None else f"({report.setting_name(w)},{report.setting_name(a)})"


def markdown(summary, settings) -> str:
  header = "| method | " + " | ".join(_setting_label(s) for s in settings) + " | seeds |"
  lines = [header, "|---|" + "---|" * (len(settings) + 1)]
  for method, cells in summary.items():
    seeds = max(n for _, _, n in cells.values())
    lines.append(f"| {method} | " + " | ".join(
        f"{cells[s][0]:.2f} ± {cells[s][1]:.2f}" if s in cells else "" for s in settings) +
        f" | {seeds} |")
  return "\n".join(lines) + "\n"


def plot(summary, settings, path: str) -> None:
  """Accuracy at W=A=b against b, one line per method; the float accuracy at the right."""
  quantized = sorted({w for w, a in settings if w is not None and w == a})
  x_float = (max(quantized) + 2) if quantized else 0
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (method, cells) in enumerate(summary.items()):
    points = [(b, cells[(b, b)]) for b in quantized if (b, b) in cells]
    if (None, None) in cells:
      points.append((x_float, cells[(None, None)]))
    xs = [x for x, _ in points]
    ax.errorbar(xs, [c[0] for _, c in points], yerr=[c[1] for _, c in points], fmt="-o",
                capsize=3, color=f"C{i}", label=method)
  ax.set_xticks(quantized + [x_float], [str(b) for b in quantized] + ["float"])
  ax.set_xlabel("bits (weights = activations)")
  ax.set_ylabel("test accuracy (%), mean ± std over seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_gains(by_method: dict[str, list[dict]], settings, out: str, name: str = "gains",
                reference: str = "no-reg") -> None:
  """<name>.md and <name>.json: every method's paired gains over the reference method, at each
  setting that every run has; nothing without reference runs."""
  gains = {setting: paired_gains(by_method, setting, reference) for setting in settings
           if all(setting in {(r["weight_bits"], r["act_bits"]) for r in run["rows"]}
                  for runs in by_method.values() for run in runs)}
  if any(gains.values()):
    report.write_text_atomic(os.path.join(out, f"{name}.md"),
                             gains_markdown(gains, list(gains), reference))
    report.write_json_atomic(os.path.join(out, f"{name}.json"),
                             [{"weight_bits": w, "act_bits": a, "gains": g}
                              for (w, a), g in gains.items()])


def make_tables(root: str, out: str, results_name: str = "results.json") -> str:
  by_method = collect(root, results_name)
  summary, settings = summarize(by_method)
  os.makedirs(out, exist_ok=True)
  table = markdown(summary, settings)
  report.write_text_atomic(os.path.join(out, "table.md"), table)
  report.write_json_atomic(os.path.join(out, "table.json"), {
      method: [{"weight_bits": w, "act_bits": a, "mean": m, "std": s, "seeds": n}
               for (w, a), (m, s, n) in cells.items()] for method, cells in summary.items()})
  report.write_json_atomic(os.path.join(out, "per_seed.json"), {
      method: [{"seed": run["seed"], "rows": [
          {k: r[k] for k in ("weight_bits", "act_bits", "accuracy")} for r in run["rows"]]}
               for run in runs] for method, runs in by_method.items()})
  plot(summary, settings, os.path.join(out, "accuracy.png"))
  write_gains(by_method, settings, out)
  archive.write_machines(root, out, results_name)
  return table


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of a sweep.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Where to write the tables and plots (default: workdir).")
  _RESULTS = flags.DEFINE_string("results", "results.json",
                                 "Each run's results file, e.g. results_strong.json.")
  cli.run(lambda argv: print(make_tables(_WORKDIR.value, _OUT.value or _WORKDIR.value,
                                         _RESULTS.value)))
