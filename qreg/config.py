"""A run's configuration: the defaults every config file starts from, and their validation.

`validate` checks every field once, here, before anything is written to a
workdir, so that a mistyped value costs no work and the code that builds
from a config can trust it. Checks that need the data (a batch larger than
the training set) are made where the data is read, in qreg.data.
"""
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from qreg import bound, data, mixed, models, objectives, parallel, quant

# (weight_bits, act_bits); None = float. A tuple, so that the command line can override it:
# --config.quant.bit_settings='((4,4),(2,8))'.
DEFAULT_BIT_SETTINGS = ((None, None), (8, 8), (6, 6), (5, 5), (4, 4), (4, None), (None, 4), (3, 3))
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
BitSetting = tuple[int | None, int | None]


def base_config() -> ml_collections.ConfigDict:
  """The defaults shared by every config file; each overrides what differs."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.source = "tfds"  # 'tfds' or 'idx' (original IDX files; MNIST-like datasets only)
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.download = False  # never fetch data unless asked
  config.data.batch_size = 128  # global, over all devices and processes
  config.data.image_size = 224  # ImageNet crop size; ignored by the 28x28 / 32x32 datasets
  config.data.shuffle_buffer = 10_000  # TFDS only; in-memory data is shuffled whole
  # Examples held out from the end of the train split as the 'validation' split, for
  # choosing hyperparameters (0: none; training never sees them).
  config.data.validation_size = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"
  config.model.stem = "cifar"  # resnet18: 'cifar'/'imagenet'; mobilenetv2 also 'stride16'
  # Channel multiplier (and VGG's hidden FC width); 1.0 = the published architectures.
  config.model.width = 1.0
  # The dtype training computes in: 'float32', or 'bfloat16' for GPUs and TPUs (params,
  # optimizer state and BatchNorm statistics stay float32; the PTQ sweep computes in float32).
  config.model.dtype = "float32"

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"
  config.optim.learning_rate = 0.05
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 0

  # Gradient-l1 penalty: lambda_w on conv/dense kernels, lambda_a on tapped
  # activations, applied from epoch start_epoch on (0 = from the start).
  config.reg = ml_collections.ConfigDict()
  config.reg.lambda_w = 0.0
  config.reg.lambda_a = 0.0
  config.reg.start_epoch = 0
  config.reg.norm = "l1"  # 'l2': the paper's ablation, sum of per-layer l2 norms
  # KURE (Shkolnik et al. 2020): lambda * mean_l (kurtosis(W_l) - 1.8)^2, from start_epoch on.
  config.reg.lambda_kurtosis = 0.0
  # How the penalty's gradient is computed: 'hvp' (exact, forward-over-reverse),
  # 'nested' (exact, double backprop, the slow reference) or 'finite_difference'
  # (two gradient evaluations; fd_step = largest displacement of a weight or
  # activation, see qreg.objectives.FD_STEP). docs/cost.md.
  config.reg.impl = "hvp"
  config.reg.fd_step = 1e-3
  # Cheaper schedules (docs/cost.md): the penalty on one step in
  # every_k_steps with its lambdas times k (the same average weight), plain steps between;
  # and on the first penalty_batch_fraction of each device's batch (the task loss on all of it).
  config.reg.every_k_steps = 1
  config.reg.penalty_batch_fraction = 1.0
  # What the penalty measures (qreg.bound, docs/configuration.md): 'uniform' (the paper's raw
  # gradient norms), 'bound' (the first-order bound of the quantizer at bound_bits on the folded
  # network: each kernel channel's and tap's own step times its gradient's l1 norm), or
  # 'layer_bound' (the same steps on the unfolded, train-mode network). bound_steps:
  # 'stop_gradient' (the steps are constants) or 'differentiated'.
  config.reg.form = "uniform"
  config.reg.bound_bits = 4
  config.reg.bound_steps = "stop_gradient"

  # Quantization-aware training with the straight-through estimator from reg.start_epoch
  # on, at these bit-widths (None = float); the STE baseline.
  config.qat = ml_collections.ConfigDict()
  config.qat.weight_bits = ml_collections.FieldReference(None, field_type=int)
  config.qat.act_bits = ml_collections.FieldReference(None, field_type=int)
  # Multi-bit QAT (Any-Precision DNN, Yu et al. 2021): each step at W = A = b for bits_per_step
  # widths b drawn from bit_set (a function of the step), one BatchNorm shared by all; () = off.
  config.qat.bit_set = ()
  config.qat.bits_per_step = 1

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 10
  config.train.log_every_steps = 100
  # Also log every kernel's and BatchNorm scale's L2 norm (norms/...) at each log window.
  config.train.log_norms = False
  # Checkpoints are saved at each epoch end, on SIGTERM/SIGINT and, when > 0, every this many steps.
  config.train.checkpoint_every_steps = 0
  # At least 2, so that a damaged latest checkpoint leaves an earlier one to resume from.
  config.train.checkpoints_to_keep = 3

  config.quant = ml_collections.ConfigDict()
  config.quant.bit_settings = DEFAULT_BIT_SETTINGS
  config.quant.weight_scheme = "symmetric"  # or 'asymmetric'
  config.quant.per_channel = False  # per-tensor weight scales by default
  # "REGEX=BITS" rules on kernel paths, matched in full, first match wins, e.g.
  # ("conv1/.*=8", "head/.*=float") keeps the first layer at 8 bits and the last in float;
  # unmatched kernels get the sweep's bits, and a rule that matches no kernel is an error.
  config.quant.weight_rules = ()
  config.quant.act_scheme = "asymmetric"  # or 'symmetric' (for signed activations)
  config.quant.calibration = "minmax"  # 'minmax', 'percentile' or 'mse'
  config.quant.percentile = 99.99  # for calibration='percentile'
  config.quant.num_calibration_batches = 10
  # When set, also report accuracy with one layer at a time quantized to this many bits.
  config.quant.sensitivity_bits = ml_collections.FieldReference(None, field_type=int)
  # The strong protocol's steps (docs/quantization.md, "Protocols"; configs/tables/protocols.py names the
  # presets): the first and last kernel (in call order) at these bits, empirical bias
  # correction on the calibration batches, AdaRound (Nagel et al. 2020) per layer.
  config.quant.first_last_bits = ml_collections.FieldReference(None, field_type=int)
  config.quant.bias_correction = False
  config.quant.adaround = False
  config.quant.adaround_iterations = 1000
  config.quant.adaround_examples = 1024  # calibration images AdaRound reconstructs on
  # Data-free steps on the folded model before quantizing (Nagel et al. 2019; qreg.equalize):
  # cross-layer equalization of consecutive layers (MobileNetV2 then runs with ReLU in place of
  # ReLU6), and bias absorption into the next layer where it is exact.
  config.quant.cross_layer_equalization = False
  config.quant.bias_absorption = False
  # Mixed precision (qreg.mixed): per-kernel weight bits from bit_choices meeting each average
  # bits-per-weight budget (kernels a rule fixes keep their bits), allocated by
  # budget_allocation ('knapsack', exact, or 'greedy') on each of budget_sensitivities
  # ('measured', 'bound', 'hessian'), activations at budget_act_bits; () = none.
  config.quant.bit_budgets = ()
  config.quant.bit_choices = (2, 3, 4, 5, 6, 8)
  config.quant.budget_sensitivities = ("bound",)
  config.quant.budget_allocation = "knapsack"
  config.quant.budget_act_bits = ml_collections.FieldReference(8, field_type=int)
  # The 'hessian' sensitivity's Hutchinson estimate: Rademacher vectors per kernel, on the first
  # this many calibration batches.
  config.quant.hutchinson_samples = 16
  config.quant.hutchinson_batches = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500
  # Where the sweep measures accuracy: 'test', or 'validation' (data.validation_size > 0)
  # while choosing hyperparameters.
  config.eval.split = "test"
  return config


def field(config: ml_collections.ConfigDict | dict, name: str):
  """The value of a dotted field such as 'model.name' (None where a section or key is missing)."""
  section, key = name.split(".")
  return config.get(section, {}).get(key)


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of config with each dotted field ("quant.per_channel", "seed") set to its value.

  Only existing fields can be set, so that a mistyped name fails instead of adding a field
  nothing reads. JSON's lists become tuples (bit_settings: tuples of pairs).
  """
  config = copy.deepcopy(config)
  for name, value in overrides.items():
    *sections, key = name.split(".")
    node = config
    for section in sections:
      node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if (not isinstance(node, ml_collections.ConfigDict) or key not in node
        or isinstance(node[key], ml_collections.ConfigDict)):
      raise ValueError(f"unknown config field {name!r}.")
    if key == "bit_settings":
      value = tuple(map(tuple, value))
    try:
      node[key] = value
    except TypeError as e:
      raise ValueError(f"config field {name!r}: {e}") from e
  return config


def parse_bit_settings(settings: Sequence) -> list[BitSetting]:
  """config.quant.bit_settings as (weight_bits, act_bits) pairs, None = float."""
  parsed = []
  for setting in settings:
    if not isinstance(setting, (tuple, list)) or len(setting) != 2:
      raise ValueError(f"quant.bit_settings entry {setting!r} must be (weight_bits, act_bits).")
    weight_bits, act_bits = setting
    quant.check_bits(weight_bits, "weight_bits")
    quant.check_bits(act_bits, "act_bits")
    parsed.append((weight_bits, act_bits))
  return parsed


def _check_integer(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def _check_number(name: str, value, *, positive: bool) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < 0 or (positive and value == 0):
    raise ValueError(f"{name}={value!r} must be a finite number {'>' if positive else '>='} 0.")


def _check_choice(name: str, value, choices: Sequence[str], what: str | None = None) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {what or name} {value!r}; expected one of {tuple(choices)}.")


def _check_multibit_qat(config: ml_collections.ConfigDict) -> None:
  bit_set = tuple(config.qat.bit_set)
  for bits in bit_set:
    quant.check_bits(bits, "qat.bit_set entry")
    if bits is None:
      raise ValueError("qat.bit_set entries are bit-widths; None (float) is not one.")
  if len(set(bit_set)) != len(bit_set):
    raise ValueError(f"qat.bit_set={bit_set}: each bit-width once.")
  if not bit_set:
    return
  _check_integer("qat.bits_per_step", config.qat.bits_per_step, 1)
  if config.qat.bits_per_step > len(bit_set):
    raise ValueError(f"qat.bits_per_step={config.qat.bits_per_step} exceeds the "
                     f"{len(bit_set)} widths of qat.bit_set.")
  others = {"qat.weight_bits": config.qat.weight_bits is not None,
            "qat.act_bits": config.qat.act_bits is not None,
            "reg.lambda_w": config.reg.lambda_w != 0, "reg.lambda_a": config.reg.lambda_a != 0,
            "reg.lambda_kurtosis": config.reg.lambda_kurtosis != 0}
  if any(others.values()):
    raise ValueError(f"qat.bit_set (multi-bit QAT) is a method of its own; unset "
                     f"{', '.join(name for name, on in others.items() if on)}.")


def _check_bound_form(config: ml_collections.ConfigDict) -> None:
  _check_choice("reg.form", config.reg.form, bound.FORMS)
  if config.reg.form == "uniform":
    return
  _check_choice("reg.bound_steps", config.reg.bound_steps, bound.STEP_MODES)
  quant.check_bits(config.reg.bound_bits, "reg.bound_bits")
  if config.reg.bound_bits is None:
    raise ValueError(f"reg.form={config.reg.form!r} needs reg.bound_bits, the bit-width whose "
                     "steps it weights the gradients with.")
  if config.reg.norm != "l1":
    raise ValueError(f"reg.form={config.reg.form!r} is an l1 bound; reg.norm="
                     f"{config.reg.norm!r} applies to the uniform form only.")
  if config.quant.weight_scheme != "symmetric":
    raise ValueError(f"reg.form={config.reg.form!r} takes the steps of a symmetric absmax weight "
                     f"quantizer; quant.weight_scheme={config.quant.weight_scheme!r} is not "
                     "supported.")
  if config.qat.weight_bits is not None or config.qat.act_bits is not None:
    raise ValueError(f"reg.form={config.reg.form!r} with STE QAT (qat.weight_bits/act_bits) is "
                     "not supported: the bound is taken on the float network.")


def _check_mixed_precision(quant_config: ml_collections.ConfigDict) -> None:
  choices = tuple(quant_config.bit_choices)
  if not choices:
    raise ValueError("quant.bit_choices is empty: mixed precision needs bit-widths to choose from.")
  for bits in choices:
    quant.check_bits(bits, "quant.bit_choices entry")
    if bits is None:
      raise ValueError("quant.bit_choices entries are bit-widths; None (float) is not one.")
  for budget in quant_config.bit_budgets:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
        or not min(choices) <= budget <= quant.MAX_BITS:
      raise ValueError(f"quant.bit_budgets entry {budget!r} must be a number of bits per weight "
                       f"in [{min(choices)}, {quant.MAX_BITS}] (min(quant.bit_choices) to the most).")
  sensitivities = tuple(quant_config.budget_sensitivities)
  if quant_config.bit_budgets and not sensitivities:
    raise ValueError("quant.bit_budgets needs at least one of quant.budget_sensitivities "
                     f"{mixed.SENSITIVITIES}.")
  for name in sensitivities:
    _check_choice("quant.budget_sensitivities entry", name, mixed.SENSITIVITIES, "sensitivity")
  _check_choice("quant.budget_allocation", quant_config.budget_allocation, mixed.ALLOCATIONS,
                "allocation")
  quant.check_bits(quant_config.budget_act_bits, "quant.budget_act_bits")
  _check_integer("quant.hutchinson_samples", quant_config.hutchinson_samples, 1)
  _check_integer("quant.hutchinson_batches", quant_config.hutchinson_batches, 1)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError naming the first field whose value cannot work.

  Covers every field the training loop, the penalty, the optimizer, the
  models, the data sources and the quantization sweep read.
  """
  data.check_config(config.data)
  parallel.check_batch_size(config.data.batch_size, num_devices, "data.batch_size")
  parallel.check_batch_size(config.eval.batch_size, num_devices, "eval.batch_size")

  _check_choice("model.name", config.model.name, models.MODELS, "model")
  if config.model.name in models.STEMS:
    _check_choice("model.stem", config.model.stem, models.STEMS[config.model.name])
  _check_number("model.width", config.model.width, positive=True)
  _check_choice("model.dtype", config.model.dtype, tuple(models.DTYPES))

  _check_choice("optim.name", config.optim.name, OPTIMIZERS)
  _check_choice("optim.schedule", config.optim.schedule, SCHEDULES)
  _check_number("optim.learning_rate", config.optim.learning_rate, positive=True)
  for name in ("momentum", "weight_decay", "warmup_epochs"):
    _check_number(f"optim.{name}", config.optim[name], positive=False)

  for name in ("lambda_w", "lambda_a", "lambda_kurtosis"):
    _check_number(f"reg.{name}", config.reg[name], positive=False)
  _check_choice("reg.impl", config.reg.impl, objectives.IMPLS)
  _check_choice("reg.norm", config.reg.norm, objectives.NORMS)
  _check_number("reg.fd_step", config.reg.fd_step, positive=True)
  _check_integer("reg.every_k_steps", config.reg.every_k_steps, 1)
  parallel.check_batch_fraction(config.reg.penalty_batch_fraction, config.data.batch_size,
                                num_devices, "reg.penalty_batch_fraction")
  quant.check_bits(config.qat.weight_bits, "qat.weight_bits")
  quant.check_bits(config.qat.act_bits, "qat.act_bits")
  _check_multibit_qat(config)
  _check_bound_form(config)

  for name, minimum in (("train.num_epochs", 1), ("train.log_every_steps", 1),
                        ("train.checkpoint_every_steps", 0), ("train.checkpoints_to_keep", 2),
                        ("reg.start_epoch", 0), ("quant.num_calibration_batches", 1),
                        ("quant.adaround_iterations", 0), ("quant.adaround_examples", 1)):
    _check_integer(name, field(config, name), minimum)

  parse_bit_settings(config.quant.bit_settings)
  quant.check_scheme(config.quant.weight_scheme, "quant.weight_scheme")
  quant.check_scheme(config.quant.act_scheme, "quant.act_scheme")
  if config.quant.calibration not in quant.CALIBRATION_METHODS:
    raise ValueError(f"quant.calibration={config.quant.calibration!r}: expected one of "
                     f"{quant.CALIBRATION_METHODS}.")
  quant.check_percentile(config.quant.percentile, "quant.percentile")
  quant.parse_weight_rules(config.quant.weight_rules)
  quant.check_bits(config.quant.sensitivity_bits, "quant.sensitivity_bits")
  quant.check_bits(config.quant.first_last_bits, "quant.first_last_bits")
  _check_mixed_precision(config.quant)
  _check_choice("eval.split", config.eval.split, ("test", "validation"))
  if config.eval.split == "validation" and not config.data.validation_size:
    raise ValueError("eval.split='validation' needs data.validation_size > 0.")

  if (config.reg.start_epoch >= config.train.num_epochs
      and (config.reg.lambda_w != 0 or config.reg.lambda_a != 0)):
    logging.warning("reg.start_epoch=%d >= train.num_epochs=%d: the regularizer never runs.",
                    config.reg.start_epoch, config.train.num_epochs)
