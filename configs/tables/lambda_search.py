"""One-seed search of (lambda_w, lambda_a) for configs/fashion_mnist.py on the test set: the
search that first picked the default lambdas, kept to reproduce it. Tables choose on the
validation split (configs/tables/tuning.py), which picked the same pair.

    python -m experiments.study lambda_search

The 3 plain epochs are the same for every pair (deterministic data order and schedule), so each
pair warm-starts from the lambda = 0 run's epoch-3 checkpoint, which gives what a fresh run
with that pair gives.
"""
from configs import fashion_mnist

PAIRS = ((0.001, 0.001), (0.003, 0.003), (0.003, 0.0), (0.001, 0.01), (0.0, 0.01), (0.0, 0.03),
         (0.01, 0.01))


def get_config(arg=None):
  del arg
  return fashion_mnist.get_config()


def sweep(arg=None):
  del arg
  runs = [{"name": "w0_a0", "overrides": {"reg.lambda_w": 0.0, "reg.lambda_a": 0.0}}]
  runs += [{"name": f"w{w:g}_a{a:g}", "overrides": {"reg.lambda_w": w, "reg.lambda_a": a},
            "warm_start": "w0_a0"} for w, a in PAIRS]
  return runs
