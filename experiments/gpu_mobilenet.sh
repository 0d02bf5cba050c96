#!/usr/bin/env bash
# Step cost of MobileNetV2 (full width, CIFAR stem) on a lent GPU; see experiments/gpu_check.sh.
# On an H100 (2026-11-27) compiling all four variants did not finish in 150 s per batch size;
# plain + hvp at batch 128 took 95 s in all (benchmarks/results/h100/step_cost_mobilenetv2_b128.md).
set -uo pipefail
source experiments/gpu_env.sh
timeout 165 python3 -m benchmarks.step_cost --models=mobilenetv2 --batch_sizes=128 --impls=hvp \
  --steps=10 --warmup_steps=1 --output_dir="$OUT/mnv2" 2>&1 | grep -v "^W\|^I" | tail -6
