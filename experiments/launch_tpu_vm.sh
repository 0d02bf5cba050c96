#!/usr/bin/env bash
# Train on a Cloud TPU VM, single- or multi-host: one qreg process per worker, joined by
# jax.distributed (on TPU VMs it finds the other workers itself: --distributed, no addresses).
#
#   export TPU=my-tpu ZONE=us-central2-b WORKDIR=/mnt/shared/qreg/cifar10_resnet18
#   bash experiments/launch_tpu_vm.sh setup             # copy this checkout to every worker, install
#   bash experiments/launch_tpu_vm.sh train [FLAGS...]  # start (or resume) on every worker
#   bash experiments/launch_tpu_vm.sh logs              # follow worker 0's log
#   bash experiments/launch_tpu_vm.sh stop              # SIGTERM everywhere: checkpoint, exit 143
#
# CONFIG (default configs/cifar10_resnet18.py) and extra FLAGS (e.g.
# --config.data.data_dir=/mnt/shared/tfds) are passed to python -m qreg.main.
# WORKDIR must be one directory that every worker sees at the same path, e.g. a Filestore
# (NFS) share mounted on all workers: checkpoints are written once, by the workers together,
# and read back by all. On a single-host TPU VM (v4-8, v5litepod-8, ...) a local path works.
# `train` on an existing WORKDIR resumes from its last checkpoint, so after a preemption
# recreate the TPU VM, run `setup` and `train` again.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/cifar10_resnet18.py}
JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE")
REMOTE_DIR=qreg  # in each worker's home directory

case "${1:-}" in
  setup)
    git archive --format=tar.gz -o /tmp/qreg.tar.gz HEAD
    gcloud compute tpus tpu-vm scp /tmp/qreg.tar.gz "$TPU":~/ --zone="$ZONE" --worker=all
    "${SSH[@]}" --worker=all --command="set -e; rm -rf $REMOTE_DIR; mkdir $REMOTE_DIR;
      tar -xzf qreg.tar.gz -C $REMOTE_DIR; cd $REMOTE_DIR; python3 -m venv .venv;
      .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
    ;;
  train)
    shift
    # nohup: the run outlives the ssh session; qreg.pid lets `stop` signal it.
    "${SSH[@]}" --worker=all --command="cd $REMOTE_DIR && nohup .venv/bin/python -m qreg.main \
      --config=$CONFIG --workdir=$WORKDIR --distributed $* > ~/qreg.log 2>&1 < /dev/null &
      echo \$! > ~/qreg.pid"
    ;;
  logs)
    "${SSH[@]}" --worker=0 --command="tail -n 100 -f ~/qreg.log"
    ;;
  stop)
    "${SSH[@]}" --worker=all --command='kill -TERM "$(cat ~/qreg.pid)"'
    ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
