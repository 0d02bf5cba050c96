"""Sweep results as files: results.json, a markdown table and a PNG plot; and comparisons of workdirs.

    python -m qreg.report --workdirs=<dir1>,<dir2> --labels=no-reg,l1 --out=<dir>

writes comparison.md and comparison.png: one column / one colour per workdir.
Every file is written whole or not at all (atomic_file), so that a run killed
while writing leaves no truncated results.json to be mistaken for a finished run.
"""
import contextlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import matplotlib
from absl import flags, logging

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from qreg.quant import setting_name

Results = dict[str, Any]


def _float_accuracy(rows) -> float | None:
  return next((r["accuracy"] for r in rows if r["weight_bits"] is None and r["act_bits"] is None),
              None)


def results_table(results: Results) -> str:
  """Markdown table of one sweep, with each setting's drop from float accuracy."""
  rows = results["rows"]
  float_acc = _float_accuracy(rows)
  lines = ["| weight bits | activation bits | accuracy (%) | drop vs float (points) |",
           "|---|---|---|---|"]
  for r in rows:
    drop = "" if float_acc is None else f"{100 * (float_acc - r['accuracy']):.2f}"
    lines.append(f"| {setting_name(r['weight_bits'])} | {setting_name(r['act_bits'])} | "
                 f"{100 * r['accuracy']:.2f} | {drop} |")
  table = "\n".join(lines) + "\n"
  if "sensitivity" in results:
    table += "\nPer-layer sensitivity (one layer's weights quantized, everything else float):\n\n"
    table += "| layer | weight bits | accuracy (%) |\n|---|---|---|\n"
    table += "".join(f"| {r['layer']} | {r['weight_bits']} | {100 * r['accuracy']:.2f} |\n"
                     for r in results["sensitivity"])
  if "mixed" in results:
    table += ("\nMixed precision (bits per kernel under an average-bits budget):\n\n"
              "| budget (bits) | sensitivity | allocation | average bits | activation bits | "
              "accuracy (%) | bits per kernel |\n|---|---|---|---|---|---|---|\n")
    table += "".join(
        f"| {r['bit_budget']:g} | {r['sensitivity']} | {r['allocation']} | "
        f"{r['average_bits']:.3f} | {setting_name(r['act_bits'])} | {100 * r['accuracy']:.2f} | "
        f"{' '.join(setting_name(b) for b in r['layer_bits'].values())} |\n"
        for r in results["mixed"])
  return table


def comparison_table(all_results: Sequence[Results], labels: Sequence[str]) -> str:
  """One row per (weight bits, activation bits), one accuracy column per run."""
  settings = []
  for results in all_results:
    for r in results["rows"]:
      if (r["weight_bits"], r["act_bits"]) not in settings:
        settings.append((r["weight_bits"], r["act_bits"]))
  lookup = [{(r["weight_bits"], r["act_bits"]): r["accuracy"] for r in results["rows"]}
            for results in all_results]
  lines = ["| weight bits | activation bits | " + " | ".join(f"{l} (%)" for l in labels) + " |",
           "|---|---|" + "---|" * len(labels)]
  for setting in settings:
    cells = [f"{100 * acc[setting]:.2f}" if setting in acc else "" for acc in lookup]
    lines.append(f"| {setting_name(setting[0])} | {setting_name(setting[1])} | " +
                 " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# The plot's lines: which rows each holds and its x coordinate (the varying bit-width).
_LINES = (
    ("W=A=b", lambda w, a: w is not None and w == a, lambda w, a: w),
    ("W=b, A float", lambda w, a: w is not None and a is None, lambda w, a: w),
    ("W float, A=b", lambda w, a: w is None and a is not None, lambda w, a: a),
)


def plot_accuracy(all_results: Sequence[Results], labels: Sequence[str], path: str,
                  title: str = "Post-training quantization") -> None:
  """Accuracy against bit-width b: one line per activation setting, one colour per run."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ("-o", "--s", ":^")
  for i, (results, label) in enumerate(zip(all_results, labels)):
    color = colors[i % len(colors)]
    for (name, selects, x_of), style in zip(_LINES, styles):
      points = sorted((x_of(r["weight_bits"], r["act_bits"]), 100 * r["accuracy"])
                      for r in results["rows"] if selects(r["weight_bits"], r["act_bits"]))
      if points:
        ax.plot(*zip(*points), style, color=color, label=f"{label}: {name}")
    float_acc = _float_accuracy(results["rows"])
    if float_acc is not None:
      ax.axhline(100 * float_acc, color=color, alpha=0.4, lw=1, label=f"{label}: float")
  ax.set_xlabel("bits (b)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with atomic_file(path, "wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def print_once(*args) -> None:
  """print() on process 0 only: every process runs the sweep, the first one reports it."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def collect_sweep(events: Iterable[tuple[str, dict[str, Any]]], quantization: str) -> Results:
  """Results of a quantization sweep (qreg.ptq.sweep's (kind, row) pairs), each row printed
  on process 0 as it arrives."""
  results = {"rows": [], "quantization": quantization}
  print_once(f"Post-training quantization sweep ({quantization}):")
  start = time.time()
  for kind, row in events:
    seconds, start = time.time() - start, time.time()
    if kind == "sensitivity" and kind not in results:
      print_once(f"Per-layer sensitivity at {row['weight_bits']} bits:")
    results.setdefault(kind, []).append(row)
    if kind == "rows":
      print_once(f"  W{setting_name(row['weight_bits']):>5} A{setting_name(row['act_bits']):>5}  "
                 f"accuracy {row['accuracy']:.4f}  ({seconds:.1f}s)")
    elif kind == "sensitivity":
      print_once(f"  {row['layer']:<40} W{row['weight_bits']}  accuracy {row['accuracy']:.4f}")
    elif kind == "layer_sensitivities":
      print_once(f"Layer sensitivities by {row['sensitivity']} ({row['seconds']:.1f}s)")
    else:
      print_once(f"  budget {row['bit_budget']:g} bits ({row['sensitivity']}, "
                 f"{row['allocation']}): {row['average_bits']:.3f} bits per weight, "
                 f"A{setting_name(row['act_bits'])}  accuracy {row['accuracy']:.4f}  "
                 f"({seconds:.1f}s)")
  return results


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
  """A new file object whose contents replace `path` only once completely written.

  It is a temporary file in path's directory, renamed over path by os.replace
  (atomic on POSIX); a failure or a kill midway leaves path as it was.
  """
  temporary = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(temporary, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  with atomic_file(path) as f:
    json.dump(obj, f, indent=2)


def write_text_atomic(path: str, text: str) -> None:
  with atomic_file(path) as f:
    f.write(text)


def write_results(results: Results, workdir: str) -> None:
  """Process 0 prints the table and writes results.json, results.md and results.png to workdir."""
  if jax.process_index() != 0:
    return
  table = results_table(results)
  print(table, flush=True)
  write_json_atomic(os.path.join(workdir, "results.json"), results)
  write_text_atomic(os.path.join(workdir, "results.md"),
                    f"Quantization: {results.get('quantization', '')}\n\n{table}")
  plot_accuracy([results], [os.path.basename(os.path.normpath(workdir))],
                os.path.join(workdir, "results.png"))


def _read_results(path: str) -> Results:
  """The results in a results.json; ValueError in one line when it is not a finished sweep's."""
  try:
    with open(path) as f:
      results = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is truncated or not JSON ({e}); rerun the run that wrote it.") from e
  if not isinstance(results, dict) or "rows" not in results:
    raise ValueError(f"{path} holds no sweep rows; rerun the run that wrote it.")
  return results


def read_finished_results(path: str) -> Results | None:
  """The results at `path`, or None when the run has not finished writing them: no file
  (logged at INFO), or a truncated or unparsable one (logged as a warning)."""
  if not os.path.exists(path):
    logging.info("%s does not exist: the run is not finished.", path)
    return None
  try:
    return _read_results(path)
  except (OSError, ValueError) as e:
    logging.warning("Treating the run as unfinished: %s", e)
    return None


def load_results(workdir: str) -> Results:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run qreg.main or qreg.evaluate on {workdir} first.")
  return _read_results(path)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name, with its family, model and stepping where the CPU reports them:
  trained numbers differ between CPU models, and two of them can share a name ("AMD EPYC")."""
  fields = {}
  with contextlib.suppress(OSError):
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  name = fields.get("model name") or platform.processor() or platform.machine()
  ids = [f"{key} {fields[field]}" for key, field in
         (("family", "cpu family"), ("model", "model"), ("stepping", "stepping")) if field in fields]
  return f"{name} ({', '.join(ids)})" if ids else name


def environment() -> dict[str, Any]:
  """Where results were made: library versions, backend, device kind and process count."""
  device = jax.devices()[0]
  return {**{name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax")},
          "backend": jax.default_backend(),
          "device_kind": cpu_model() if device.platform == "cpu" else device.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count()}


def compare(workdirs: Sequence[str], labels: Sequence[str], out_dir: str) -> str:
  """Writes out_dir/comparison.{md,png} for several workdirs; returns the table."""
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs.")
  return write_comparison([load_results(w) for w in workdirs], labels, out_dir)


def write_comparison(all_results: Sequence[Results], labels: Sequence[str], out_dir: str) -> str:
  """Writes out_dir/comparison.{md,png}: one column / one colour per run; returns the table."""
  os.makedirs(out_dir, exist_ok=True)
  table = comparison_table(all_results, labels)
  quantization = "\n".join(f"- {l}: {r.get('quantization', '')}" for l, r in zip(labels, all_results))
  write_text_atomic(os.path.join(out_dir, "comparison.md"), f"{table}\n{quantization}\n")
  plot_accuracy(all_results, labels, os.path.join(out_dir, "comparison.png"))
  return table


if __name__ == "__main__":
  # Flags are defined only when run, so that importing this module defines none.
  from qreg import cli  # pylint: disable=g-import-not-at-top  (a command line, above every layer)
  _WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs holding results.json.", required=True)
  _LABELS = flags.DEFINE_list("labels", None, "One label per workdir (default: directory names).")
  _OUT = flags.DEFINE_string("out", None, "Directory for comparison.md and comparison.png.",
                             required=True)
  cli.run(lambda argv: print(compare(
      _WORKDIRS.value,
      _LABELS.value or [os.path.basename(os.path.normpath(w)) for w in _WORKDIRS.value],
      _OUT.value)))
