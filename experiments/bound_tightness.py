"""How tight the first-order bound is: its predicted loss increase against the measured one at
each bit-width, for every method (issue 23; the paper's Figure-2 kind of check).

    python -m experiments.bound_tightness --workdirs=<tables' roots, e.g. .../small_cnn/tuned,\
        .../small_cnn/bound> --out=<dir> [--batches=4]

For every finished run under <root>/<method>/seed<s> of each root, on the first --batches
batches of its evaluation split (config.eval.batch_size each), through the folded network that
the sweep quantizes (BatchNorm folded with its running statistics), at each width b of WIDTHS:
- predicted: qreg.bound's B at b with lambda = 1, per term: weights, the sum over kernels and
  output channels of (delta(b)/2) ||dL/dW^||_1 (symmetric absmax steps, per channel where the
  run's quant.per_channel says so), and activations, the sum over taps of
  (delta_t(b)/2) ||dL/da_t||_1 (each tap's scheme on the batch's own min-max);
- measured: the batch's mean cross-entropy with the folded model quantized at b minus the float
  one: weights only (the sweep's weight quantizer, rounded to nearest), activations only (each
  tap's range the batch's own min-max, as the bound's delta_t), and both (activations ranged
  with the quantized weights, as the sweep calibrates).
Each value is the mean over the batches. The bound holds to first order for any rounding, with
the worst-case signs; a measured/predicted ratio well below 1 says how far rounding's errors
are from that worst case, a ratio above 1 that second-order terms dominate.

A run restored from experiments.archive without its trained model is left out, or with
--rebuild measured on its twin (experiments.run_sweep.rebuild_twin: retrained from its archived
warm start; its tightness record says whether the twin reproduced the run's results).

Writes to --out: tightness.json (per method, seed and width: predicted and measured per term),
tightness.md (the ratio measured / predicted, mean ± std over seeds, per term), tightness.png
(that ratio against bits, one panel per term, one line per method).
"""
import collections
import functools
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import archive, make_tables, run_sweep  # pylint: disable=g-import-not-at-top
from qreg import bound, checkpoint, cli, data, objectives, ptq, report  # pylint: disable=g-import-not-at-top

WIDTHS = (8, 6, 5, 4, 3, 2)
NUM_BATCHES = 4
TERMS = ("weights", "activations", "both")


def _batches(config, num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first num_batches batches of the run's evaluation split, padding dropped."""
  pipeline = data.build_input_pipeline(config.data)
  batches = []
  for batch in pipeline.eval_batches(config.eval.batch_size, split=config.eval.split,
                                     num_batches=num_batches):
    keep = np.asarray(batch["mask"]) > 0
    batches.append({"image": np.asarray(batch["image"])[keep],
                    "label": np.asarray(batch["label"])[keep]})
  return batches


@functools.partial(jax.jit, static_argnums=0)
def _loss_of(apply_fn, variables, batch):
  return objectives.cross_entropy(apply_fn(variables, batch["image"], train=False),
                                  batch["label"])


def _loss(apply_fn, variables, batch) -> float:
  return float(_loss_of(apply_fn, variables, batch))


def run_tightness(workdir: str, num_batches: int = NUM_BATCHES, widths=None) -> dict:
  """{'predicted': {term: {b: value}}, 'measured': {term: {b: value}}, 'float_loss'} of one
  run (module docstring), at each width of `widths` (default WIDTHS)."""
  widths = WIDTHS if widths is None else widths
  run = run_sweep.load_finished_run(workdir)
  config, model = run.config, run.model
  params, batch_stats = run.variables["params"], run.variables.get("batch_stats", {})
  batches = _batches(config, num_batches)
  setup = ptq.sweep_setup(config, model, batches[0]["image"].shape[1:])
  folded = ptq.fold(params, batch_stats)
  float_apply = model.clone(folded=True, act_scheme=setup.act_scheme).apply
  quantized_apply = {b: model.clone(folded=True, act_bits=b, act_scheme=setup.act_scheme).apply
                     for b in widths}
  folded_apply_fn = model.clone(folded=True).apply
  bound_terms = {b: jax.jit(functools.partial(
      bound.bound_value, apply_fn=model.apply,
      penalty=bound.BoundPenalty(1.0, 1.0, b, setup.per_channel, True,
                                 folded_apply_fn=folded_apply_fn))) for b in widths}
  qparams = {b: setup.quantize_weights(folded, b) for b in widths}  # the same for every batch
  predicted = {term: collections.defaultdict(list) for term in TERMS}
  measured = {term: collections.defaultdict(list) for term in TERMS}
  float_losses = []
  for batch in batches:
    batch = jax.tree.map(jnp.asarray, batch)
    perturbations = objectives.zero_perturbations(model.apply, params, batch_stats,
                                                  batch["image"])
    float_loss = _loss(float_apply, {"params": folded}, batch)
    float_losses.append(float_loss)
    float_samples = ptq._activation_samples(float_apply, {"params": folded}, batch["image"])  # pylint: disable=protected-access
    for b in widths:
      _, (weights, activations) = bound_terms[b](params, batch_stats, batch, perturbations=perturbations)
      predicted["weights"][b].append(float(weights))
      predicted["activations"][b].append(float(activations))
      predicted["both"][b].append(float(weights) + float(activations))
      measured["weights"][b].append(_loss(float_apply, {"params": qparams[b]}, batch) - float_loss)
      ranges = ptq.activation_ranges(float_samples, b, setup)
      measured["activations"][b].append(_loss(
          quantized_apply[b], {"params": folded, "activation_ranges": ranges}, batch) - float_loss)
      samples = ptq._activation_samples(float_apply, {"params": qparams[b]}, batch["image"])  # pylint: disable=protected-access
      ranges = ptq.activation_ranges(samples, b, setup)
      measured["both"][b].append(_loss(
          quantized_apply[b], {"params": qparams[b], "activation_ranges": ranges}, batch) - float_loss)
  mean = lambda table: {term: {str(b): float(np.mean(v)) for b, v in values.items()}
                        for term, values in table.items()}
  return {"predicted": mean(predicted), "measured": mean(measured),
          "float_loss": float(np.mean(float_losses)), "batches": len(batches),
          "examples": int(sum(len(b["label"]) for b in batches)),
          "per_channel": setup.per_channel}


def measure(run_dir: str, num_batches: int | None = None, rebuild: bool = False) -> dict:
  """The run's run_tightness, kept beside its results as tightness.json (archive.kept). A study
  measures it as each run ends. With rebuild, a run restored without its trained model is
  measured on its twin (run_sweep.rebuild_twin), whose record the tightness's "twin" keeps."""
  num_batches = NUM_BATCHES if num_batches is None else num_batches

  def compute():
    model_dir = run_sweep.trained_model_dir(run_dir, rebuild)
    print(f"=== {run_dir}: bound tightness ===", flush=True)
    found = run_tightness(model_dir, num_batches)
    if model_dir != run_dir:
      found["twin"] = run_sweep.read_twin_record(model_dir)
    jax.clear_caches()
    return found

  return archive.kept(run_dir, "tightness.json", num_batches, compute)


def read_or_measure(roots: list[str], num_batches: int | None = None,
                    rebuild: bool = False) -> dict:
  """{method: {seed: measure}} of every finished run under the roots (a method found under an
  earlier root is not read again). A run that was never measured and has no checkpoint of its
  trained model (restored from experiments.archive) is left out, with a line saying so, and the
  tables then name the seeds each method has; with rebuild it is measured on its twin instead
  (measure), the workers of a study sharing the twins (run_sweep.for_each_claimed)."""
  found_runs, methods = [], set()
  for root, method in [(root, m) for root in roots for m in sorted(os.listdir(root))]:
    method_dir = os.path.join(root, method)
    if not os.path.isdir(method_dir) or method in methods:
      continue
    methods.add(method)
    for name in sorted(os.listdir(method_dir)):
      run_dir = os.path.join(method_dir, name)
      if name.startswith("seed") and run_sweep.is_finished(run_dir):
        found_runs.append((method, name, run_dir))
  if rebuild:
    run_sweep.for_each_claimed([d for _, _, d in found_runs], lambda d: d,
                               lambda d: measure(d, num_batches, rebuild=True))
  runs = collections.OrderedDict()
  for method, name, run_dir in found_runs:
    try:
      found = measure(run_dir, num_batches)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
      print(f"=== {method}/{name}: left out of the tightness: {e}", flush=True)
      continue
    runs.setdefault(method, {})[int(name[4:])] = found
  if not runs:
    raise FileNotFoundError(f"No finished runs under {', '.join(roots)} (<method>/seed<s>).")
  return runs


def _label(method: str, seeds, runs: dict) -> str:
  """The method's name, with its seeds where it has fewer than the method with the most."""
  if len(seeds) == max(len(s) for s in runs.values()):
    return method
  return f"{method} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))})"


def ratios(runs: dict) -> dict:
  """{method: {term: {b: [measured / predicted per seed]}}}."""
  out = {}
  for method, seeds in runs.items():
    out[method] = {term: {b: [s["measured"][term][str(b)] / s["predicted"][term][str(b)]
                              for s in seeds.values()] for b in WIDTHS} for term in TERMS}
  return out


def markdown(runs: dict) -> str:
  table = ratios(runs)
  lines = []
  for term in TERMS:
    lines += [f"## {term}: measured / predicted loss increase, mean ± std over seeds\n",
              "| method | " + " | ".join(f"W{b}A{b}" if term == "both" else f"{b} bits"
                                         for b in WIDTHS) + " |",
              "|---|" + "---|" * len(WIDTHS)]
    for method, by_term in table.items():
      lines.append(f"| {_label(method, runs[method], runs)} | " + " | ".join(
          "{:.3f} ± {:.3f}".format(*make_tables.mean_std(by_term[term][b])) for b in WIDTHS) + " |")
    lines.append("")
  lines += ["## Predicted and measured loss increase (both terms), mean over seeds\n",
            "| method | " + " | ".join(f"W{b}A{b}" for b in WIDTHS) + " |",
            "|---|" + "---|" * len(WIDTHS)]
  for method, seeds in runs.items():
    cells = [f"{np.mean([s['predicted']['both'][str(b)] for s in seeds.values()]):.3g} / "
             f"{np.mean([s['measured']['both'][str(b)] for s in seeds.values()]):.3g}"
             for b in WIDTHS]
    lines.append(f"| {_label(method, seeds, runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(runs: dict, path: str, title: str = "") -> None:
  table = ratios(runs)
  fig, axes = plt.subplots(1, len(TERMS), figsize=(4 * len(TERMS), 3.8), sharey=True)
  for ax, term in zip(axes, TERMS):
    for i, (method, by_term) in enumerate(table.items()):
      stats = [make_tables.mean_std(by_term[term][b]) for b in WIDTHS]
      ax.errorbar(WIDTHS, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="-o",
                  capsize=3, color=f"C{i}", label=_label(method, runs[method], runs))
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("bits")
    ax.set_title(term)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("measured / predicted loss increase")
  axes[-1].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_tightness(roots: list[str], out: str, num_batches: int | None = None,
                    title: str = "", rebuild: bool = False) -> str:
  runs = read_or_measure(roots, num_batches, rebuild)
  os.makedirs(out, exist_ok=True)
  report.write_json_atomic(os.path.join(out, "tightness.json"),
                           {m: {str(s): r for s, r in seeds.items()} for m, seeds in runs.items()})
  table = markdown(runs)
  report.write_text_atomic(os.path.join(out, "tightness.md"), table)
  plot(runs, os.path.join(out, "tightness.png"), title)
  return table


if __name__ == "__main__":
  _WORKDIRS = flags.DEFINE_list("workdirs", None, "Tables' roots (<method>/seed<s> runs).",
                                required=True)
  _OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
  _BATCHES = flags.DEFINE_integer("batches", NUM_BATCHES, "Evaluation batches to average over.")
  _REBUILD = flags.DEFINE_bool("rebuild", False, "Measure a run restored without its trained "
                               "model on its twin, retrained from its archived warm start.")
  cli.run(lambda argv: print(write_tightness(_WORKDIRS.value, _OUT.value, _BATCHES.value,
                                             rebuild=_REBUILD.value)))
