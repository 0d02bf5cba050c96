#!/usr/bin/env bash
# A network's l1 grid extended downward when the pre-registered tuning found no l1 value within
# the float budget (README, "Table 1"): the extension's tuning on the validation split, sharing
# the tuning's no-reg run, then l1 at its choice for 3 seeds on the test set, sharing the tuned
# table's no-reg runs, under the paper and the strong protocol. Run after network_table.sh.
#   NET=resnet18 W=<workdir root> bash experiments/l1_low.sh
# Every step skips what is already done, so rerunning resumes.
set -euo pipefail
NET=${NET:?set NET to a network with configs/tables/fashion_mnist_\$NET_l1_low*.py}
W=${W:?set W to a directory for the runs}
PY=${PY:-.venv/bin/python}
ROOT=$W/$NET; OUT=experiments/results/$NET/l1_low
TABLES=configs/tables/fashion_mnist_${NET}_l1_low
source $(dirname $0)/steps.sh
supplement $TABLES $ROOT l1_low $OUT
both_protocols $ROOT/l1_low $OUT
