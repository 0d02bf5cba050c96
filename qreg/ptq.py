"""Post-training quantization of a trained model: the setup from config, calibration, the sweep.

For every (weight_bits, act_bits) setting: fold BatchNorm into the preceding
layers, quantize the kernels (qreg.quant; scheme, granularity and per-layer
rules from config.quant), calibrate activation ranges on a few training
batches run through the weight-quantized model with float activations
(min-max, percentile or MSE-optimal), then measure accuracy with activations
fake-quantized at every tapped point.

The sweep yields its rows as they are measured; callers print and write them.
"""
import collections
import copy
import dataclasses
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from qreg import config as config_lib
from qreg import equalize, mixed, parallel, quant, rounding
from qreg.models import BN_EPSILON

PyTree = Any
Row = dict[str, Any]


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
  # The strong protocol's steps (docs/quantization.md, "Protocols"): bits of the first and last kernel
  # (in call order), empirical bias correction, AdaRound.
  first_last_bits: int | None = None
  bias_correction: bool = False
  adaround: bool = False
  adaround_iterations: int = 1000
  adaround_examples: int = 1024
  # Data-free steps on the folded model first (qreg.equalize).
  cross_layer_equalization: bool = False
  bias_absorption: bool = False

  @property
  def equalizes(self) -> bool:
    """Whether a data-free step (qreg.equalize) changes the folded model before quantizing."""
    return self.cross_layer_equalization or self.bias_absorption

  def quantize_weights(self, folded_params: PyTree, bits: int | None) -> PyTree:
    return quant.quantize_params(folded_params, bits, scheme=self.weight_scheme,
                                 per_channel=self.per_channel, rules=self.weight_rules)

  def weight_integers(self, folded_params: PyTree, bits: int) -> PyTree:
    """The kernels as `quant.Quantized` (integer codes and steps), the other leaves unchanged."""
    return quant.quantize_params_to_integers(folded_params, bits, scheme=self.weight_scheme,
                                             per_channel=self.per_channel, rules=self.weight_rules)

  def describe(self) -> str:
    rules = [f"{r.pattern}={quant.setting_name(r.bits)}" for r in self.weight_rules]
    steps = [name for name, on in (("cross-layer equalization", self.cross_layer_equalization),
                                   ("bias absorption", self.bias_absorption),
                                   ("bias correction", self.bias_correction),
                                   (f"AdaRound ({self.adaround_iterations} iterations)",
                                    self.adaround)) if on]
    return (f"{self.weight_scheme} {'per-channel' if self.per_channel else 'per-tensor'} weights"
            f"{', rules ' + str(rules) if rules else ''}"
            f"{', ' + ', '.join(steps) if steps else ''}; "
            f"{self.act_scheme} activations, {self.calibration} calibration")


def build_quant_setup(quant_config: ml_collections.ConfigDict,
                      kernel_order: Sequence[str] = ()) -> QuantSetup:
  """The QuantSetup of a validated config.quant (qreg.config.validate).

  kernel_order lists the model's kernel paths in call order (kernel_call_order); with
  quant.first_last_bits set, the first and the last get those bits ahead of the other rules.
  """
  rules = quant.parse_weight_rules(quant_config.weight_rules)
  if quant_config.first_last_bits is not None and kernel_order:
    ends = dict.fromkeys((kernel_order[0], kernel_order[-1]))
    rules = tuple(quant.WeightRule(re.escape(path), quant_config.first_last_bits)
                  for path in ends) + rules
  return QuantSetup(
      weight_scheme=quant_config.weight_scheme, per_channel=bool(quant_config.per_channel),
      weight_rules=rules, act_scheme=quant_config.act_scheme,
      calibration=quant_config.calibration, percentile=float(quant_config.percentile),
      num_calibration_batches=int(quant_config.num_calibration_batches),
      first_last_bits=quant_config.first_last_bits,
      bias_correction=bool(quant_config.bias_correction), adaround=bool(quant_config.adaround),
      adaround_iterations=int(quant_config.adaround_iterations),
      adaround_examples=int(quant_config.adaround_examples),
      cross_layer_equalization=bool(quant_config.cross_layer_equalization),
      bias_absorption=bool(quant_config.bias_absorption))


def sweep_setup(config: ml_collections.ConfigDict, model, image_shape: Sequence[int]
                ) -> QuantSetup:
  """The QuantSetup of config.quant for this model (its first and last layer known); raises
  ValueError for a weight rule that matches none of the model's kernels."""
  kernel_order = kernel_call_order(model, image_shape)
  setup = build_quant_setup(config.quant, kernel_order)
  quant.check_rules_match(kernel_order, setup.weight_rules)
  if config.quant.bit_budgets:  # a budget the rules make impossible fails before training
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                               train=False))
    sizes = quant.kernel_sizes(shapes["params"])
    fixed = mixed.fixed_widths(sizes, setup.weight_rules)
    least = {path: min(config.quant.bit_choices) for path in sizes if path not in fixed}
    for budget in config.quant.bit_budgets:
      mixed.check_budget(budget, sizes, fixed, least)
  return setup


def kernel_call_order(model, image_shape: Sequence[int]) -> list[str]:
  """The model's kernel paths in the order its layers run, recorded by intercepting the calls
  of the folded model's modules: a params dict's key order is not the call order (Flax sorts
  it: ResNet-18's 'head' came before 'stage1_block1' and 'stem' last)."""
  called = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      called.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(lambda: model.clone(folded=True).init(
        jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  kernels = {"/".join(quant.path_names(path)[:-1])
             for path, _ in jax.tree_util.tree_leaves_with_path(shapes["params"])
             if quant.path_names(path)[-1] == "kernel"}
  order = list(dict.fromkeys(name for name in called if name in kernels))
  return [f"{name}/kernel" for name in order]


def fold(params: PyTree, batch_stats: PyTree) -> PyTree:
  """params with BatchNorm folded into the kernels and biases, as the sweep quantizes them."""
  return quant.fold_batch_norm(params, batch_stats, BN_EPSILON)


def sweep_model(setup: QuantSetup, model):
  """The model the sweep runs the folded params in: with equalization, the one it is exact for
  (MobileNetV2 with ReLU in place of ReLU6)."""
  return equalize.equalizable_model(model) if setup.equalizes else model


def prepare_folded(setup: QuantSetup, model, params: PyTree, batch_stats: PyTree):
  """(model, folded params) as the sweep quantizes them: BatchNorm folded, then equalized and
  with biases absorbed when the setup asks (the model is then equalize.equalizable_model's)."""
  folded = fold(params, batch_stats)
  if not setup.equalizes:
    return model, folded
  model = sweep_model(setup, model)
  return model, equalize.equalize_model(model, params, folded,
                                        equalize=setup.cross_layer_equalization,
                                        absorb=setup.bias_absorption)


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
  counts = [_correct_and_count(apply_fn, variables, batch)
            for batch in parallel.prefetch_to_mesh(batches, mesh)]
  if not counts:
    raise ValueError("No evaluation examples.")
  correct, total = np.sum(jax.device_get(counts), axis=0)
  return float(correct) / float(total)


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
  per_batch = [multihost_utils.process_allgather(
      _activation_samples(apply_fn, variables, batch["image"]), tiled=True)
      for batch in parallel.prefetch_to_mesh(batches, mesh)]
  if not per_batch:
    raise ValueError("No calibration batches.")
  return jax.tree.map(lambda *xs: np.concatenate(xs), *per_batch)


def _tap_scheme(point_samples, setup: QuantSetup) -> str:
  """A tap's scheme: symmetric where the model marks it (signed taps), else setup.act_scheme."""
  return "symmetric" if bool(np.asarray(point_samples["symmetric"]).reshape(-1)[0]) else (
      setup.act_scheme)


def _is_point(x) -> bool:
  return isinstance(x, dict) and "samples" in x


def tap_schemes(samples: PyTree, setup: QuantSetup) -> dict[str, str]:
  """{'tap/path': its scheme} from calibration samples (collect_activation_samples)."""
  leaves = jax.tree_util.tree_leaves_with_path(samples, is_leaf=_is_point)
  return {"/".join(quant.path_names(path)): _tap_scheme(point, setup) for path, point in leaves}


def model_tap_schemes(model, setup: QuantSetup, image_shape: Sequence[int]) -> dict[str, str]:
  """{'tap/path': its scheme} of a model's folded forward, from one forward on zeros."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                                train=False))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["params"])
  folded = fold(params, jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                                     variables.get("batch_stats", {})))
  samples = _activation_samples(model.clone(folded=True, act_scheme=setup.act_scheme).apply,
                                {"params": folded}, jnp.zeros((1, *image_shape)))
  return tap_schemes(samples, setup)


def activation_ranges(samples: PyTree, bits: int, setup: QuantSetup) -> PyTree:
  """The `activation_ranges` collection: {point: {'min', 'max'}} by setup.calibration."""

  def point_range(point_samples):
    scheme = _tap_scheme(point_samples, setup)
    low, high = quant.calibrate_range(point_samples["samples"], setup.calibration, bits,
                                      scheme, setup.percentile)
    return {"min": jnp.float32(low), "max": jnp.float32(high)}

  return jax.tree.map(point_range, samples, is_leaf=_is_point)


def _capture_layer(model, params: PyTree, images: jax.Array, path: tuple[str, ...],
                   inputs: dict[tuple[str, ...], jax.Array] | None = None):
  """(input, output) of the module at `path` in the float-activation folded model; each module
  named in `inputs` (path -> array) is applied to its given input, not to what precedes it."""
  captured, inputs = {}, inputs or {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if context.module.path in inputs:
      args = (inputs[context.module.path], *args[1:])
    out = next_fun(*args, **kwargs)
    if context.module.path == path:
      captured["io"] = (args[0], out)
    return out

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, images, train=False)
  return captured["io"]


_capture_layer_jit = jax.jit(_capture_layer, static_argnums=(0, 3))


def _used_inputs(jaxpr) -> list[bool]:
  """Which of a jaxpr's inputs its outputs depend on, dead code removed: an equation with an
  effect or with any output used keeps all its inputs (inner jaxprs are not looked into, so
  this may keep more than needed, never less)."""
  live = {v for v in jaxpr.outvars if isinstance(v, jex.core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if isinstance(v, jex.core.Var))
  return [v in live for v in jaxpr.invars]


@functools.lru_cache(maxsize=8)
def _layer_reads(model, image_shape: tuple[int, ...], layers: tuple[tuple[str, ...], ...]
                 ) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """For each layer (in call order): the earlier layers whose inputs its output depends on when
  every earlier layer is applied to a given input (_capture_layer's `inputs`): the inputs that
  one forward per layer, to that layer, has to keep from the layers before it. Keeping more
  than needed costs only memory: an earlier layer left without its given input computes it
  from the layers before it, as in the whole model; a layer called more than once (shared
  weights) is never given one."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  calls, layer_inputs = collections.Counter(), {}

  def record_calls(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      calls[context.module.path] += 1
      layer_inputs[context.module.path] = jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_calls):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape),
                                               train=False))["params"]
  # A layer called more than once (shared weights) has no one input to keep: never given one.
  single = {layer for layer in layers if calls[layer] == 1}
  reads = []
  for i, layer in enumerate(layers):
    given = {earlier: layer_inputs[earlier] for earlier in layers[:i] if earlier in single}
    jaxpr = jax.make_jaxpr(lambda p, x, given, layer=layer: _capture_layer(
        model, p, x, layer, given)[1])(shapes, images, given).jaxpr
    used = _used_inputs(jaxpr)[len(jaxpr.invars) - len(given):]  # given's leaves come last
    reads.append(tuple(earlier for earlier, read in zip(sorted(given), used) if read))
  return tuple(reads)


def _layer_module(model, params: PyTree, images: jax.Array, path: tuple[str, ...]):
  """The module at `path`, unbound, to apply on its own."""
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path == path:
      found["module"] = context.module.clone(parent=None)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.apply({"params": params}, images[:1], train=False))
  return found["module"]


class SweepEvaluator:
  """Accuracy of a folded model's quantized variants, compiling each model variant once.

  Activations are calibrated on training batches; accuracy is measured on `split`.
  """

  def __init__(self, model, pipeline, mesh, setup: QuantSetup, batch_size: int,
               split: str = "test"):
    self._model, self._pipeline, self._mesh = model, pipeline, mesh
    self.setup, self._batch_size, self._split = setup, batch_size, split
    self._apply_fns = {}

  @functools.cached_property
  def kernel_order(self) -> list[str]:
    return kernel_call_order(self._model, self._pipeline.info.image_shape)

  def _calibration_batches(self) -> Iterator[dict[str, np.ndarray]]:
    return self._pipeline.eval_batches(self._batch_size, split="train",
                                       num_batches=self.setup.num_calibration_batches)

  def _apply_fn(self, act_bits: int | None) -> Callable:
    if act_bits not in self._apply_fns:
      self._apply_fns[act_bits] = self._model.clone(
          folded=True, act_bits=act_bits, act_scheme=self.setup.act_scheme).apply
    return self._apply_fns[act_bits]

  def with_setup(self, setup: QuantSetup) -> "SweepEvaluator":
    """This evaluator with another setup (its compiled model variants shared)."""
    other = copy.copy(self)
    other.setup = setup
    return other

  def calibration_batches(self) -> list[mixed.Batch]:
    """The calibration batches as (images, labels, mask), the same global set on every process."""
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return [(gather(batch["image"]), gather(batch["label"]), gather(batch["mask"]))
            for batch in parallel.prefetch_to_mesh(self._calibration_batches(), self._mesh)]

  def calibration_images(self) -> np.ndarray:
    """The calibration batches' images, the same global set on every process."""
    return np.concatenate([images for images, _, _ in self.calibration_batches()])

  def _layer_inputs(self, params: PyTree, images: np.ndarray, path: tuple[str, ...]
                    ) -> jax.Array:
    """The layer's input on images, in chunks of the eval batch."""
    model = self._model.clone(folded=True)
    return jnp.concatenate([
        _capture_layer_jit(model, params, images[i:i + self._batch_size], path)[0]
        for i in range(0, len(images), self._batch_size)])

  def quantized_weights(self, folded_params: PyTree, bits: int | None
                        ) -> tuple[PyTree, dict[str, float]]:
    """The folded params with kernels at `bits` (rules applied): rounded to nearest or by
    AdaRound, then bias-corrected, as the setup says; and the seconds each step took."""
    return self.quantized_weights_at(folded_params, [bits])[bits]

  def quantized_weights_at(self, folded_params: PyTree, bit_widths: Sequence[int | None]
                           ) -> dict[int | None, tuple[PyTree, dict[str, float]]]:
    """quantized_weights at each of bit_widths, the same numbers as one at a time: bias
    correction visits each layer once for all of them, so the float model's outputs of a
    layer are computed once rather than once per bit-width (that time counts in the first)."""
    bit_widths = list(dict.fromkeys(bit_widths))
    done = {bits: (self.setup.quantize_weights(folded_params, bits), {}) for bits in bit_widths}
    todo = [bits for bits in bit_widths if bits is not None]
    if not todo or not (self.setup.adaround or self.setup.bias_correction):
      return done
    images = self.calibration_images()
    layers = {bits: [(tuple(path.split("/")[:-1]), layer_bits) for path in self.kernel_order
                     if (layer_bits := quant.weight_bits_for(tuple(path.split("/")), bits,
                                                             self.setup.weight_rules)) is not None]
              for bits in todo}
    if self.setup.adaround:
      for bits in todo:
        qparams, times = done[bits]
        start = time.time()
        for layer, layer_bits in layers[bits]:
          qparams = self._adaround_layer(folded_params, qparams, images, layer, layer_bits)
        times["adaround_seconds"] = time.time() - start
        done[bits] = qparams, times
    if self.setup.bias_correction:
      self._correct_biases(folded_params, images, done,
                           {bits: {layer for layer, _ in layers[bits]} for bits in todo})
    return done

  def _correct_biases(self, folded_params: PyTree, images: np.ndarray,
                      done: dict[int, tuple[PyTree, dict[str, float]]],
                      corrected: dict[int, set[tuple[str, ...]]]) -> None:
    """Empirical bias correction of done's params (in place; for each bit-width, the layers in
    `corrected`), layer by layer in call order, each layer's on the outputs of the model whose
    earlier layers are already corrected. One pass per layer and model (the float model and
    each bit-width's), to that layer only: the earlier layers it reads (_layer_reads) are
    applied to their inputs kept from their own pass, with their corrected biases, so that a
    layer costs its own forward, not its prefix's, and gives the same numbers."""
    model = self._model.clone(folded=True)
    order = tuple(tuple(path.split("/")[:-1]) for path in self.kernel_order)
    reads = _layer_reads(model, tuple(images.shape[1:]), order)
    last_read = {earlier: i for i, needed in enumerate(reads) for earlier in needed}
    chunks = [images[i:i + self._batch_size] for i in range(0, len(images), self._batch_size)]
    widths = list(corrected)
    kept = {key: {} for key in ["float", *widths]}  # model -> layer -> its inputs, per chunk
    seconds = dict.fromkeys(widths, 0.0)

    def run(key: str | int, params: PyTree, i: int) -> jax.Array:
      """Layer i's outputs in one model (key: "float" or its bit-width), keeping its inputs
      where a later layer reads them."""
      outputs = []
      for c, chunk in enumerate(chunks):
        given = {earlier: kept[key][earlier][c] for earlier in reads[i]}
        layer_in, layer_out = _capture_layer_jit(model, params, chunk, order[i], given)
        if order[i] in last_read:
          kept[key].setdefault(order[i], []).append(layer_in)
        outputs.append(layer_out)
      return jnp.concatenate(outputs)

    for i, layer in enumerate(order):
      correcting = [bits for bits in widths if layer in corrected[bits]]
      passes = widths if layer in last_read else correcting  # each corrects or keeps inputs
      if passes:
        start = time.time()
        float_outputs = run("float", folded_params, i)
        seconds[widths[0]] += time.time() - start  # the float model's passes: the first width's
      for bits in passes:
        start = time.time()
        qparams, times = done[bits]
        outputs = run(bits, qparams, i)
        if bits in correcting:
          correction = rounding.bias_correction(float_outputs, outputs)
          bias_path = layer + ("bias",)
          done[bits] = (quant.replace_leaf(qparams, bias_path,
                                           quant.subtree(qparams, bias_path) - correction), times)
        seconds[bits] += time.time() - start
      for earlier in reads[i]:  # what no later layer reads
        if last_read[earlier] == i:
          for inputs in kept.values():
            del inputs[earlier]
    for bits in widths:
      done[bits][1]["bias_correction_seconds"] = seconds[bits]

  def _adaround_layer(self, folded_params: PyTree, qparams: PyTree, images: np.ndarray,
                      layer: tuple[str, ...], bits: int) -> PyTree:
    """qparams with the layer's kernel rounded by AdaRound, on its inputs in the model whose
    earlier layers are already quantized (float activations)."""
    images = images[:self.setup.adaround_examples]
    inputs = self._layer_inputs(qparams, images, layer)
    module = _layer_module(self._model.clone(folded=True), folded_params, images, layer)
    layer_params = quant.subtree(folded_params, layer)
    apply_layer = lambda kernel, x: module.apply({"params": {**layer_params, "kernel": kernel}}, x)
    result = rounding.adaround_layer(
        apply_layer, layer_params["kernel"], inputs, bits, scheme=self.setup.weight_scheme,
        per_channel=self.setup.per_channel, num_iterations=self.setup.adaround_iterations)
    return quant.replace_leaf(qparams, layer + ("kernel",), quant.dequantize(result.quantized))

  def calibration_samples(self, qparams: PyTree) -> PyTree:
    return collect_activation_samples(self._apply_fn(None), {"params": qparams},
                                      self._calibration_batches(), self._mesh)

  def activation_ranges(self, qparams: PyTree, act_bits: int,
                        samples: PyTree | None = None) -> PyTree:
    """Calibrated ranges of every tapped activation for weights qparams at act_bits."""
    if samples is None:
      samples = self.calibration_samples(qparams)
    return activation_ranges(samples, act_bits, self.setup)

  def accuracy(self, qparams: PyTree, act_bits: int | None, samples: PyTree | None = None,
               ranges: PyTree | None = None) -> float:
    """Accuracy with weights qparams and activations at act_bits, quantized with `ranges`
    (default: calibrated from `samples`, themselves collected when None)."""
    variables = {"params": qparams}
    if act_bits is not None:
      variables["activation_ranges"] = (self.activation_ranges(qparams, act_bits, samples)
                                        if ranges is None else ranges)
    return accuracy(self._apply_fn(act_bits), variables,
                    self._pipeline.eval_batches(self._batch_size, split=self._split), self._mesh)


def evaluate_bit_settings(evaluator: SweepEvaluator, folded_params: PyTree,
                          settings: Sequence[config_lib.BitSetting]) -> Iterator[Row]:
  """Yields the accuracy row of the folded model at each (weight_bits, act_bits) setting."""
  weights_by_bits = evaluator.quantized_weights_at(folded_params, [w for w, _ in settings])
  samples_by_bits = {}
  for weight_bits, act_bits in settings:
    qparams, times = weights_by_bits[weight_bits]
    if act_bits is not None and weight_bits not in samples_by_bits:
      samples_by_bits[weight_bits] = evaluator.calibration_samples(qparams)
    acc = evaluator.accuracy(qparams, act_bits, samples_by_bits.get(weight_bits))
    yield {"weight_bits": weight_bits, "act_bits": act_bits, "accuracy": acc, **times}


def layer_sensitivity(evaluator: SweepEvaluator, folded_params: PyTree, bits: int) -> Iterator[Row]:
  """Yields the accuracy with one kernel at a time quantized to `bits`, all else float."""
  for layer in quant.kernel_paths(folded_params):
    only_this = (quant.WeightRule(re.escape(layer), bits), quant.WeightRule(".*", None))
    qparams = quant.quantize_params(folded_params, bits, scheme=evaluator.setup.weight_scheme,
                                    per_channel=evaluator.setup.per_channel, rules=only_this)
    yield {"layer": layer, "weight_bits": bits, "accuracy": evaluator.accuracy(qparams, None)}


def _quantizer(setup: QuantSetup) -> mixed.Quantizer:
  """The setup's quantization of one kernel at a bit-width (scheme and granularity)."""
  channel_axis = -1 if setup.per_channel else None
  return lambda kernel, bits: quant.quantize_to_integers(kernel, bits, setup.weight_scheme,
                                                         channel_axis)


def layer_sensitivities(evaluator: SweepEvaluator, folded_params: PyTree, paths: Sequence[str],
                        name: str, bit_choices: Sequence[int], hutchinson_samples: int = 16,
                        hutchinson_batches: int | None = None) -> dict[str, dict[int, float]]:
  """Each kernel's sensitivity (qreg.mixed) by `name`, on the calibration batches (the first
  hutchinson_batches of them for 'hessian'; None: all) through the folded model with float
  activations, quantized as the evaluator's setup says."""
  batches = evaluator.calibration_batches()
  args = (evaluator._apply_fn(None), folded_params, batches, paths, bit_choices,
          _quantizer(evaluator.setup))
  if name == "measured":
    return mixed.measured_sensitivity(*args)
  if name == "bound":
    return mixed.bound_sensitivity(*args)
  if name == "hessian":
    return mixed.hessian_sensitivity(evaluator._apply_fn(None), folded_params,
                                     batches[:hutchinson_batches], paths, bit_choices,
                                     _quantizer(evaluator.setup), num_samples=hutchinson_samples)
  raise ValueError(f"Unknown sensitivity {name!r}; expected one of {mixed.SENSITIVITIES}.")


def _kernels_to_allocate(folded_params: PyTree, setup: QuantSetup):
  """(kernel sizes, the kernels the setup's rules fix with their bits, the free kernels)."""
  sizes = quant.kernel_sizes(folded_params)
  fixed = mixed.fixed_widths(sizes, setup.weight_rules)
  return sizes, fixed, [path for path in sizes if path not in fixed]


def allocate_budget(evaluator: SweepEvaluator, folded_params: PyTree,
                    quant_config: ml_collections.ConfigDict, budget: float, sensitivity: str
                    ) -> dict[str, int | None]:
  """Bits per kernel for one budget, on `sensitivity` measured here (as mixed_precision does)."""
  sizes, fixed, free = _kernels_to_allocate(folded_params, evaluator.setup)
  values = layer_sensitivities(evaluator, folded_params, free, sensitivity,
                               sorted(quant_config.bit_choices), quant_config.hutchinson_samples,
                               quant_config.hutchinson_batches)
  return mixed.allocate(values, sizes, budget, fixed=fixed, method=quant_config.budget_allocation)


def mixed_precision(evaluator: SweepEvaluator, folded_params: PyTree,
                    quant_config: ml_collections.ConfigDict) -> Iterator[tuple[str, Row]]:
  """Mixed precision at each of quant.bit_budgets: yields ('layer_sensitivities', row) per
  sensitivity (its values and seconds), then ('mixed', row) per budget and sensitivity: the
  allocated bits per kernel (kernels the rules fix keep their bits) and the accuracy with
  activations at quant.budget_act_bits, through the setup's whole protocol."""
  bit_choices = sorted(quant_config.bit_choices)
  sizes, fixed, free = _kernels_to_allocate(folded_params, evaluator.setup)
  sensitivities, seconds = {}, {}
  for name in quant_config.budget_sensitivities:
    start = time.time()
    sensitivities[name] = layer_sensitivities(evaluator, folded_params, free, name, bit_choices,
                                              quant_config.hutchinson_samples,
                                              quant_config.hutchinson_batches)
    seconds[name] = time.time() - start
    yield "layer_sensitivities", {
        "sensitivity": name, "seconds": seconds[name], "bit_choices": bit_choices,
        "values": {path: [values[bits] for bits in bit_choices]
                   for path, values in sensitivities[name].items()}}
  act_bits = quant_config.budget_act_bits
  for budget in quant_config.bit_budgets:
    for name in quant_config.budget_sensitivities:
      widths = mixed.allocate(sensitivities[name], sizes, budget, fixed=fixed,
                              method=quant_config.budget_allocation)
      allocated = evaluator.with_setup(dataclasses.replace(
          evaluator.setup, weight_rules=mixed.width_rules(widths)))
      qparams, times = allocated.quantized_weights(folded_params, max(bit_choices))
      yield "mixed", {"bit_budget": float(budget), "sensitivity": name,
                      "allocation": quant_config.budget_allocation,
                      "average_bits": quant.bit_budget(widths, sizes), "act_bits": act_bits,
                      "accuracy": allocated.accuracy(qparams, act_bits), "layer_bits": widths,
                      "sensitivity_seconds": seconds[name], **times}


def sweep(config: ml_collections.ConfigDict, setup: QuantSetup, model, params: PyTree,
          batch_stats: PyTree, pipeline, mesh) -> Iterator[tuple[str, Row]]:
  """The sweep of config.quant (its setup: sweep_setup) on one trained model: yields
  ('rows', row) for each bit setting, then ('sensitivity', row) for each layer when
  quant.sensitivity_bits is set, then mixed_precision's rows when quant.bit_budgets is set."""
  model, folded_params = prepare_folded(setup, model, params, batch_stats)
  evaluator = SweepEvaluator(model, pipeline, mesh, setup, config.eval.batch_size,
                             config.eval.split)
  for row in evaluate_bit_settings(evaluator, folded_params,
                                   config_lib.parse_bit_settings(config.quant.bit_settings)):
    yield "rows", row
  if config.quant.sensitivity_bits is not None:
    for row in layer_sensitivity(evaluator, folded_params, config.quant.sensitivity_bits):
      yield "sensitivity", row
  if config.quant.bit_budgets:
    yield from mixed_precision(evaluator, folded_params, config.quant)
