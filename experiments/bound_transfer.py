"""The transfer test of the bound-aware penalty (issue 23): its strength is a bit-width, so
SmallCNN's validation choice may carry to another network where a raw lambda did not.

    python -m experiments.bound_transfer [--networks=vgg,resnet18,mobilenetv2]

For each network that has both, reads the rows of each bound form at the network's own
validation choice (experiments/results/<network>/bound/{paper,strong}/per_seed.json, with
bound/tuning/choices.json) and at SmallCNN's choice applied unchanged
(experiments/results/<network>/bound_transfer/...; `python -m experiments.study bound_penalty
--net=<network>` makes both), and writes experiments/results/bound_transfer.{md,json}: per
network and form, the two reference widths, each one's test accuracy (mean ± std over seeds) at
POINTS, and the paired difference transferred minus own per seed (the runs of seed s
warm-start from the same no-reg run). Where the two choices are the same width, the rows are the
same runs and the difference is 0. A seed whose run has no results (its training diverged: the
study leaves diverged.json in its place) is left out of the means; the `seeds` column says which.
"""
import os

from absl import flags

from experiments import make_tables
from experiments.table1 import read_if_present
from qreg import cli, report

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SOURCE = "fashion_mnist_tuned"  # SmallCNN's tables, whose bound choices transfer
TABLES = {"vgg": "vgg", "resnet18": "resnet18", "mobilenetv2": "mobilenetv2"}
FORMS = ("bound", "bound-diff", "layer-bound")
# (protocol, (weight bits, act bits)): the paper protocol's and the strong protocol's low widths
# (each network's breaks are among them: MobileNetV2 breaks at paper W8A8 and strong W3A3).
POINTS = (("paper", (None, None)), ("paper", (8, 8)), ("paper", (4, 4)), ("paper", (3, 3)),
          ("strong", (3, 3)), ("strong", (2, 2)))


def choices(tables: str) -> dict[str, int] | None:
  found = read_if_present(os.path.join(RESULTS, tables, "bound", "tuning", "choices.json"))
  return None if found is None else {
      form: c["overrides"]["reg.bound_bits"] for form, c in found["methods"].items()}


def network_rows(net: str) -> list[dict]:
  """One row per bound form that has both its own and the transferred runs."""
  tables = TABLES[net]
  own_bits, source_bits = choices(tables), choices(SOURCE)
  runs = {(kind, protocol): read_if_present(os.path.join(RESULTS, tables, kind, protocol, "per_seed.json"))
          for kind in ("bound", "bound_transfer") for protocol in ("paper", "strong")}
  if own_bits is None or source_bits is None or any(r is None for r in runs.values()):
    return []
  rows = []
  for form in FORMS:
    if not all(form in r for r in runs.values()):
      continue
    row = {"network": net, "form": form, "own_bits": own_bits[form],
           "transferred_bits": source_bits[form], "points": {},
           "own_seeds": sorted(r["seed"] for r in runs["bound", "paper"][form]),
           "transferred_seeds": sorted(r["seed"] for r in runs["bound_transfer", "paper"][form])}
    for protocol, setting in POINTS:
      own = make_tables.seed_accuracies(runs["bound", protocol][form], setting)
      moved = make_tables.seed_accuracies(runs["bound_transfer", protocol][form], setting)
      diffs = {seed: moved[seed] - own[seed] for seed in sorted(own) if seed in moved}
      row["points"][f"{protocol} {make_tables._setting_label(setting)}"] = {  # pylint: disable=protected-access
          "own": make_tables.mean_std(own.values()),
          "transferred": make_tables.mean_std(moved.values()),
          "difference": make_tables.mean_std(diffs.values()), "per_seed": diffs}
    rows.append(row)
  return rows


def markdown(rows: list[dict]) -> str:
  if not rows:
    return "No network has both its own and the transferred bound rows yet.\n"
  names = list(rows[0]["points"])
  lines = ["Test accuracy (%), mean ± std over seeds: own choice → SmallCNN's choice; then the "
           "paired difference (transferred − own), mean ± std and each seed in the order of the "
           "seeds column (a seed missing on the right of → has no transferred results: its "
           "training diverged).\n",
           "| network | form | widths (own → SmallCNN's) | seeds (own → SmallCNN's) | "
           + " | ".join(names) + " |",
           "|---|---|---|---|" + "---|" * len(names)]
  for row in rows:
    cells = []
    for name in names:
      p = row["points"][name]
      (mean, std), differences = p["transferred"], list(p["per_seed"].values())
      moved = (f"{mean:.2f} ± {std:.2f}; " + make_tables.paired_cell(differences)
               if len(differences) > 1 else f"{mean:.2f}; {differences[0]:+.2f}")  # one: no spread
      cells.append(f"{p['own'][0]:.2f} ± {p['own'][1]:.2f} → {moved}")
    seeds = lambda key: ", ".join(str(s) for s in row[key]) or "none"
    lines.append(f"| {row['network']} | {row['form']} | {row['own_bits']} → "
                 f"{row['transferred_bits']} | {seeds('own_seeds')} → {seeds('transferred_seeds')} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_transfer(networks=tuple(TABLES)) -> str:
  rows = [row for net in networks for row in network_rows(net)]
  report.write_json_atomic(os.path.join(RESULTS, "bound_transfer.json"), rows)
  table = markdown(rows)
  report.write_text_atomic(os.path.join(RESULTS, "bound_transfer.md"), table)
  return table


if __name__ == "__main__":
  _NETWORKS = flags.DEFINE_list("networks", list(TABLES), "Networks to read.")
  cli.run(lambda argv: print(write_transfer(_NETWORKS.value)))
