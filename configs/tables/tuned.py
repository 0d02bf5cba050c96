"""A tuning's choices measured on the test set: no-reg and each chosen method, seeds 0-2.

    --config=configs/tables/tuned.py:net=vgg   with choices from experiments/results/vgg/tuning

Same data as the tuning (configs/tables/tuning.py): the validation split stays held out, and only
the test set is measured. The choices ({method: overrides}) are handed over by experiments.study,
or by `experiments.run_sweep --choices=<choices.json>`; a grid extension's choices give its
supplementary rows beside the same no-reg runs.
"""
from configs.tables import common, methods, tuning

SEEDS = (0, 1, 2)


def get_config(arg=None):
  config = tuning.get_config(f"net={common.parse_arg(arg, net='small_cnn').net}")
  config.eval.split = "test"
  return config


def sweep(arg=None, *, choices):
  common.parse_arg(arg, net="small_cnn")
  return methods.table_sweep({"no-reg": dict(methods.NO_PENALTY), **choices}, SEEDS)
