#!/usr/bin/env bash
# Lazy and sub-batch penalties against the exact one (README, "Cost of the regularizer"):
# the k=4, f=1/4 schedule's own lambdas on the validation split, then l1 at every (k, f) of
# configs/tables/fashion_mnist_lazy.py plus that retuned schedule, 3 seeds, on the offline default
# (NET unset) or on a paper network (NET=vgg), sharing the no-reg runs of that network's tuning
# and tuned table when they exist (experiments/network_table.sh's $W/$NET/{tuning,tuned}).
#   [NET=vgg] W=<workdir root> bash experiments/lazy_parity.sh
# Every step skips what is already done, so rerunning resumes.
set -euo pipefail
W=${W:?set W to a directory for the runs}
PY=${PY:-.venv/bin/python}
if [ -n "${NET:-}" ]; then
  TABLES=configs/tables/fashion_mnist_${NET}; ROOT=$W/$NET; OUT=experiments/results/$NET/lazy
else
  TABLES=configs/tables/fashion_mnist; ROOT=$W/default; OUT=experiments/results/fashion_mnist_lazy
fi
source $(dirname $0)/steps.sh
supplement ${TABLES}_lazy $ROOT lazy $OUT
$PY -m experiments.make_tables --workdir=$ROOT/lazy --out=$OUT
