"""The rows of the paper-style tables: one set of config overrides per method.

Every method acts from reg.start_epoch on (the whole run when it is 0), on
the same model, data and quantizer, so rows differ only in the training
objective:
- no-reg: plain training;
- l2: the paper's ablation, sum_l ||dL/dW_l||_2 + ||dL/da_l||_2 instead of l1;
- l1: the gradient-l1 regularizer (Alizadeh et al. 2020);
- ste-qat@4: quantization-aware training at 4-bit weights and activations with
  the straight-through estimator, the paper's main comparison;
- kure: KURE (Shkolnik et al. 2020), lambda * mean_l (kurtosis(W_l) - 1.8)^2.
"""
TABLE_BIT_SETTINGS = [(None, None), (8, 8), (6, 6), (4, 4), (3, 3)]
# l1 norms exceed per-layer l2 norms by about sqrt(layer size). On the small CNN, at the default
# run's epoch-3 checkpoint (5 training batches), the logged l1 norms were 170x (weights) and 157x
# (activations) the summed per-layer l2 norms, so both penalties start the regularized epoch at
# about the same value. The ratio is larger for wider nets: measure the logged grad_l1_* /
# grad_l2_* of an l2 run at your model before comparing rows.
DEFAULT_L2_SCALE = 160.0
NO_PENALTY = {"reg.lambda_w": 0.0, "reg.lambda_a": 0.0}


def methods(lambda_w: float, lambda_a: float, l2_scale: float, kure_lambda: float = 1.0):
  """name -> overrides. l2_scale multiplies the l1 lambdas for the l2 row, whose norms are
  much smaller than l1 norms of the same gradients (by about the square root of a layer's size)."""
  return {
      "no-reg": dict(NO_PENALTY),
      "l2": {"reg.norm": "l2", "reg.lambda_w": lambda_w * l2_scale,
             "reg.lambda_a": lambda_a * l2_scale},
      "l1": {"reg.norm": "l1", "reg.lambda_w": lambda_w, "reg.lambda_a": lambda_a},
      "ste-qat@4": {**NO_PENALTY, "qat.weight_bits": 4, "qat.act_bits": 4},
      "kure": {**NO_PENALTY, "reg.lambda_kurtosis": kure_lambda},
  }


def table_sweep(method_overrides: dict, seeds=(0, 1, 2)) -> list[dict]:
  """Each method at each seed; a method's runs warm-start from no-reg's run of the same seed,
  which shares their first reg.start_epoch epochs exactly."""
  return [{"name": f"{method}/seed{seed}",
           "labels": {"method": method, "seed": seed},
           "overrides": {**overrides, "seed": seed},
           "warm_start": None if method == "no-reg" else f"no-reg/seed{seed}"}
          for seed in seeds for method, overrides in method_overrides.items()]


def paper_table(base_get_config, l2_scale: float = DEFAULT_L2_SCALE):
  """(get_config, sweep) of the paper's table on a base config: its model, data and lambdas,
  the table's bit settings, every method at seeds 0-2."""

  def get_config():
    config = base_get_config()
    config.quant.bit_settings = TABLE_BIT_SETTINGS
    return config

  def sweep():
    config = get_config()
    return table_sweep(methods(config.reg.lambda_w, config.reg.lambda_a, l2_scale))

  return get_config, sweep
