"""Defaults shared by every qreg config; each config file overrides what differs."""
import ml_collections

# (weight_bits, act_bits); None = float. Issue #2's default sweep.
DEFAULT_BIT_SETTINGS = [(None, None), (8, 8), (6, 6), (5, 5), (4, 4), (4, None), (None, 4), (3, 3)]


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.source = "tfds"  # 'tfds' or 'idx' (original IDX files; MNIST-like datasets only)
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.download = False  # never fetch data unless asked
  config.data.batch_size = 128  # global, over all devices and processes
  config.data.image_size = 224  # ImageNet crop size; ignored by the 28x28 / 32x32 datasets
  config.data.shuffle_buffer = 10_000

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"
  config.model.stem = "cifar"  # resnet18 only: 'cifar' or 'imagenet'
  # Channel multiplier (and VGG's hidden FC width); 1.0 = the published architectures.
  # mobilenetv2 rounds to multiples of 8 and widens its last conv only above 1.0.
  config.model.width = 1.0

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
  # How the penalty's gradient is computed: 'hvp' (exact, forward-over-reverse),
  # 'nested' (exact, double backprop, the slow reference) or 'finite_difference'
  # (two gradient evaluations; fd_step = largest displacement of a weight or
  # activation, see qreg.objectives.FD_STEP). README "Cost of the regularizer".
  config.reg.norm = "l1"  # 'l2': the paper's ablation, sum of per-layer l2 norms
  # KURE (Shkolnik et al. 2020): lambda * mean_l (kurtosis(W_l) - 1.8)^2, from start_epoch on.
  config.reg.lambda_kurtosis = 0.0
  config.reg.impl = "hvp"
  config.reg.fd_step = 1e-3

  # Quantization-aware training with the straight-through estimator from reg.start_epoch
  # on, at these bit-widths (None = float); the STE baseline.
  config.qat = ml_collections.ConfigDict()
  config.qat.weight_bits = ml_collections.FieldReference(None, field_type=int)
  config.qat.act_bits = ml_collections.FieldReference(None, field_type=int)

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 10
  config.train.log_every_steps = 100
  # Checkpoints are saved at each epoch end, on SIGTERM and, when > 0, every this many steps.
  config.train.checkpoint_every_steps = 0
  # At least 2, so that a damaged latest checkpoint leaves an earlier one to resume from.
  config.train.checkpoints_to_keep = 3

  config.quant = ml_collections.ConfigDict()
  config.quant.bit_settings = DEFAULT_BIT_SETTINGS
  config.quant.weight_scheme = "symmetric"  # or 'asymmetric'
  config.quant.per_channel = False  # per-tensor weight scales by default
  # "REGEX=BITS" rules on kernel paths, first match wins, e.g. ("^conv1/=8", "^head/=float")
  # keeps the first layer at 8 bits and the last in float; unmatched kernels get the sweep's bits.
  config.quant.weight_rules = ()
  config.quant.act_scheme = "asymmetric"  # or 'symmetric' (for signed activations)
  config.quant.calibration = "minmax"  # 'minmax', 'percentile' or 'mse'
  config.quant.percentile = 99.99  # for calibration='percentile'
  config.quant.num_calibration_batches = 10
  # When set, also report accuracy with one layer at a time quantized to this many bits.
  config.quant.sensitivity_bits = ml_collections.FieldReference(None, field_type=int)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500
  return config
