#!/usr/bin/env bash
# Lazy and sub-batch penalties against the exact one (README, "Cost of the regularizer"):
# l1 at every (k, f) of configs/tables/fashion_mnist_lazy.py, 3 seeds, on the offline default
# (NET unset) or on a paper network (NET=vgg), sharing the no-reg runs of that network's
# tuned table when they exist (experiments/network_table.sh's $W/$NET/tuned).
#   [NET=vgg] W=<workdir root> bash experiments/lazy_parity.sh
# Every step skips what is already done, so rerunning resumes.
set -euo pipefail
W=${W:?set W to a directory for the runs}
PY=${PY:-.venv/bin/python}
if [ -n "${NET:-}" ]; then
  CONFIG=configs/tables/fashion_mnist_${NET}_lazy.py; ROOT=$W/$NET; OUT=experiments/results/$NET/lazy
else
  CONFIG=configs/tables/fashion_mnist_lazy.py; ROOT=$W/default; OUT=experiments/results/fashion_mnist_lazy
fi
mkdir -p $ROOT/lazy/no-reg
for seed in 0 1 2; do
  if [ -f $ROOT/tuned/no-reg/seed$seed/results.json ] && [ ! -e $ROOT/lazy/no-reg/seed$seed ]; then
    ln -s $ROOT/tuned/no-reg/seed$seed $ROOT/lazy/no-reg/seed$seed
  fi
done
$PY -m experiments.run_sweep --config=$CONFIG --workdir=$ROOT/lazy
$PY -m experiments.make_tables --workdir=$ROOT/lazy --out=$OUT
