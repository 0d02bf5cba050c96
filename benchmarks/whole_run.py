"""Wall time of whole runs of the offline default: no penalty, the penalty, cheaper schedules.

    python -m benchmarks.whole_run [--variants=no-reg,l1,l1-k4-f0.25] [--output_dir=...]

Each variant is `python -m qreg.main --config=configs/fashion_mnist.py` in a
fresh workdir (a separate process, compilation included), one after the
other; the wall time covers everything the command does: data loading,
training, per-epoch evaluation, checkpoints and the quantization sweep. The
training time is the span of metrics.jsonl's first to last record. Writes
whole_run.md and whole_run.json to --output_dir.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from qreg import cli, report

VARIANTS = {
    "no-reg": ["--config.reg.lambda_w=0", "--config.reg.lambda_a=0"],
    "l1": [],
    "l1-k4": ["--config.reg.every_k_steps=4"],
    "l1-f0.25": ["--config.reg.penalty_batch_fraction=0.25"],
    "l1-k4-f0.25": ["--config.reg.every_k_steps=4", "--config.reg.penalty_batch_fraction=0.25"],
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_VARIANTS = flags.DEFINE_list("variants", ["no-reg", "l1", "l1-k4-f0.25"],
                              f"Runs to time, from {list(VARIANTS)}.")
_CONFIG = flags.DEFINE_string("config", "configs/fashion_mnist.py", "The run's config file.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "benchmarks/results/whole_run",
                                  "Directory for whole_run.md and whole_run.json.")


def time_run(overrides: list[str], workdir: str) -> dict:
  start = time.time()
  subprocess.run([sys.executable, "-m", "qreg.main", f"--config={_CONFIG.value}",
                  f"--workdir={workdir}", *overrides], cwd=REPO, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wall = time.time() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    times = [json.loads(line)["time"] for line in f]
  rows = report.load_results(workdir)["rows"]
  return {"wall_s": wall, "train_s": times[-1] - times[0], "overrides": overrides,
          "accuracy": {f"{r['weight_bits']},{r['act_bits']}": r["accuracy"] for r in rows}}


def main(argv):
  del argv
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"Unknown --variants {unknown}; expected some of {list(VARIANTS)}.")
  results = {"config": _CONFIG.value, "runs": {}}
  with tempfile.TemporaryDirectory() as root:
    for variant in _VARIANTS.value:
      results["runs"][variant] = time_run(VARIANTS[variant], os.path.join(root, variant))
      print(variant, f"{results['runs'][variant]['wall_s']:.0f} s", flush=True)
  base = results["runs"][_VARIANTS.value[0]]["wall_s"]
  lines = [f"Whole runs of `python -m qreg.main --config={_CONFIG.value}`, one after the other "
           "(compilation, evaluation and the quantization sweep included).", "",
           f"| variant | overrides | wall (s) | × {_VARIANTS.value[0]} | training span (s) |",
           "|---|---|---|---|---|"]
  for variant, run in results["runs"].items():
    lines.append(f"| {variant} | {' '.join(run['overrides'])} | {run['wall_s']:.0f} | "
                 f"{run['wall_s'] / base:.2f} | {run['train_s']:.0f} |")
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  report.write_text_atomic(os.path.join(_OUTPUT_DIR.value, "whole_run.md"), "\n".join(lines) + "\n")
  report.write_json_atomic(os.path.join(_OUTPUT_DIR.value, "whole_run.json"), results)
  print("\n".join(lines))


if __name__ == "__main__":
  cli.run(main)
