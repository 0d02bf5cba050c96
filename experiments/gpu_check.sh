#!/usr/bin/env bash
# One prepared run on a lent GPU machine that has JAX, Flax, optax, orbax and tensorboard but
# no TensorFlow or ml_collections: step cost of the paper's networks at full width, and a
# short full-width VGG-like run on Fashion-MNIST through the TensorFlow-free IDX pipeline.
#   carried: .whl (ml_collections wheel), .data/fashion-mnist (the IDX files)
# Writes to $OUT: step_cost_b128/, step_cost_b256/, vgg_fmnist.log, vgg_fmnist_results.json.
set -uo pipefail
source experiments/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q tests/test_layering.py -k "imports_point_down" 2>&1 | tail -2
for batch in 128 256; do
  timeout 200 python3 -m benchmarks.step_cost --models=vgg_like,resnet18 --batch_sizes=$batch \
    --steps=20 --warmup_steps=3 --output_dir="$OUT/step_cost_b$batch" 2>&1 | grep -v "^W\|^I" | tail -12
done
timeout 180 python3 -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/vgg_fmnist \
  --config.model.name=vgg_like --config.data.data_dir=.data/fashion-mnist \
  --config.train.num_epochs=2 --config.reg.start_epoch=1 --config.train.log_every_steps=200 \
  --config.eval.batch_size=1000 > "$OUT/vgg_fmnist.log" 2>&1
echo "qreg.main exit status $?"
grep "steps/s\|test/accuracy\|accuracy 0" "$OUT/vgg_fmnist.log" | tail -14
cp /tmp/vgg_fmnist/results.json "$OUT/vgg_fmnist_results.json" 2>/dev/null || true
