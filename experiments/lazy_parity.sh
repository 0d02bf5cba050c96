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
link() {  # link <finished run> <run dir>: share a finished no-reg run instead of retraining it
  if [ -f $1/results.json ] && [ ! -e $2 ]; then mkdir -p $(dirname $2); ln -s $1 $2; fi
}
link $ROOT/tuning/no-reg $ROOT/lazy_tuning/no-reg
for seed in 0 1 2; do link $ROOT/tuned/no-reg/seed$seed $ROOT/lazy/no-reg/seed$seed; done
$PY -m experiments.run_sweep --config=${TABLES}_lazy_tuning.py --workdir=$ROOT/lazy_tuning
$PY -m experiments.tune --config=${TABLES}_lazy_tuning.py --workdir=$ROOT/lazy_tuning \
  --out=$OUT/tuning
$PY -m experiments.run_sweep --config=${TABLES}_lazy.py --workdir=$ROOT/lazy
$PY -m experiments.make_tables --workdir=$ROOT/lazy --out=$OUT
