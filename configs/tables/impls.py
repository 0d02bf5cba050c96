"""The l1 regularizer of the offline default computed three ways (reg.impl), 3 seeds.

`hvp` is exact (equal to `nested` in tests); `finite_difference` approximates
the penalty's gradient with two gradient evaluations. This compares their
post-training-quantization accuracy.

    python -m experiments.run_sweep --config=configs/tables/impls.py --workdir=<dir>

Each run warm-starts from <dir>/no-reg/seed<s> (the table's no-reg runs: link or
copy them there, or let the sweep train them).
"""
from configs import fashion_mnist
from configs.tables import methods


def get_config(arg=None):
  del arg
  return methods.paper_table(fashion_mnist.get_config)[0]()


def sweep(arg=None):
  del arg
  runs = []
  for seed in (0, 1, 2):
    runs.append({"name": f"no-reg/seed{seed}", "labels": {"method": "no-reg", "seed": seed},
                 "overrides": {**methods.NO_PENALTY, "seed": seed}})
    for impl in ("hvp", "nested", "finite_difference"):
      runs.append({"name": f"l1-{impl}/seed{seed}", "labels": {"method": f"l1 ({impl})", "seed": seed},
                   "overrides": {"reg.impl": impl, "seed": seed},
                   "warm_start": f"no-reg/seed{seed}"})
  return runs
