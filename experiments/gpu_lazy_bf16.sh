#!/usr/bin/env bash
# One prepared run on a lent GPU machine (JAX, Flax, optax, orbax; no TensorFlow or
# ml_collections): the amortized cost of the cheaper penalty schedules on full-width VGG-like
# and ResNet-18 at batch 128 and 256, float32 and bfloat16 (README, "Cheaper schedules").
#   carried: .whl (ml_collections wheel)
# Writes to $OUT: gpu.txt, step_cost_b128/, step_cost_b256/.
set -uo pipefail
source experiments/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
for batch in 128 256; do
  timeout 280 python3 -m benchmarks.step_cost --models=vgg_like,resnet18 --batch_sizes=$batch \
    --impls=hvp --fractions=1,0.25 --every_k=1,4,16 --dtypes=float32,bfloat16 \
    --steps=20 --warmup_steps=3 --output_dir="$OUT/step_cost_b$batch" 2>&1 \
    | grep -v "^W\|^I" | tail -40
done
