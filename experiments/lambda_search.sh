#!/usr/bin/env bash
# One-seed search of (lambda_w, lambda_a) for configs/fashion_mnist.py (regularizer on in the last
# of 4 epochs). The 3 plain epochs are identical for every pair (deterministic data order and
# schedule), so they are trained once: a lambda=0 run's epoch-3 checkpoint is copied and resumed
# with each pair, which gives what a fresh run with that pair gives.
#
#   bash experiments/lambda_search.sh [ROOT]      (about 25 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${1:-workdirs/lambda_search}
CONFIG=configs/fashion_mnist.py
mkdir -p "$ROOT"
$PY -m qreg.main --config=$CONFIG --workdir="$ROOT/w0_a0" --config.reg.lambda_w=0 --config.reg.lambda_a=0
EPOCH3=$($PY -c "import json; c=json.load(open('$ROOT/w0_a0/config.json')); print(3 * (60000 // c['data']['batch_size']))")
for pair in "0.001 0.001" "0.003 0.003" "0.003 0" "0.001 0.01" "0 0.01" "0 0.03" "0.01 0.01"; do
  set -- $pair
  run="$ROOT/w$1_a$2"
  rm -rf "$run"; mkdir -p "$run/checkpoints"
  cp -r "$ROOT/w0_a0/checkpoints/$EPOCH3" "$run/checkpoints/"
  $PY -m qreg.main --config=$CONFIG --workdir="$run" --config.reg.lambda_w=$1 --config.reg.lambda_a=$2
done
$PY -m qreg.report --workdirs="$(ls -d "$ROOT"/w* | paste -sd,)" --out=experiments/results/lambda_search
