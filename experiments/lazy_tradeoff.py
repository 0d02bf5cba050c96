"""Accuracy against cost of the cheaper penalty schedules (docs/cost.md).

    python -m experiments.lazy_tradeoff --results=experiments/results/fashion_mnist_lazy \
        --step_cost=benchmarks/results/step_cost.json --model=small_cnn --batch_size=128

Reads the lazy table's per_seed.json (`python -m experiments.study lazy_parity`) and the
amortized `hvp` costs of benchmarks.step_cost for the same model and batch,
and writes tradeoff.md (each (k, f): cost × bare, test accuracy mean ± std,
and the paired difference to k = 1, f = 1 per seed, mean ± std) and
tradeoff.png (accuracy against cost, error bars = std over seeds) beside
per_seed.json.
"""
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments.make_tables import accuracy, mean_std  # pylint: disable=g-import-not-at-top
from qreg import cli, report  # pylint: disable=g-import-not-at-top

SETTINGS = ((None, None), (4, 4), (3, 3))
EXACT = "l1-k1-f1"


def _schedule(method: str) -> tuple[int, float] | None:
  found = re.fullmatch(r"l1-k(\d+)-f([0-9.]+)(-retuned)?", method)
  return (int(found.group(1)), float(found.group(2))) if found else None


def _costs(path: str, model: str, batch_size: int) -> dict[tuple[int, float], float]:
  with open(path) as f:
    results = json.load(f)
  for entry in results["models"]:
    if entry["model"] == model and entry["batch_size"] == batch_size:
      return {(r["every_k_steps"], r["penalty_batch_fraction"]): r["ratio_to_bare"]
              for r in entry["amortized"] if r["impl"] == "hvp"}
  raise ValueError(f"{path} has no {model} at batch {batch_size}.")


def main(argv):
  del argv
  with open(os.path.join(_RESULTS.value, "per_seed.json")) as f:
    per_seed = json.load(f)
  costs = _costs(_STEP_COST.value, _MODEL.value, _BATCH_SIZE.value)
  exact = {run["seed"]: run["rows"] for run in per_seed[EXACT]}
  names = ["float" if w is None else f"({w},{a})" for w, a in SETTINGS]
  lines = [f"Test accuracy (%) of l1 with the penalty on one step in k and on a fraction f of "
           f"each batch; cost: amortized `hvp` step × bare ({_MODEL.value}, batch "
           f"{_BATCH_SIZE.value}, {_STEP_COST.value}). Δ: the paired difference to k=1, f=1 "
           "(same seed), mean ± std over seeds.", "",
           "| k | f | k/f | cost × bare | " + " | ".join(names) + " | "
           + " | ".join(f"Δ {n}" for n in names) + " | seeds |",
           "|---|---|---|---|" + "---|" * (2 * len(names) + 1)]
  points = {}
  for method, runs in per_seed.items():
    schedule = _schedule(method)
    if schedule is None:
      continue
    k, fraction = schedule
    by_seed = {run["seed"]: run["rows"] for run in runs}
    means = [mean_std(accuracy(rows, s) for rows in by_seed.values()) for s in SETTINGS]
    deltas = [mean_std(accuracy(by_seed[seed], s) - accuracy(exact[seed], s)
                        for seed in by_seed if seed in exact) for s in SETTINGS]
    cost = costs.get((k, fraction), float("nan"))
    points[method] = (cost, means)
    retuned = " (own λ)" if method.endswith("-retuned") else ""
    lines.append(f"| {k}{retuned} | {fraction:g} | {k / fraction:g} | {cost:.2f} | "
                 + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in means) + " | "
                 + " | ".join(f"{m:+.2f} ± {s:.2f}" for m, s in deltas)
                 + f" | {len(by_seed)} |")
  fig, axes = plt.subplots(1, len(SETTINGS), figsize=(4.5 * len(SETTINGS), 3.8))
  for axis, name, index in zip(axes, names, range(len(SETTINGS))):
    for method, (cost, means) in points.items():
      axis.errorbar(cost, means[index][0], yerr=means[index][1], fmt="o", capsize=3)
      axis.annotate(method.removeprefix("l1-"), (cost, means[index][0]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("amortized cost × bare step")
    axis.set_ylabel(f"test accuracy {name} (%)")
    axis.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(_RESULTS.value, "tradeoff.png"), dpi=120)
  report.write_text_atomic(os.path.join(_RESULTS.value, "tradeoff.md"), "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  _RESULTS = flags.DEFINE_string("results", None, "The lazy table's make_tables output.",
                                 required=True)
  _STEP_COST = flags.DEFINE_string("step_cost", "benchmarks/results/step_cost.json",
                                   "benchmarks.step_cost's JSON with amortized costs.")
  _MODEL = flags.DEFINE_string("model", "small_cnn", "Model name in step_cost.json.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size in step_cost.json.")
  cli.run(main)
