#!/usr/bin/env bash
# Train on one multi-GPU machine with one qreg process per GPU, joined by jax.distributed over
# localhost (the layout of multi-node GPU jobs; a single `python -m qreg.main` also drives every
# local GPU, with no flags).
#
#   NUM_GPUS=8 WORKDIR=workdirs/cifar10_vgg bash experiments/launch_gpu_node.sh [FLAGS...]
#
# CONFIG (default configs/cifar10_vgg.py), PORT (of process 0's coordinator, default 12355)
# and PY (default .venv/bin/python, with the jax[cuda12] wheel) can be set; FLAGS go to every
# process. SIGTERM or Ctrl-C reaches every process: they checkpoint at the same step and exit
# with status 143. Rerunning the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
: "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/cifar10_vgg.py}
PORT=${PORT:-12355}
PY=${PY:-.venv/bin/python}

pids=()
for ((i = 0; i < NUM_GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i "$PY" -m qreg.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_GPUS" --process_id="$i" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when the trap runs; wait on until the process has exited.
  until wait "$pid"; do
    code=$?
    if ! kill -0 "$pid" 2>/dev/null; then
      status=$code
      break
    fi
  done
done
exit "$status"
