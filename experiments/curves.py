"""Trade-off curves and the iso-float-cost table, from a trade-off sweep's runs (issue 22).

    python -m experiments.curves --workdir=<root of configs/tables/tradeoff.py's runs> --out=<dir>

Each run's labels (method, value, seed) place it on a method's curve; its results.json gives the
paper protocol's accuracies and results_strong.json the strong protocol's (experiments.study
tradeoff writes both). Writes to --out:
- curves.json: every grid value's per-seed accuracies at float and at each POINTS setting, its
  paired float cost and gains against no-reg's run of the same seed, and mean ± std;
- curves.png: float accuracy (x) against each POINTS setting (y), one curve per method in ladder
  order, error bars = std over seeds, no-reg as a star; the lower row zooms on the float costs
  the iso-float-cost table reads;
- curves.md: the points, whether each method's grid reached both ends (configs/tables/
  tradeoff.py's LOW_END_COST and HIGH_END_COST, on the 3-seed mean float cost), and the
  iso-float-cost table: at each BUDGETS float cost, each method's best grid value at each
  setting, as a paired gain over no-reg, and the method on the upper envelope.

A grid value whose training diverged on a seed (run_sweep's diverged.json) has no accuracy
there; it is listed with its seeds, and its float cost counts as unbounded: it reaches the high
end (as in the tuning, configs/tables/tradeoff.py) and no budget admits it.

The iso-float-cost table picks, per method, the best of its grid values on the test set: an
upper envelope of measured curves, not a hyperparameter choice (Table 1's choices are made on
the validation split).
"""
import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from configs.tables import tradeoff  # pylint: disable=g-import-not-at-top
from experiments import archive, make_tables, reevaluate, run_sweep  # pylint: disable=g-import-not-at-top
from qreg import cli, report  # pylint: disable=g-import-not-at-top

FLOAT = ("paper", (None, None))
# The y of each panel: (protocol, (weight_bits, act_bits)).
POINTS = (("paper", (3, 3)), ("strong", (2, 2)), ("paper", (2, 8)), ("strong", (2, 8)))
BUDGETS = (0.25, 0.5, 1.0, 2.0)  # points of float accuracy, paired against no-reg
RESULTS_FILES = {"paper": "results.json", "strong": reevaluate.results_name("strong")}


def point_name(point) -> str:
  protocol, (w, a) = point
  return "float" if point == FLOAT else f"{protocol} W{w}A{a}"


def value_label(overrides: dict) -> str:
  """A grid value in a few characters: λa=0.01, κ=3, b=4, {3..8}, b_ref=8."""
  if "qat.bit_set" in overrides:
    widths = overrides["qat.bit_set"]
    return f"{{{min(widths)}..{max(widths)}}}"
  if "qat.weight_bits" in overrides:
    return f"b={overrides['qat.weight_bits']}"
  if "reg.bound_bits" in overrides:
    return f"b_ref={overrides['reg.bound_bits']}"
  if "reg.lambda_kurtosis" in overrides:
    return f"κ={overrides['reg.lambda_kurtosis']:g}"
  return f"λa={overrides.get('reg.lambda_a', 0):g}"


def _labels_and_overrides(root: str, run_dir: str) -> tuple[dict, dict]:
  """A run's labels and its overrides without the seed (the grid value's own)."""
  with open(os.path.join(run_dir, "run.json")) as f:
    run = json.load(f)
  overrides = dict(run["overrides"])
  overrides.pop("seed", None)
  labels = dict(run["labels"])
  # A run linked in from another sweep (experiments.study.share_runs) carries that sweep's
  # labels, without its grid value here: that is in its name, <method>/<value>/seed<seed>.
  parts = os.path.relpath(run_dir, root).split(os.sep)
  if "value" not in labels and len(parts) == 3 and parts[1].isdigit():
    labels["value"] = int(parts[1])
  return labels, overrides


def read_runs(root: str) -> dict:
  """(method, value) -> {"overrides", "per_seed": {seed: {point name: accuracy %}}}, for the
  runs whose results exist under both protocols; in the sweep's order."""
  found = collections.OrderedDict()
  for run_dir in make_tables._run_dirs(root):  # pylint: disable=protected-access
    results = {p: report.read_finished_results(os.path.join(run_dir, name))
               for p, name in RESULTS_FILES.items()}
    if any(r is None for r in results.values()):
      continue
    labels, overrides = _labels_and_overrides(root, run_dir)
    accuracies = {point_name(point): make_tables.accuracy(results[point[0]]["rows"], point[1])
                  for point in (FLOAT, *POINTS)}
    key = (labels["method"], labels.get("value"))
    entry = found.setdefault(key, {"overrides": overrides, "per_seed": {}})
    entry["per_seed"][labels["seed"]] = accuracies
  return found


def read_diverged(root: str) -> dict:
  """(method, value) -> {"overrides", "seeds"}: the runs whose training diverged, in the sweep's
  order."""
  found = collections.OrderedDict()
  for run_dir in make_tables._run_dirs(root, run_sweep.DIVERGED):  # pylint: disable=protected-access
    if run_sweep.diverged(run_dir) is None:
      continue
    labels, overrides = _labels_and_overrides(root, run_dir)
    entry = found.setdefault((labels["method"], labels.get("value")),
                             {"overrides": overrides, "seeds": []})
    entry["seeds"].append(labels["seed"])
  return found


def _summary(values) -> dict:
  mean, std = make_tables.mean_std(values)
  return {"mean": mean, "std": std}


def curves(root: str) -> dict:
  """The curves of a trade-off sweep: no-reg's per-seed accuracies, and per method its grid
  values' per-seed accuracies, paired float costs and gains, with mean ± std."""
  runs = read_runs(root)
  if ("no-reg", None) not in runs:
    raise FileNotFoundError(f"No finished no-reg run under {root} (with results.json and "
                            f"{RESULTS_FILES['strong']}): nothing to pair the curves against.")
  no_reg = runs.pop(("no-reg", None))["per_seed"]
  names = [point_name(p) for p in (FLOAT, *POINTS)]
  by_method = collections.OrderedDict()
  for (method, value), entry in runs.items():
    seeds = sorted(s for s in entry["per_seed"] if s in no_reg)
    if not seeds:
      continue
    per_seed = {s: entry["per_seed"][s] for s in seeds}
    cost = {s: no_reg[s]["float"] - per_seed[s]["float"] for s in seeds}
    gains = {name: {s: per_seed[s][name] - no_reg[s][name] for s in seeds} for name in names[1:]}
    by_method.setdefault(method, []).append({
        "value": value, "label": value_label(entry["overrides"]),
        "overrides": entry["overrides"], "seeds": seeds, "per_seed": per_seed,
        "accuracy": {n: _summary(per_seed[s][n] for s in seeds) for n in names},
        "float_cost": {**_summary(cost.values()), "per_seed": cost},
        "gain": {n: {**_summary(g.values()), "per_seed": g} for n, g in gains.items()}})
  diverged = collections.OrderedDict()
  for (method, value), entry in read_diverged(root).items():
    by_method.setdefault(method, [])
    # A value diverged on some seeds has no mean float cost: its finished seeds leave the curve.
    by_method[method] = [p for p in by_method[method] if p["value"] != value]
    diverged.setdefault(method, []).append({
        "value": value, "label": value_label(entry["overrides"]),
        "overrides": entry["overrides"], "seeds": sorted(entry["seeds"])})
  return {"points": names,
          "no_reg": {"per_seed": no_reg,
                     "accuracy": {n: _summary(v[n] for v in no_reg.values()) for n in names}},
          "methods": by_method, "diverged": diverged}


def ends(points: list[dict], diverged: list[dict] = ()) -> dict:
  """Whether a curve reaches both ends of the grid rule, on its mean float costs (of the values
  that trained; None where none did); a value that diverged reaches the high end (its cost is
  unbounded)."""
  costs = [p["float_cost"]["mean"] for p in points]
  return {"lowest_cost": min(costs, default=None), "highest_cost": max(costs, default=None),
          "diverged": bool(diverged),
          "low_end": bool(costs) and min(costs) <= tradeoff.LOW_END_COST,
          "high_end": bool(diverged) or (bool(costs) and max(costs) >= tradeoff.HIGH_END_COST)}


def iso_float_cost(result: dict) -> dict:
  """{point: {budget: {method: best grid value within the budget, or None}}}: the value with
  the best mean accuracy at the point among those whose mean float cost is within the budget."""
  table = {}
  for name in result["points"][1:]:
    table[name] = {}
    for budget in BUDGETS:
      row = {}
      for method, points in result["methods"].items():
        within = [p for p in points if p["float_cost"]["mean"] <= budget]
        best = max(within, key=lambda p: p["accuracy"][name]["mean"], default=None)
        row[method] = None if best is None else {
            "value": best["value"], "label": best["label"],
            "float_cost": best["float_cost"]["mean"], "accuracy": best["accuracy"][name],
            "gain": best["gain"][name]}
      table[name][str(budget)] = row
  return table


def envelope(row: dict) -> list[str]:
  """The methods of an iso-float-cost row, best mean gain first (those with a value)."""
  return sorted((m for m, best in row.items() if best is not None),
                key=lambda m: -row[m]["gain"]["mean"])


def _pm(summary: dict, signed: bool = False) -> str:
  return f"{summary['mean']:{'+' if signed else ''}.2f} ± {summary['std']:.2f}"


def markdown(result: dict, iso: dict, net: str) -> str:
  names = result["points"]
  no_reg = result["no_reg"]
  lines = [f"# Trade-off curves: {net}", "",
           f"Test accuracy (%), mean ± std over seeds {sorted(no_reg['per_seed'])}; float cost "
           "and gains are paired against no-reg's run of the same seed (points). No-reg: "
           + ", ".join(f"{n} {_pm(no_reg['accuracy'][n])}" for n in names) + ".", "",
           "## Every grid value", "",
           "| method | value | seeds | float cost | " + " | ".join(names) + " |",
           "|---|---|---|---|" + "---|" * len(names)]
  diverged = result["diverged"]
  for method, points in result["methods"].items():
    for p in points:
      lines.append(f"| {method} | {p['label']} | {len(p['seeds'])} | "
                   f"{_pm(p['float_cost'], True)} | "
                   + " | ".join(_pm(p["accuracy"][n]) for n in names) + " |")
    for d in diverged.get(method, ()):
      lines.append(f"| {method} | {d['label']} | {len(d['seeds'])} | diverged (seed "
                   f"{', '.join(map(str, d['seeds']))}) | " + " | ".join("—" for _ in names) + " |")
  lines += ["", "## Ends of each grid", "",
            f"The rule (configs/tables/tradeoff.py): a grid runs from a value costing at most "
            f"{tradeoff.LOW_END_COST:g} float points to one costing at least "
            f"{tradeoff.HIGH_END_COST:g} (3-seed means).", "",
            "| method | values | lowest cost | highest cost | low end | high end |",
            "|---|---|---|---|---|---|"]
  cost = lambda c: "—" if c is None else f"{c:+.2f}"
  for method, points in result["methods"].items():
    e = ends(points, diverged.get(method, ()))
    lines.append(f"| {method} | {len(points) + len(diverged.get(method, ()))} | "
                 f"{cost(e['lowest_cost'])} | "
                 f"{'diverged' if e['diverged'] else cost(e['highest_cost'])} | "
                 f"{'reached' if e['low_end'] else 'NOT reached'} | "
                 f"{'reached' if e['high_end'] else 'NOT reached'} |")
  lines += ["", "## Iso-float-cost table", "",
            "At each float-cost budget, each method's grid value with the best mean accuracy "
            "among those whose mean paired float cost is within the budget: its paired gain "
            "over no-reg (mean ± std over seeds, then each seed), and its value. Picked on the "
            "test set from measured curves (an upper envelope, not a tuned choice); a method "
            "with more grid values has more to pick from.", ""]
  methods = list(result["methods"])
  for name in names[1:]:
    lines += [f"### {name} (no-reg {_pm(no_reg['accuracy'][name])})", "",
              "| method | " + " | ".join(f"cost ≤ {b:g}" for b in BUDGETS) + " |",
              "|---|" + "---|" * len(BUDGETS)]
    for method in methods:
      cells = []
      for budget in BUDGETS:
        best = iso[name][str(budget)][method]
        cells.append("—" if best is None else
                     f"{_pm(best['gain'], True)} (" + " / ".join(
                         f"{v:+.1f}" for v in best["gain"]["per_seed"].values())
                     + f"; {best['label']})")
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Upper envelope, best mean gain first: " + "; ".join(
        f"≤ {b:g}: " + ", ".join(envelope(iso[name][str(b)])) for b in BUDGETS) + ".", ""]
  return "\n".join(lines)


ZOOM_COST = 2.5  # the lower row's x range: float cost up to the largest budget and a margin


def plot(result: dict, path: str, net: str) -> None:
  """One column per POINTS setting: every grid value (upper row), and the float costs the
  iso-float-cost table reads, up to ZOOM_COST points (lower row)."""
  names = result["points"]
  fig, axes = plt.subplots(2, len(names) - 1, figsize=(5 * (len(names) - 1), 9.5))
  no_reg = result["no_reg"]["accuracy"]
  zoom = (no_reg["float"]["mean"] - ZOOM_COST, no_reg["float"]["mean"] + 0.5)
  for row, (title, xlim) in enumerate((("every grid value", None),
                                       (f"float cost ≤ {ZOOM_COST:g} points", zoom))):
    for ax, name in zip(axes[row], names[1:]):
      for method, points in result["methods"].items():
        ax.errorbar([p["accuracy"]["float"]["mean"] for p in points],
                    [p["accuracy"][name]["mean"] for p in points],
                    xerr=[p["accuracy"]["float"]["std"] for p in points],
                    yerr=[p["accuracy"][name]["std"] for p in points],
                    marker="o", markersize=4, capsize=2, label=method)
        for p in points:
          ax.annotate(p["label"], (p["accuracy"]["float"]["mean"], p["accuracy"][name]["mean"]),
                      fontsize=6, xytext=(2, 2), textcoords="offset points", annotation_clip=True)
      ax.errorbar([no_reg["float"]["mean"]], [no_reg[name]["mean"]],
                  xerr=[no_reg["float"]["std"]], yerr=[no_reg[name]["std"]],
                  marker="*", markersize=12, color="black", linestyle="none", label="no-reg")
      if xlim is not None:
        ax.set_xlim(*xlim)
      ax.set_xlabel("float test accuracy (%)")
      ax.set_ylabel(f"{name} test accuracy (%)")
      ax.set_title(f"{name}: {title}", fontsize=10)
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"{net}: float accuracy against low-bit accuracy, each method over its grid "
               "(mean ± std over seeds; diverged values left out)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_curves(root: str, out: str, net: str) -> str:
  """curves.json, curves.md and curves.png in out from the runs under root; returns the
  markdown."""
  result = curves(root)
  iso = iso_float_cost(result)
  os.makedirs(out, exist_ok=True)
  report.write_json_atomic(os.path.join(out, "curves.json"), {
      "net": net, **result,
      "ends": {m: ends(p, result["diverged"].get(m, ())) for m, p in result["methods"].items()},
      "iso_float_cost": iso, "budgets": BUDGETS})
  text = markdown(result, iso, net)
  report.write_text_atomic(os.path.join(out, "curves.md"), text)
  plot(result, os.path.join(out, "curves.png"), net)
  archive.write_machines(root, out)
  return text


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "Root of a trade-off sweep's runs.",
                                 required=True)
  _OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
  _NET = flags.DEFINE_string("net", "", "Network name for the titles.")
  cli.run(lambda argv: print(write_curves(_WORKDIR.value, _OUT.value,
                                          _NET.value or os.path.basename(_WORKDIR.value))))
