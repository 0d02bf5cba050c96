"""How badly one per-tensor grid fits each folded kernel: the spread of its channels' ranges.

    python -m experiments.folded_ranges --workdirs=<workdir>[,<workdir> ...]

For every trained workdir, folds BatchNorm into the kernels (as the sweep does) and prints the
kernels whose largest channel range (max |w| over an output channel) is the most times their
median channel's: with symmetric per-tensor weights the grid step is set by the largest, so a
ratio of r leaves the median channel about 2^(bits-1)/r levels. Used to read MobileNetV2's
per-tensor collapse (experiments/results/mobilenetv2/paper).
"""
import numpy as np
from absl import flags
from flax import traverse_util

from qreg import checkpoint, cli, ptq, quant


def channel_spread(folded_params) -> list[tuple[float, str, float]]:
  """(max / median channel range, kernel path, max range) of every kernel, widest first."""
  leaves = traverse_util.flatten_dict(folded_params, sep="/")
  spreads = []
  for path in quant.kernel_paths(folded_params):
    kernel = leaves[path]
    ranges = np.abs(np.asarray(kernel)).reshape(-1, kernel.shape[-1]).max(axis=0)
    spreads.append((float(ranges.max() / np.median(ranges)), path, float(ranges.max())))
  return sorted(spreads, reverse=True)


def main(workdirs: list[str], top: int = 2) -> None:
  print("| workdir | widest kernels: max / median channel range (max range) |")
  print("|---|---|")
  for workdir in workdirs:
    variables = checkpoint.load_run(workdir).variables
    folded = ptq.fold(variables["params"], variables["batch_stats"])
    print(f"| {workdir} | " + "; ".join(f"{path}: {ratio:.0f} ({largest:.1f})" for ratio, path, largest
                                         in channel_spread(folded)[:top]) + " |", flush=True)


if __name__ == "__main__":
  _WORKDIRS = flags.DEFINE_list("workdirs", None, "Trained workdirs.", required=True)
  cli.run(lambda argv: main(_WORKDIRS.value))
