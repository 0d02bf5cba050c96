"""Cheaper penalties against the exact one, on the offline default (README, "Cost of the
regularizer"): l1 with its validation-chosen lambdas, the penalty on one step in k
(reg.every_k_steps, lambda times k) and on a fraction f of each batch
(reg.penalty_batch_fraction), 3 seeds, test accuracy under the paper protocol.

    W=$W bash experiments/lazy_parity.sh

Same data, seeds, epochs and warm starts as the tuned table
(configs/tables/fashion_mnist_tuned.py), whose no-reg runs the script links in;
`lazy_table` builds the same comparison for any tuned table.
"""
import itertools
import os

from configs.tables import fashion_mnist_tuned, methods

EVERY_K = (1, 4, 16)
FRACTIONS = (1.0, 0.25)
BIT_SETTINGS = ((None, None), (4, 4), (3, 3))


def method_name(every_k: int, fraction: float) -> str:
  return f"l1-k{every_k}-f{fraction:g}"


def lazy_table(tuned_get_config, choices_path: str, seeds=fashion_mnist_tuned.SEEDS,
               retuned_path: str | None = None):
  """(get_config, sweep): no-reg and l1 at each (k, f) of EVERY_K x FRACTIONS, each seed, with
  l1's lambdas from choices_path (chosen at k = 1, f = 1 on the validation split); plus, once
  retuned_path exists, each schedule there with its own validation-chosen lambdas
  (configs/tables/fashion_mnist_lazy_tuning.py)."""

  def get_config():
    config = tuned_get_config()
    config.quant.bit_settings = BIT_SETTINGS
    return config

  def sweep():
    l1 = fashion_mnist_tuned.read_choices(choices_path)["l1"]
    chosen = {"no-reg": dict(methods.NO_PENALTY)}
    for every_k, fraction in itertools.product(EVERY_K, FRACTIONS):
      chosen[method_name(every_k, fraction)] = {**l1, "reg.every_k_steps": every_k,
                                               "reg.penalty_batch_fraction": fraction}
    if retuned_path and os.path.exists(retuned_path):
      chosen.update({f"{method}-retuned": overrides for method, overrides
                     in fashion_mnist_tuned.read_choices(retuned_path).items()})
    return methods.table_sweep(chosen, seeds)

  return get_config, sweep


RETUNED = os.path.join(fashion_mnist_tuned.RESULTS, "fashion_mnist_lazy", "tuning", "choices.json")
get_config, sweep = lazy_table(fashion_mnist_tuned.get_config, fashion_mnist_tuned.CHOICES,
                               retuned_path=RETUNED)
