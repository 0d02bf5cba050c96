"""Post-training quantization sweep: accuracy of one checkpoint at many (weight, activation) bit-widths.

For every setting: fold BatchNorm into the preceding layers, quantize the
kernels (qreg.quant; scheme, granularity and per-layer rules from
config.quant), calibrate activation ranges on a few training batches run
through the weight-quantized model with float activations (min-max,
percentile or MSE-optimal), then measure test accuracy with activations
fake-quantized at every tapped point.

    python -m qreg.evaluate --config=configs/fashion_mnist.py --workdir=<dir>
    python -m qreg.evaluate --config=configs/fashion_mnist.py --workdir=<dir> --export=<file>

reruns only the sweep from the workdir's last checkpoint, or evaluates the
integer weights of a file written by qreg.export.
"""
import dataclasses
import functools
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from qreg import parallel, quant, report
from qreg.models import BN_EPSILON

PyTree = Any
BitSetting = tuple[int | None, int | None]


@dataclasses.dataclass(frozen=True)
class QuantSetup:
  """How weights and activations are quantized; built from config.quant by build_quant_setup."""
  weight_scheme: str = "symmetric"
  per_channel: bool = False
  weight_rules: tuple[quant.WeightRule, ...] = ()
  act_scheme: str = "asymmetric"
  calibration: str = "minmax"
  percentile: float = 99.99
  num_calibration_batches: int = 10

  def quantize_weights(self, folded_params: PyTree, bits: int | None) -> PyTree:
    return quant.quantize_params(folded_params, bits, scheme=self.weight_scheme,
                                 per_channel=self.per_channel, rules=self.weight_rules)

  def weight_integers(self, folded_params: PyTree, bits: int) -> PyTree:
    """The kernels as `quant.Quantized` (integer codes and steps), the other leaves unchanged."""
    return quant.quantize_params_to_integers(folded_params, bits, scheme=self.weight_scheme,
                                             per_channel=self.per_channel, rules=self.weight_rules)

  def describe(self) -> str:
    return (f"{self.weight_scheme} {'per-channel' if self.per_channel else 'per-tensor'} weights"
            f"{', rules ' + str([f'{r.pattern}={r.bits}' for r in self.weight_rules]) if self.weight_rules else ''}; "
            f"{self.act_scheme} activations, {self.calibration} calibration")


def build_quant_setup(quant_config: ml_collections.ConfigDict) -> QuantSetup:
  quant.check_scheme(quant_config.weight_scheme, "quant.weight_scheme")
  quant.check_scheme(quant_config.act_scheme, "quant.act_scheme")
  if quant_config.calibration not in quant.CALIBRATION_METHODS:
    raise ValueError(f"quant.calibration={quant_config.calibration!r}: expected one of "
                     f"{quant.CALIBRATION_METHODS}.")
  if quant_config.num_calibration_batches < 1:
    raise ValueError("quant.num_calibration_batches must be at least 1.")
  quant.percentile_range(np.zeros(1), quant_config.percentile)  # validates the percentile
  return QuantSetup(
      weight_scheme=quant_config.weight_scheme, per_channel=bool(quant_config.per_channel),
      weight_rules=quant.parse_weight_rules(quant_config.weight_rules),
      act_scheme=quant_config.act_scheme, calibration=quant_config.calibration,
      percentile=float(quant_config.percentile),
      num_calibration_batches=int(quant_config.num_calibration_batches))


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
def _activation_samples(apply_fn: Callable, variables: PyTree, images: jax.Array):
  _, state = apply_fn(variables, images, train=False, mutable=["activation_stats"])
  # sow stores a tuple per call; each point is called once per forward pass.
  return jax.tree.map(lambda sown: sown[0], state["activation_stats"],
                      is_leaf=lambda x: isinstance(x, tuple))


def collect_activation_samples(apply_fn: Callable, variables: PyTree,
                               batches: Iterable[dict[str, np.ndarray]], mesh) -> PyTree:
  """Samples of every tapped activation over the batches: {point: {'samples': np.ndarray}}.

  Every process gets the samples of the whole global batches, hence the same ranges.
  """
  variables = _replicate(variables, mesh)
  per_batch = [multihost_utils.process_allgather(_activation_samples(
      apply_fn, variables, parallel.global_batch(batch, mesh)["image"]), tiled=True)
      for batch in batches]
  if not per_batch:
    raise ValueError("No calibration batches.")
  return jax.tree.map(lambda *xs: np.concatenate(xs), *per_batch)


def activation_ranges(samples: PyTree, bits: int, setup: QuantSetup) -> PyTree:
  """The `activation_ranges` collection: {point: {'min', 'max'}} by setup.calibration."""

  def point_range(point_samples):
    low, high = quant.calibrate_range(point_samples["samples"], setup.calibration, bits,
                                      setup.act_scheme, setup.percentile)
    return {"min": jnp.float32(low), "max": jnp.float32(high)}

  return jax.tree.map(point_range, samples,
                      is_leaf=lambda x: isinstance(x, dict) and "samples" in x)


class SweepEvaluator:
  """Accuracy of a folded model's quantized variants, compiling each model variant once."""

  def __init__(self, model, pipeline, mesh, setup: QuantSetup, batch_size: int):
    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    self._model, self._pipeline, self._mesh = model, pipeline, mesh
    self.setup, self._batch_size = setup, batch_size
    self._apply_fns = {}

  def _apply_fn(self, act_bits: int | None) -> Callable:
    if act_bits not in self._apply_fns:
      self._apply_fns[act_bits] = self._model.clone(
          folded=True, act_bits=act_bits, act_scheme=self.setup.act_scheme).apply
    return self._apply_fns[act_bits]

  def calibration_samples(self, qparams: PyTree) -> PyTree:
    return collect_activation_samples(
        self._apply_fn(None), {"params": qparams},
        self._pipeline.eval_batches(self._batch_size, split="train",
                                    num_batches=self.setup.num_calibration_batches),
        self._mesh)

  def accuracy(self, qparams: PyTree, act_bits: int | None, samples: PyTree | None = None) -> float:
    """Test accuracy with weights qparams and activations at act_bits (samples calibrate them)."""
    variables = {"params": qparams}
    if act_bits is not None:
      if samples is None:
        samples = self.calibration_samples(qparams)
      variables["activation_ranges"] = activation_ranges(samples, act_bits, self.setup)
    return accuracy(self._apply_fn(act_bits), variables, self._pipeline.eval_batches(self._batch_size),
                    self._mesh)


def evaluate_bit_settings(evaluator: SweepEvaluator, folded_params: PyTree,
                          settings: list[BitSetting]) -> list[dict[str, Any]]:
  """Test accuracy of the folded model at each (weight_bits, act_bits) setting."""
  samples_by_weight_bits = {}
  rows = []
  for weight_bits, act_bits in settings:
    start = time.time()
    qparams = evaluator.setup.quantize_weights(folded_params, weight_bits)
    if act_bits is not None and weight_bits not in samples_by_weight_bits:
      samples_by_weight_bits[weight_bits] = evaluator.calibration_samples(qparams)
    acc = evaluator.accuracy(qparams, act_bits, samples_by_weight_bits.get(weight_bits))
    rows.append({"weight_bits": weight_bits, "act_bits": act_bits, "accuracy": acc})
    report.print_once(f"  W{report.setting_name(weight_bits):>5} A{report.setting_name(act_bits):>5}  accuracy {acc:.4f}"
                      f"  ({time.time() - start:.1f}s)")
  return rows


def layer_sensitivity(evaluator: SweepEvaluator, folded_params: PyTree,
                      bits: int) -> list[dict[str, Any]]:
  """Accuracy with one kernel at a time quantized to `bits` (all else float): where the model breaks."""
  rows = []
  kernels = [quant.path_names(path) for path, leaf in jax.tree_util.tree_leaves_with_path(folded_params)
             if quant.is_kernel(quant.path_names(path), leaf)]
  for path in kernels:
    layer = "/".join(path)
    only_this = (quant.WeightRule(f"^{re.escape(layer)}$", bits), quant.WeightRule(".", None))
    qparams = quant.quantize_params(folded_params, bits, scheme=evaluator.setup.weight_scheme,
                                    per_channel=evaluator.setup.per_channel, rules=only_this)
    acc = evaluator.accuracy(qparams, None)
    rows.append({"layer": layer, "weight_bits": bits, "accuracy": acc})
    report.print_once(f"  {layer:<40} W{bits}  accuracy {acc:.4f}")
  return rows


def run_sweep(config: ml_collections.ConfigDict, model, params: PyTree, batch_stats: PyTree,
              pipeline, mesh) -> dict[str, Any]:
  """The sweep of config.quant on one trained model; returns the results dict."""
  settings = parse_bit_settings(config.quant.bit_settings)
  setup = build_quant_setup(config.quant)
  evaluator = SweepEvaluator(model, pipeline, mesh, setup, config.eval.batch_size)
  folded_params = quant.fold_batch_norm(params, batch_stats, BN_EPSILON)
  report.print_once(f"Post-training quantization sweep ({len(settings)} settings; {setup.describe()}):")
  results = {"rows": evaluate_bit_settings(evaluator, folded_params, settings),
             "quantization": setup.describe(),
             "config": json.loads(config.to_json_best_effort()),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  if config.quant.sensitivity_bits is not None:
    quant.check_bits(config.quant.sensitivity_bits, "quant.sensitivity_bits")
    report.print_once(f"Per-layer sensitivity at {config.quant.sensitivity_bits} bits:")
    results["sensitivity"] = layer_sensitivity(evaluator, folded_params,
                                               config.quant.sensitivity_bits)
  return results


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from qreg import export, main, train  # pylint: disable=g-import-not-at-top  (they import this module)

  _EXPORT = flags.DEFINE_string("export", None,
                                "Evaluate this qreg.export file instead of the last checkpoint.")

  def _evaluate(config, workdir):
    if _EXPORT.value:
      return export.evaluate_export(config, workdir, _EXPORT.value)
    return train.evaluate_checkpoint(config, workdir)

  main.run(_evaluate, "Workdir holding the checkpoint to evaluate.")
