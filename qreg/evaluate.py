"""Post-training quantization sweep: accuracy of one checkpoint at many (weight, activation) bit-widths.

For every setting: fold BatchNorm into the preceding layers, fake-quantize the
kernels (qreg.quant), calibrate activation ranges by min-max on a few training
batches (run on the weight-quantized model with float activations), then
measure test accuracy with activations fake-quantized at the tapped points.

    python -m qreg.evaluate --config=configs/fashion_mnist.py --workdir=<dir>

reruns only the sweep from the workdir's last checkpoint.
"""
import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qreg import parallel, quant
from qreg.models import BN_EPSILON

PyTree = Any
BitSetting = tuple[int | None, int | None]


def _replicate(tree: PyTree, mesh) -> PyTree:
  return jax.device_put(tree, parallel.replicated(mesh))


@functools.partial(jax.jit, static_argnums=0)
def _correct_and_count(apply_fn: Callable, variables: PyTree, batch: dict[str, jax.Array]):
  logits = apply_fn(variables, batch["image"], train=False)
  correct = (jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]
  return jnp.sum(correct), jnp.sum(batch["mask"])


def accuracy(apply_fn: Callable, variables: PyTree, batches: Iterable[dict[str, np.ndarray]],
             mesh) -> float:
  """Fraction of correctly classified examples (padding excluded via batch['mask'])."""
  variables = _replicate(variables, mesh)
  correct = total = 0.0
  for batch in batches:
    c, n = _correct_and_count(apply_fn, variables, parallel.global_batch(batch, mesh))
    correct, total = correct + float(c), total + float(n)
  if total == 0:
    raise ValueError("No evaluation examples.")
  return correct / total


@functools.partial(jax.jit, static_argnums=0)
def _batch_activation_ranges(apply_fn: Callable, variables: PyTree, images: jax.Array):
  _, state = apply_fn(variables, images, train=False, mutable=["activation_stats"])
  # sow stores a tuple per call; each point is called once per forward pass.
  return jax.tree.map(lambda sown: sown[0], state["activation_stats"],
                      is_leaf=lambda x: isinstance(x, tuple))


def calibrate_activation_ranges(apply_fn: Callable, variables: PyTree,
                                batches: Iterable[dict[str, np.ndarray]], mesh) -> PyTree:
  """Min-max range of every tapped activation over the batches: {point: {'min', 'max'}}."""
  variables = _replicate(variables, mesh)
  ranges = None
  for batch in batches:
    r = _batch_activation_ranges(apply_fn, variables, parallel.global_batch(batch, mesh)["image"])
    ranges = r if ranges is None else jax.tree_util.tree_map_with_path(
        lambda path, a, b: jnp.minimum(a, b) if quant.path_names(path)[-1] == "min"
        else jnp.maximum(a, b), ranges, r)
  if ranges is None:
    raise ValueError("No calibration batches.")
  return ranges


def setting_name(bits: int | None) -> str:
  return "float" if bits is None else str(bits)


def parse_bit_settings(settings) -> list[BitSetting]:
  """Validates config.quant.bit_settings: a list of (weight_bits, act_bits), None = float."""
  parsed = []
  for setting in settings:
    if len(setting) != 2:
      raise ValueError(f"quant.bit_settings entry {setting!r} must be (weight_bits, act_bits).")
    weight_bits, act_bits = setting
    quant.check_bits(weight_bits, "weight_bits")
    quant.check_bits(act_bits, "act_bits")
    parsed.append((weight_bits, act_bits))
  return parsed


def evaluate_bit_settings(model, params: PyTree, batch_stats: PyTree, pipeline, mesh,
                          settings: list[BitSetting], *, per_channel: bool,
                          num_calibration_batches: int, batch_size: int) -> list[dict[str, Any]]:
  """Test accuracy of the folded model at each (weight_bits, act_bits) setting."""
  folded_params = quant.fold_batch_norm(params, batch_stats, BN_EPSILON)
  # One model per activation bit-width, so each compiles once for the whole sweep.
  apply_fns = {act_bits: model.clone(folded=True, act_bits=act_bits).apply
               for act_bits in {None} | {act_bits for _, act_bits in settings}}
  ranges_by_weight_bits = {}
  rows = []
  for weight_bits, act_bits in settings:
    start = time.time()
    qparams = quant.quantize_params(folded_params, weight_bits, per_channel=per_channel)
    variables = {"params": qparams}
    if act_bits is not None:
      if weight_bits not in ranges_by_weight_bits:
        ranges_by_weight_bits[weight_bits] = calibrate_activation_ranges(
            apply_fns[None], variables,
            pipeline.eval_batches(batch_size, split="train", num_batches=num_calibration_batches),
            mesh)
      variables["activation_ranges"] = ranges_by_weight_bits[weight_bits]
    acc = accuracy(apply_fns[act_bits], variables,
                   pipeline.eval_batches(batch_size), mesh)
    rows.append({"weight_bits": weight_bits, "act_bits": act_bits, "accuracy": acc})
    print(f"  W{setting_name(weight_bits):>5} A{setting_name(act_bits):>5}  accuracy {acc:.4f}"
          f"  ({time.time() - start:.1f}s)", flush=True)
  return rows


def run_sweep(config: ml_collections.ConfigDict, model, params: PyTree, batch_stats: PyTree,
              pipeline, mesh) -> dict[str, Any]:
  """The sweep of config.quant on one trained model; returns the results dict."""
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  settings = parse_bit_settings(config.quant.bit_settings)
  print(f"Post-training quantization sweep ({len(settings)} settings, "
        f"{'per-channel' if config.quant.per_channel else 'per-tensor'} weights):", flush=True)
  rows = evaluate_bit_settings(
      model, params, batch_stats, pipeline, mesh, settings,
      per_channel=config.quant.per_channel,
      num_calibration_batches=config.quant.num_calibration_batches,
      batch_size=config.eval.batch_size)
  return {"rows": rows, "config": json.loads(config.to_json_best_effort()),
          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def results_table(results: dict[str, Any]) -> str:
  """Markdown table of the sweep, with each setting's drop from float accuracy."""
  rows = results["rows"]
  float_acc = next((r["accuracy"] for r in rows
                    if r["weight_bits"] is None and r["act_bits"] is None), None)
  lines = ["| weight bits | activation bits | accuracy (%) | drop vs float (points) |",
           "|---|---|---|---|"]
  for r in rows:
    drop = "" if float_acc is None else f"{100 * (float_acc - r['accuracy']):.2f}"
    lines.append(f"| {setting_name(r['weight_bits'])} | {setting_name(r['act_bits'])} | "
                 f"{100 * r['accuracy']:.2f} | {drop} |")
  return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], workdir: str) -> None:
  """Writes workdir/results.json and workdir/results.md (process 0 only) and prints the table."""
  table = results_table(results)
  print(table, flush=True)
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)




if __name__ == "__main__":
  from qreg import main, train  # pylint: disable=g-import-not-at-top  (train imports this module)
  main.run(train.evaluate_checkpoint, "Workdir holding the checkpoint to evaluate.")
