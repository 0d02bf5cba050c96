"""Cheaper penalties against the exact one (docs/cost.md): l1 with its validation-chosen lambdas,
the penalty on one step in k (reg.every_k_steps, lambda times k) and on a fraction f of each batch
(reg.penalty_batch_fraction), 3 seeds, test accuracy under the paper protocol.

    --config=configs/tables/lazy.py:net=small_cnn   (or net=vgg)

Same data, seeds, epochs and warm starts as the tuned table (configs/tables/tuned.py), whose
no-reg runs experiments.study shares. choices: {"l1": l1's tuned overrides, and for each
schedule retuned on the validation split (tuning.py:grid=lazy) "<schedule>-retuned": its own}.
"""
import itertools

from configs.tables import common, methods, tuned

EVERY_K = (1, 4, 16)
FRACTIONS = (1.0, 0.25)
BIT_SETTINGS = ((None, None), (4, 4), (3, 3))


def method_name(every_k: int, fraction: float) -> str:
  return f"l1-k{every_k}-f{fraction:g}"


def get_config(arg=None):
  config = tuned.get_config(arg)
  config.quant.bit_settings = BIT_SETTINGS
  return config


def sweep(arg=None, *, choices):
  common.parse_arg(arg, net="small_cnn")
  chosen = {"no-reg": dict(methods.NO_PENALTY)}
  for every_k, fraction in itertools.product(EVERY_K, FRACTIONS):
    chosen[method_name(every_k, fraction)] = {**choices["l1"], "reg.every_k_steps": every_k,
                                             "reg.penalty_batch_fraction": fraction}
  chosen.update({method: overrides for method, overrides in choices.items()
                 if method.endswith("-retuned")})
  return methods.table_sweep(chosen, tuned.SEEDS)
