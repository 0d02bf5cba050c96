#!/usr/bin/env bash
# One paper network's CPU-scale table on Fashion-MNIST, end to end (README, "Table 1"):
# equal-budget tuning on the validation split, then the tuned 3-seed table on the test set under
# the paper and the strong protocol. NET is vgg, resnet18 or mobilenetv2.
#   NET=vgg W=<workdir root> bash experiments/network_table.sh
# Every step skips what is already done, so rerunning resumes.
set -euo pipefail
NET=${NET:?set NET to vgg, resnet18 or mobilenetv2}
W=${W:?set W to a directory for the runs}
PY=${PY:-.venv/bin/python}
OUT=experiments/results/$NET
TABLES=configs/tables/fashion_mnist_$NET
source $(dirname $0)/steps.sh
$PY -m experiments.run_sweep --config=${TABLES}_tuning.py --workdir=$W/$NET/tuning
$PY -m experiments.tune --config=${TABLES}_tuning.py --workdir=$W/$NET/tuning --out=$OUT/tuning
$PY -m experiments.run_sweep --config=${TABLES}_tuned.py --workdir=$W/$NET/tuned
both_protocols $W/$NET/tuned $OUT
