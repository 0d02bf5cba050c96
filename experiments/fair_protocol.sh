#!/usr/bin/env bash
# The fair protocol on the offline default, end to end (README, "A fair protocol"):
# equal-budget tuning on the validation split, the tuned 3-seed table on the test set under
# the paper and strong protocols, and the protocol ladder on the default run's checkpoints.
#   W=<workdir root> NOREG=<default no-reg workdir> L1=<default l1 workdir> bash experiments/fair_protocol.sh
# Every step skips what is already done, so rerunning resumes.
set -euo pipefail
W=${W:?set W to a directory for the runs}
PY=${PY:-.venv/bin/python}
OUT=experiments/results
source $(dirname $0)/steps.sh
$PY -m experiments.run_sweep --config=configs/tables/fashion_mnist_tuning.py --workdir=$W/tuning
$PY -m experiments.tune --workdir=$W/tuning --out=$OUT/fashion_mnist_tuning
$PY -m experiments.run_sweep --config=configs/tables/fashion_mnist_tuned.py --workdir=$W/tuned
both_protocols $W/tuned $OUT/fashion_mnist_tuned
if [ -n "${NOREG:-}" ] && [ -n "${L1:-}" ]; then
  [ -f $OUT/protocol_ladder/ladder.md ] || $PY -m experiments.reevaluate --ladder \
    --workdirs=$NOREG,$L1 --labels=no-reg,l1 --out=$OUT/protocol_ladder
fi
$PY -m experiments.reevaluate --workdir=$W/tuned --protocol=strong+adaround
$PY -m experiments.make_tables --workdir=$W/tuned --results=results_strong_adaround.json \
  --out=$OUT/fashion_mnist_tuned/strong_adaround
