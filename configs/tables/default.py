"""The offline default run and its unregularized twin, seed 0: README's default-run table (experiments/results/default_comparison).

    python -m experiments.study default_comparison

l1 is `make train` (configs/fashion_mnist.py); no_reg is the same config with lambda = 0,
trained from scratch as a user would.
"""
from configs import fashion_mnist


def get_config(arg=None):
  del arg
  return fashion_mnist.get_config()


def sweep(arg=None):
  del arg
  return [{"name": "l1", "overrides": {}},
          {"name": "no_reg", "overrides": {"reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}]
