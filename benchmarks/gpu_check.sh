#!/usr/bin/env bash
# The prepared run for a lent GPU machine that has JAX, Flax, optax, orbax and tensorboard but no
# TensorFlow and no ml_collections (carried as wheels in .whl/) and no package registry.
#
#   bash benchmarks/gpu_check.sh check       step cost of VGG-like and ResNet-18 at full width, batch
#                                            128 and 256, and a 2-epoch full-width VGG-like run on
#                                            Fashion-MNIST (IDX files carried in .data/fashion-mnist)
#   bash benchmarks/gpu_check.sh lazy        amortized cost of the cheaper penalty schedules, float32
#                                            and bfloat16 (docs/cost.md)
#   bash benchmarks/gpu_check.sh mobilenet   step cost of full-width MobileNetV2 (CIFAR stem)
#
# Writes to $OUT (the device tool's output folder): gpu.txt, step_cost_*/, vgg_fmnist.*.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an output directory}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
step_cost() {  # step_cost <timeout seconds> <benchmarks.step_cost flags...>
  timeout "$1" python3 -m benchmarks.step_cost "${@:2}" 2>&1 | grep -v "^W\|^I" | tail -40
}

case "${1:-}" in
  check)
    python3 -m pytest -q tests/test_layering.py -k "imports_point_down" 2>&1 | tail -2
    for batch in 128 256; do
      step_cost 200 --models=vgg_like,resnet18 --batch_sizes=$batch --steps=20 \
        --warmup_steps=3 --output_dir="$OUT/step_cost_b$batch"
    done
    timeout 180 python3 -m qreg.main --config=configs/fashion_mnist.py --workdir=/tmp/vgg_fmnist \
      --config.model.name=vgg_like --config.data.data_dir=.data/fashion-mnist \
      --config.train.num_epochs=2 --config.reg.start_epoch=1 --config.train.log_every_steps=200 \
      --config.eval.batch_size=1000 > "$OUT/vgg_fmnist.log" 2>&1
    echo "qreg.main exit status $?"
    grep "steps/s\|test/accuracy\|accuracy 0" "$OUT/vgg_fmnist.log" | tail -14
    cp /tmp/vgg_fmnist/results.json "$OUT/vgg_fmnist_results.json" 2>/dev/null || true
    ;;
  lazy)
    for batch in 128 256; do
      step_cost 280 --models=vgg_like,resnet18 --batch_sizes=$batch --impls=hvp \
        --fractions=1,0.25 --every_k=1,4,16 --dtypes=float32,bfloat16 --steps=20 \
        --warmup_steps=3 --output_dir="$OUT/step_cost_b$batch"
    done
    ;;
  mobilenet)
    # On an H100 compiling all four variants did not finish in 150 s per batch size; plain + hvp
    # at batch 128 took 95 s in all (benchmarks/results/h100/step_cost_mobilenetv2_b128.md).
    step_cost 165 --models=mobilenetv2 --batch_sizes=128 --impls=hvp --steps=10 \
      --warmup_steps=1 --output_dir="$OUT/mnv2"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
