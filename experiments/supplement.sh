# Sourced by lazy_parity.sh and l1_low.sh: a supplementary table beside a network's tables, its
# hyperparameters chosen on the validation split, then measured on the test set, sharing the
# no-reg runs of the network's tuning ($ROOT/tuning) and tuned table ($ROOT/tuned) when they exist.
#   supplement <config prefix> <root> <name> <out>
# runs <prefix>_tuning.py in <root>/<name>_tuning, writes its choices to <out>/tuning, then runs
# <prefix>.py in <root>/<name>. Needs $PY.

link() {  # link <finished run> <run dir>: share a finished no-reg run instead of retraining it
  if [ -f $1/results.json ] && [ ! -e $2 ]; then mkdir -p $(dirname $2); ln -s $1 $2; fi
}

supplement() {
  local prefix=$1 root=$2 name=$3 out=$4
  link $root/tuning/no-reg $root/${name}_tuning/no-reg
  for seed in 0 1 2; do link $root/tuned/no-reg/seed$seed $root/$name/no-reg/seed$seed; done
  $PY -m experiments.run_sweep --config=${prefix}_tuning.py --workdir=$root/${name}_tuning
  $PY -m experiments.tune --config=${prefix}_tuning.py --workdir=$root/${name}_tuning \
    --out=$out/tuning
  $PY -m experiments.run_sweep --config=${prefix}.py --workdir=$root/$name
}
