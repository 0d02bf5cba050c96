"""The data-free ladder: the paper protocol, then cross-layer equalization, then bias correction,
per method, beside the strong protocol (issue 24's question: do the regularizers' gains survive
CLE?).

    python -m experiments.cle_ladder --workdir=<a table's root, e.g. .../mobilenetv2/tuned> --out=<dir>

Reads, for every finished run under <root>/<method>/seed<s> of METHODS, its results.json (paper),
results_cle.json, results_cle_bias_correction.json and results_strong.json
(experiments.reevaluate --protocol=...), and writes to --out:
- ladder.json: per protocol, method and seed, the accuracy (%) at each setting every file has;
- ladder.md: accuracy (mean ± std over seeds) per protocol and method, then each method's paired
  gain over no-reg under each protocol (mean ± std, then every seed's value), then what each
  protocol step buys no-reg (paired per seed against the paper protocol).
"""
import os

from absl import flags

from experiments import make_tables, reevaluate
from qreg import cli, report

METHODS = ("no-reg", "l1", "l2", "kure")
# Protocol label -> each run's results file. The strong protocol is the per-channel reference.
PROTOCOLS = (("paper", "results.json"),
             ("cle", reevaluate.results_name("cle")),
             ("cle+bias_correction", reevaluate.results_name("cle+bias_correction")),
             ("strong", reevaluate.results_name("strong")))
COLUMNS = ((None, None), (8, 8), (6, 6), (5, 5), (4, 4), (3, 3), (2, 8), (4, None))


def collect(root: str, methods=METHODS) -> dict:
  """{protocol: {method: {seed: {setting: accuracy %}}}} of the runs that have the protocol's
  results file; protocols with none are left out."""
  out = {}
  for protocol, name in PROTOCOLS:
    try:
      by_method = make_tables.collect(root, name)
    except FileNotFoundError:
      continue
    out[protocol] = {method: {run["seed"]: {(r["weight_bits"], r["act_bits"]): 100 * r["accuracy"]
                                            for r in run["rows"]} for run in runs}
                     for method, runs in by_method.items() if method in methods}
  return out


def _settings(ladder: dict) -> list:
  """COLUMNS that every run under every protocol has."""
  runs = [run for methods in ladder.values() for seeds in methods.values() for run in seeds.values()]
  return [s for s in COLUMNS if all(s in run for run in runs)]


def _cell(values) -> str:
  mean, std = make_tables.mean_std(values)
  return f"{mean:.2f} ± {std:.2f}"


def _paired(own: dict, base: dict, setting) -> str:
  seeds = sorted(s for s in base if s in own)
  return make_tables.paired_cell(own[s][setting] - base[s][setting] for s in seeds) if seeds else ""


def markdown(ladder: dict) -> str:
  settings = _settings(ladder)
  header = " | ".join(make_tables._setting_label(s) for s in settings)  # pylint: disable=protected-access
  rule = "|---|---|" + "---|" * len(settings)
  lines = ["## Test accuracy (%), mean ± std over seeds\n",
           f"| protocol | method | {header} |", rule]
  for protocol, methods in ladder.items():
    for method, seeds in methods.items():
      lines.append(f"| {protocol} | {method} | " + " | ".join(
          _cell([run[s] for run in seeds.values()]) for s in settings) + " |")
  lines += ["", "## Paired gain over no-reg under the same protocol (points): mean ± std, then "
            "each seed\n", f"| protocol | method | {header} |", rule]
  for protocol, methods in ladder.items():
    if "no-reg" not in methods:
      continue
    for method, seeds in methods.items():
      if method != "no-reg":
        lines.append(f"| {protocol} | {method} | " + " | ".join(
            _paired(seeds, methods["no-reg"], s) for s in settings) + " |")
  if "paper" in ladder:
    lines += ["", "## What each protocol buys over the paper protocol, same run (points): mean ± "
              "std, then each seed\n", f"| protocol | method | {header} |", rule]
    for protocol, methods in ladder.items():
      if protocol == "paper":
        continue
      for method, seeds in methods.items():
        if method in ladder["paper"]:
          lines.append(f"| {protocol} | {method} | " + " | ".join(
              _paired(seeds, ladder["paper"][method], s) for s in settings) + " |")
  return "\n".join(lines) + "\n"


def write_ladder(root: str, out: str) -> str:
  ladder = collect(root)
  if not ladder:
    raise FileNotFoundError(f"No finished runs of {', '.join(METHODS)} under {root}.")
  os.makedirs(out, exist_ok=True)
  settings = _settings(ladder)
  report.write_json_atomic(os.path.join(out, "ladder.json"), [
      {"protocol": protocol, "method": method, "seed": seed,
       "accuracy": [{"weight_bits": w, "act_bits": a, "accuracy": run[(w, a)]}
                    for w, a in settings]}
      for protocol, methods in ladder.items() for method, seeds in methods.items()
      for seed, run in sorted(seeds.items())])
  table = markdown(ladder)
  report.write_text_atomic(os.path.join(out, "ladder.md"), table)
  return table


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A tuned table's root.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
  cli.run(lambda argv: print(write_ladder(_WORKDIR.value, _OUT.value)))
