#!/usr/bin/env bash
# Grids extended downward for the methods whose whole pre-registered grid failed the tuning's
# float criterion (README, "Table 1"): the extension's tuning on the validation split, sharing the
# tuning's no-reg run, then those methods at their choices for 3 seeds on the test set, sharing
# the tuned table's no-reg runs, under the paper and the strong protocol. Run after
# network_table.sh. EXT names the extension: configs/tables/fashion_mnist_${NET}_${EXT}{_tuning,}.py,
# runs in $W/$NET/$EXT{_tuning,}, results in experiments/results/$NET/$EXT.
#   NET=resnet18 EXT=l1_low W=<workdir root> bash experiments/extend_grids.sh     # l1
#   NET=mobilenetv2 EXT=low W=<workdir root> bash experiments/extend_grids.sh     # l1 and l2
# Every step skips what is already done, so rerunning resumes.
set -euo pipefail
NET=${NET:?set NET to a network}
EXT=${EXT:?set EXT to an extension with configs/tables/fashion_mnist_\$NET_\$EXT_tuning.py}
W=${W:?set W to a directory for the runs}
PY=${PY:-.venv/bin/python}
ROOT=$W/$NET; OUT=experiments/results/$NET/$EXT
source $(dirname $0)/steps.sh
supplement configs/tables/fashion_mnist_${NET}_${EXT} $ROOT $EXT $OUT
both_protocols $ROOT/$EXT $OUT
