"""Drift along BatchNorm's free directions under the bound-aware penalty (issue 23, point 1),
beside the uniform penalty's ablation runs:

    python -m experiments.study drift --net=small_cnn      (or vgg; after bound_penalty)

The uniform penalty can fall by growing kernels and BatchNorm scales, which changes neither the
function nor the quantized model; the bound form is invariant to both. These runs train the
bound form (its validation choice, qreg.bound's `bound` with stop-gradient steps) through all 4
epochs from the start, with train.log_norms for its trajectory, 3 seeds, the tuned table's data.
experiments.drift then compares them, and the bound table's last-epoch runs, with the ablations'
"l1 both, from the start" and the tuned table's l1 runs, each against its seed's no-reg run
(the tuned table's, linked in).
"""
from configs.tables import common, methods, tuned

BOUND_FROM_THE_START = "bound, from the start"


def get_config(arg=None):
  return tuned.get_config(f"net={common.parse_arg(arg, net='small_cnn').net}")


def sweep(arg=None, *, choices):
  common.parse_arg(arg, net="small_cnn")
  if "bound" not in choices:
    raise ValueError("the drift runs need the bound tuning's choice: choices={'bound': overrides}.")
  variants = {"no-reg": dict(methods.NO_PENALTY),
              BOUND_FROM_THE_START: {**choices["bound"], "reg.start_epoch": 0,
                                     "train.log_norms": True}}
  runs = methods.table_sweep(variants, tuned.SEEDS)
  for run in runs:
    method, seed = run["labels"]["method"], run["labels"]["seed"]
    run["name"] = f"{method.replace(',', '').replace(' ', '_')}/seed{seed}"
    if method != "no-reg":
      run["warm_start"] = None  # trains every epoch itself
  return runs
