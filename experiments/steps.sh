# Steps shared by the table scripts (network_table.sh, fair_protocol.sh, lazy_parity.sh,
# extend_grids.sh); source it, with $PY set.
#   both_protocols <sweep root> <out>
# writes the finished sweep's tables under the paper protocol to <out>/paper, re-sweeps every run
# under the strong protocol (skipping runs already re-swept) and writes those tables to <out>/strong.
#   supplement <config prefix> <root> <name> <out>
# a supplementary table beside a network's tables, its hyperparameters chosen on the validation
# split, then measured on the test set, sharing the no-reg runs of the network's tuning
# (<root>/tuning) and tuned table (<root>/tuned) when they exist: runs <prefix>_tuning.py in
# <root>/<name>_tuning, writes its choices to <out>/tuning, then runs <prefix>.py in <root>/<name>.

both_protocols() {
  local root=$1 out=$2
  $PY -m experiments.make_tables --workdir=$root --out=$out/paper
  $PY -m experiments.reevaluate --workdir=$root --protocol=strong
  $PY -m experiments.make_tables --workdir=$root --results=results_strong.json --out=$out/strong
}

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
