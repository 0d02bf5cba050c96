"""The paper's ablations of the l1 regularizer under the fair protocol (issue 22), 3 seeds, the
test set, at the l1 lambdas chosen on the validation split (the network's tuning):

- terms: weights only (lambda_a = 0), activations only (lambda_w = 0), both;
- schedule: the last epoch (fine-tuning after 3 plain epochs, the tables' setting and the paper's
  on ImageNet) vs from the start of all 4 epochs.

    python -m experiments.study ablations --net=small_cnn      (or vgg)

Same data and runs as the tuned table (configs/tables/tuned.py): "l1 both, last epoch" and the
no-reg runs are its runs, linked in by experiments.study. Runs that act in the last epoch
warm-start from the seed's no-reg run; "from the start" trains all 4 epochs regularized. The
lambda sensitivity is the trade-off curves' (configs/tables/tradeoff.py).
"""
from configs.tables import common, methods, tuned

REFERENCE = "l1 both, last epoch"
FROM_THE_START = "l1 both, from the start"  # also the drift study's uniform run (drift.py)


def get_config(arg=None):
  return tuned.get_config(f"net={common.parse_arg(arg, net='small_cnn').net}")


def variants(l1: dict) -> dict[str, dict]:
  """name -> overrides, from the l1 choice's overrides."""
  return {
      "no-reg": dict(methods.NO_PENALTY),
      REFERENCE: dict(l1),
      "l1 weights only": {**l1, "reg.lambda_a": 0.0},
      "l1 activations only": {**l1, "reg.lambda_w": 0.0},
      FROM_THE_START: {**l1, "reg.start_epoch": 0},
  }


def sweep(arg=None, *, choices):
  common.parse_arg(arg, net="small_cnn")
  if "l1" not in choices:
    raise ValueError("the ablations need the tuning's l1 choice: choices={'l1': overrides}.")
  runs = methods.table_sweep(variants(choices["l1"]), tuned.SEEDS)
  for run in runs:
    method, seed = run["labels"]["method"], run["labels"]["seed"]
    run["name"] = f"{method.replace(',', '').replace(' ', '_')}/seed{seed}"
    if run["overrides"].get("reg.start_epoch") == 0:
      run["warm_start"] = None  # trains every epoch itself
  return runs
