"""The paper's Table 1 in its shape, from the networks' tuned tables, with a plain reading.

    python -m experiments.table1 [--networks=vgg,resnet18,mobilenetv2]

Reads experiments/results/<network>/{paper,strong}/per_seed.json (written by
experiments.make_tables; `python -m experiments.study network_table --net=<network>` makes them) for each
network that has them, and writes experiments/results/table1.md and
table1.json:
- test accuracy (%) of each method at float and W = A = 8, 6, 5, 4, 3, 2 bits,
  mean ± std over seeds, under each protocol;
- where the unregularized model breaks: the widest W = A bit-width at which
  no-reg's mean loses 10 points or more against its own float accuracy;
- there, each method's gain over no-reg: the mean ± std over seeds of the
  paired difference (a method's run of seed s warm-starts from no-reg's run of
  seed s), and which method is best.
"""
import json
import os

from absl import flags

from experiments.make_tables import mean_std, paired_gains, seed_accuracies
from qreg import cli, report

RESULTS = os.path.join(os.path.dirname(__file__), "results")
NETWORKS = ("vgg", "resnet18", "mobilenetv2")
PROTOCOLS = ("paper", "strong")
WIDTHS = (None, 8, 6, 5, 4, 3, 2)  # W = A; None = float
BREAK_POINTS = 10.0
# Grid extensions whose rows join the table: experiments/results/<network>/<supplement>/. A
# method of the table that an extension chose again over its extended grid (kure_high) takes
# the extension's rows.
SUPPLEMENTS = ("multibit", "bound", "kure_high")
# The paper's own 4/4-bit numbers (Alizadeh et al. 2020, Table 1; CIFAR-10 and ImageNet, not
# Fashion-MNIST), for orientation only: no-reg -> l1.
PAPER_4BIT = {"vgg": "VGG-like, CIFAR-10: 11.47% -> 85.99%",
              "resnet18": "ResNet-18, CIFAR-10: 82.47% -> 87.62%; ImageNet: 0.30% -> 55.32%",
              "mobilenetv2": "(not in the paper's Table 1; KURE's network)"}


def read_if_present(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_network(network: str, protocol: str) -> dict | None:
  per_seed = read_if_present(os.path.join(RESULTS, network, protocol, "per_seed.json"))
  if per_seed is None:
    return None
  # Rows run after the table beside its no-reg runs (experiments.study multibit_qat): each is
  # paired against the no-reg runs of its own sweep, which are the table's (linked, or retrained
  # where the workdir was gone; `no_reg_differs` says whether they match the table's).
  supplements = {}
  for supplement in SUPPLEMENTS:
    rows = read_if_present(os.path.join(RESULTS, network, supplement, protocol, "per_seed.json"))
    if rows is not None:
      supplements[supplement] = rows
      per_seed.update({m: runs for m, runs in rows.items() if m != "no-reg"})
  table = {method: {str(w): mean_std(seed_accuracies(per_seed[method], (w, w)).values())
                    for w in WIDTHS}
           for method in per_seed}
  no_reg_float = table["no-reg"]["None"][0]
  breaking = next((w for w in WIDTHS[1:]
                   if no_reg_float - table["no-reg"][str(w)][0] >= BREAK_POINTS), None)
  gains = {}
  if breaking is not None:
    setting = (breaking, breaking)
    gains = {m: (g["mean"], g["std"]) for m, g in paired_gains(per_seed, setting).items()}
    for rows in supplements.values():
      gains.update({m: (g["mean"], g["std"]) for m, g in paired_gains(rows, setting).items()})
  found = {"table": table, "breaking_width": breaking, "gains": gains,
           "seeds": sorted({run["seed"] for runs in per_seed.values() for run in runs})}
  if supplements:
    found["no_reg_differs"] = {name: rows["no-reg"] != per_seed["no-reg"]
                               for name, rows in supplements.items()}
  return found


def markdown(results: dict) -> str:
  heading = " | ".join("float" if w is None else f"W{w}A{w}" for w in WIDTHS)
  lines = []
  for protocol in PROTOCOLS:
    lines += [f"### {protocol.capitalize()} protocol", "",
              f"| network | method | {heading} |", "|---|---|" + "---|" * len(WIDTHS)]
    for network, by_protocol in results.items():
      found = by_protocol.get(protocol)
      if found is None:
        continue
      for method, row in found["table"].items():
        lines.append(f"| {network} | {method} | "
                     + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in row.values()) + " |")
    lines.append("")
  lines += ["### Where no-reg breaks, and what each method recovers there", "",
            f"Breaking width: the widest W = A at which no-reg loses ≥ {BREAK_POINTS:g} points "
            "against its own float accuracy. Gain: mean ± std over seeds of the paired "
            "difference to no-reg (test accuracy, points).", "",
            "| network | protocol | breaks at | no-reg there | gains (best first) |",
            "|---|---|---|---|---|"]
  for network, by_protocol in results.items():
    for protocol in PROTOCOLS:
      found = by_protocol.get(protocol)
      if found is None:
        continue
      width = found["breaking_width"]
      if width is None:
        lines.append(f"| {network} | {protocol} | never (down to 2 bits) | | |")
        continue
      no_reg = found["table"]["no-reg"][str(width)]
      gains = sorted(found["gains"].items(), key=lambda item: -item[1][0])
      lines.append(f"| {network} | {protocol} | W{width}A{width} | "
                   f"{no_reg[0]:.2f} ± {no_reg[1]:.2f} | "
                   + ", ".join(f"{m} {g:+.2f} ± {s:.2f}" for m, (g, s) in gains) + " |")
  differing = [f"{network} {protocol} ({name})" for network, by_protocol in results.items()
               for protocol, found in by_protocol.items()
               for name, differs in found.get("no_reg_differs", {}).items() if differs]
  if differing:
    lines += ["", "Rows added beside the table are paired against their own no-reg runs, which "
              "differ from the table's in: " + ", ".join(differing) + "."]
  lines += ["", "The paper's own 4-bit numbers, for orientation (other datasets, full width):", ""]
  lines += [f"- {network}: {PAPER_4BIT.get(network, '(not a paper network)')}"
            for network in results]
  return "\n".join(lines) + "\n"


def write_table1(networks=NETWORKS) -> str:
  """table1.md and table1.json from the networks' committed per_seed.json; returns the markdown."""
  results = {}
  for network in networks:
    by_protocol = {p: read_network(network, p) for p in PROTOCOLS}
    if any(by_protocol.values()):
      results[network] = {p: r for p, r in by_protocol.items() if r is not None}
  if not results:
    raise FileNotFoundError(f"No per_seed.json under {RESULTS}/<network>/<protocol>/ for any of "
                            f"{', '.join(networks)}; run experiments.study network_table first.")
  text = markdown(results)
  report.write_text_atomic(os.path.join(RESULTS, "table1.md"), text)
  report.write_json_atomic(os.path.join(RESULTS, "table1.json"), results)
  return text


if __name__ == "__main__":
  _NETWORKS = flags.DEFINE_list("networks", list(NETWORKS), "Networks under experiments/results/ to read.")
  cli.run(lambda argv: print(write_table1(_NETWORKS.value)))
