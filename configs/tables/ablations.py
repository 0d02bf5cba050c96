"""Ablations of the l1 regularizer on the offline default, 3 seeds:

- lambda: the default (lambda_w, lambda_a) scaled by 0.3, 1, 3;
- terms: weights only, activations only, both;
- schedule: regularize the last epoch (fine-tuning after 3 plain epochs, as the
  paper did on ImageNet) vs from the start of all 4 epochs.

    python -m experiments.study ablations --workdir=workdirs/studies

Runs that regularize only the last epoch warm-start from the seed's plain run.
"""
from configs import fashion_mnist
from configs.tables import methods


def get_config(arg=None):
  del arg
  return methods.paper_table(fashion_mnist.get_config)[0]()


def sweep(arg=None):
  config = get_config(arg)
  lambda_w, lambda_a = config.reg.lambda_w, config.reg.lambda_a
  variants = {
      "no-reg": dict(methods.NO_PENALTY),
      "l1 x0.3": {"reg.lambda_w": 0.3 * lambda_w, "reg.lambda_a": 0.3 * lambda_a},
      "l1 (default)": {},
      "l1 x3": {"reg.lambda_w": 3 * lambda_w, "reg.lambda_a": 3 * lambda_a},
      "l1 weights only": {"reg.lambda_a": 0.0},
      "l1 activations only": {"reg.lambda_w": 0.0},
      "l1 from the start": {"reg.start_epoch": 0},
  }
  runs = []
  for seed in (0, 1, 2):
    for name, overrides in variants.items():
      from_start = overrides.get("reg.start_epoch") == 0
      runs.append({"name": f"{name.replace(' ', '_')}/seed{seed}",
                   "labels": {"method": name, "seed": seed},
                   "overrides": {**overrides, "seed": seed},
                   "warm_start": None if name == "no-reg" or from_start else f"no-reg/seed{seed}"})
  return runs
