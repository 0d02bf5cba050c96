#!/usr/bin/env bash
# The offline default with and without the regularizer, side by side, per-tensor and per-channel,
# and its integer exports at 8, 6 and 4 bits. Results: experiments/results/default_comparison/.
#
#   bash experiments/default_comparison.sh [ROOT]     (ROOT: scratch workdirs, default workdirs/default_comparison)
#
# About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${1:-workdirs/default_comparison}
OUT=experiments/results/default_comparison
CONFIG=configs/fashion_mnist.py
mkdir -p "$ROOT" "$OUT"

NO_REG=(--config.reg.lambda_w=0 --config.reg.lambda_a=0)
$PY -m qreg.main --config=$CONFIG --workdir="$ROOT/l1"
$PY -m qreg.main --config=$CONFIG --workdir="$ROOT/no_reg" "${NO_REG[@]}"

# The same checkpoints, swept again with per-channel weight scales (no retraining).
for run in l1 no_reg; do
  rm -rf "$ROOT/${run}_per_channel"
  cp -r "$ROOT/$run" "$ROOT/${run}_per_channel"
done
$PY -m qreg.evaluate --config=$CONFIG --workdir="$ROOT/l1_per_channel" --config.quant.per_channel=True
$PY -m qreg.evaluate --config=$CONFIG --workdir="$ROOT/no_reg_per_channel" --config.quant.per_channel=True \
    "${NO_REG[@]}"

$PY -m qreg.report --workdirs="$ROOT/no_reg,$ROOT/l1,$ROOT/no_reg_per_channel,$ROOT/l1_per_channel" \
    --labels="no-reg per-tensor,l1 per-tensor,no-reg per-channel,l1 per-channel" --out="$OUT"

{
  echo "| file | bytes | ratio to float32 folded params |"
  echo "|---|---|---|"
  for bits in 8 6 4; do
    # "Wrote F: N bytes; float32 folded params M bytes (ratio R, b/32 = ...)."
    line=$($PY -m qreg.export --workdir="$ROOT/l1" --weight_bits=$bits --out="$ROOT/l1_w$bits.npz" | grep '^Wrote')
    read -r export_bytes float_bytes ratio < <(echo "$line" | sed 's/.*: \([0-9,]*\) bytes; float32 folded params \([0-9,]*\) bytes (ratio \([0-9.]*\),.*/\1 \2 \3/')
    echo "| $bits-bit export (.npz) | $export_bytes | $ratio (ideal $bits/32 = $($PY -c "print(f'{$bits / 32:.3f}')")) |"
    $PY -m qreg.evaluate --config=$CONFIG --workdir="$ROOT/l1" --export="$ROOT/l1_w$bits.npz" > /dev/null
  done
  echo "| float32 folded params | $float_bytes | 1 |"
  echo "| orbax checkpoint directory (params, BN stats, optimizer state) | $(du -sb "$ROOT/l1/checkpoints/$(ls "$ROOT/l1/checkpoints" | sort -n | tail -1)" | cut -f1) | |"
} > "$OUT/export_sizes.md"
cp "$ROOT"/l1/export_w*_results.md "$OUT/"
for run in l1 no_reg l1_per_channel no_reg_per_channel; do
  cp "$ROOT/$run/results.json" "$OUT/$run.json"
  cp "$ROOT/$run/results.png" "$OUT/$run.png"
done
cat "$OUT/comparison.md" "$OUT/export_sizes.md"
