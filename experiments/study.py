"""qreg's studies, each a sequence of resumable steps: train, tune, re-sweep, tabulate.

    python -m experiments.study <study> [--net=<network>] [--workdir=workdirs/studies]
                                [--tuning=run|committed] [--archive=experiments/runs]

| study              | steps                                                                 |
|--------------------|-----------------------------------------------------------------------|
| network_table      | tune on the validation split, the tuned 3-seed table on the test set,  |
|                    | paper and strong protocol tables (and Table 1 for the paper networks)  |
| fair_protocol      | network_table on small_cnn, the default runs, the protocol ladder on   |
|                    | them, and the tuned table under strong+AdaRound                        |
| extend_grids       | the grids extended by their rule (down: resnet18 l1; mobilenetv2 l1,   |
|                    | l2; up: KURE on small_cnn, mobilenetv2): each one's tuning, and its    |
|                    | rows beside the tuned table's no-reg runs                              |
| lazy_parity        | the cheaper penalty schedules against the exact one (small_cnn, vgg)   |
| default_comparison | the default run and its no-reg twin, per-tensor and per-channel, and   |
|                    | the l1 run's integer exports at 8, 6 and 4 bits                        |
| lambda_search      | the one-seed test-set lambda search behind the default lambdas         |
| ablations          | the paper's ablations of l1 under the fair protocol (terms, schedule)  |
| multibit_qat       | multi-bit QAT's tuning and tuned rows beside the tuned table (a grid   |
|                    | extension), then Table 1                                               |
| bound_penalty      | the bound-aware penalty's forms (qreg.bound), tuned and run likewise   |
|                    | (with a grid extension where tuning.py has <net>, bound_low);          |
|                    | the bound's predicted loss increase against the measured, every run;   |
|                    | elsewhere than small_cnn, SmallCNN's choices transferred unchanged     |
| tradeoff           | every method's trade-off curve (configs/tables/tradeoff.py), 3 seeds,  |
|                    | both protocols; curves and the iso-float-cost table                    |
| mixed_precision    | the tuned table's no-reg, l1, l2 and KURE runs (network_table) re-swept |
|                    | with mixed precision at 2-8 bits per weight on each sensitivity        |
| cle_ladder         | the same runs re-swept after cross-layer equalization (+ bias          |
|                    | correction), beside the paper and strong protocols                     |
| deployment         | cle_ladder and mixed_precision on one training of the table (each run  |
|                    | re-swept for both as it ends: what an archived run needs)              |
| drift              | the bound penalty from the start (configs/tables/drift.py) against the |
|                    | l1 runs: growth along BatchNorm's free directions (after bound_penalty; |
|                    | restored runs are rebuilt as twins, as by tightness)                   |
| tightness          | the bound's tightness for every run of the tables (after               |
|                    | bound_penalty): a run restored without its trained model is retrained  |
|                    | from its archived warm start (a twin, <run>/twin) and measured on it   |
| table1             | the cross-network Table 1 from the committed tables                    |

Runs train in --workdir/<net>/<sweep>/<run>; results go to experiments/results/. Every step
skips what is done: a finished run (a readable results.json) is not retrained, an interrupted
one resumes from its checkpoint, a re-sweep already written is not redone, and tables are
rewritten from the runs. Tuned choices pass from the tuning step to the table sweep here (with
--tuning=committed, from the choices.json the tuning wrote when it ran, its runs not retrained);
no config reads a results file. With --archive, finished runs' records are kept in the
repository and restored into a fresh workdir (experiments.archive); each run is re-swept under
the protocols its study needs as soon as it is trained, so that it is archived whole.
"""
import dataclasses
import json
import os
import shutil
from collections.abc import Callable

from absl import flags, logging

from configs.tables import ablations as ablations_config
from configs.tables import tradeoff as tradeoff_config
from configs.tables import tuning as tuning_config
from configs.tables import tuned
from experiments import archive, bound_tightness, bound_transfer
from experiments import cle_ladder as cle_report
from experiments import curves, drift, make_tables, reevaluate, run_sweep, table1, tune
from experiments import mixed_precision as mixed_report
from qreg import checkpoint, cli, evaluate, export, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(REPO, "configs", "tables")
RESULTS = os.path.join(REPO, "experiments", "results")


@dataclasses.dataclass(frozen=True)
class Network:
  """Where a network's tables go under experiments/results."""
  tuning: str
  tables: str
  extensions: tuple[str, ...] = ()  # the grid extensions of configs/tables/tuning.py
  lazy: str | None = None  # the lazy schedules' tables, where they are run


NETWORKS = {
    "small_cnn": Network("fashion_mnist_tuning", "fashion_mnist_tuned", ("kure_high",),
                         lazy="fashion_mnist_lazy"),
    "vgg": Network("vgg/tuning", "vgg", lazy="vgg/lazy"),
    "resnet18": Network("resnet18/tuning", "resnet18", ("l1_low",)),
    "mobilenetv2": Network("mobilenetv2/tuning", "mobilenetv2", ("low", "kure_high")),
}


def _table(name: str, arg: str = "") -> str:
  return os.path.join(TABLES, f"{name}.py") + (f":{arg}" if arg else "")


def _network(net: str) -> Network:
  if net not in NETWORKS:
    raise ValueError(f"--net={net}: expected one of {', '.join(NETWORKS)}.")
  return NETWORKS[net]


# Steps: each skips what is already done.

def tuned_choices(spec: str, root: str, out: str) -> dict[str, dict]:
  """The tuning sweep `spec` in root, then each method's choice on the validation split, written
  to out; returns {method: overrides} for the table sweep. With --tuning=committed: the choices
  the tuning wrote to out when it ran, and nothing trained."""
  if _tuning_source == "run":
    return tune.tune(run_sweep.run_sweep(spec, root), root, out)
  path = os.path.join(out, "choices.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--tuning=committed: {path} not found; run the tuning "
                            f"(--tuning=run) first.")
  logging.info("Tuned choices from %s (--tuning=committed): the tuning is not run.", path)
  return run_sweep.read_choices(path)


def both_protocols(root: str, out: str) -> None:
  """The sweep's tables under the paper protocol, then every run re-swept under the strong one
  and its tables."""
  print(make_tables.make_tables(root, os.path.join(out, "paper")), flush=True)
  reevaluate.reevaluate_sweep(root, "strong")
  print(make_tables.make_tables(root, os.path.join(out, "strong"),
                                reevaluate.results_name("strong")), flush=True)


def share_no_reg_runs(net_root: str, target: str, tuning: bool) -> None:
  """Links the network's finished no-reg runs (its tuning's, or its tuned table's seeds) into a
  supplementary sweep whose no-reg runs have the same configs."""
  if tuning:
    run_sweep.share_run(os.path.join(net_root, "tuning", "no-reg"),
                        os.path.join(net_root, target, "no-reg"))
    return
  for seed in tuned.SEEDS:
    run_sweep.share_run(os.path.join(net_root, "tuned", "no-reg", f"seed{seed}"),
                        os.path.join(net_root, target, "no-reg", f"seed{seed}"))


# Studies.

def resweeps(protocols: dict[str, tuple[str, ...] | None]) -> Callable[[str], None]:
  """run_sweep's after_run: a run just trained is re-swept under each protocol (where methods
  are given, only a run of one of them, by its labels), so that it is archived whole
  (experiments.archive)."""
  def after_run(run_dir: str) -> None:
    with open(os.path.join(run_dir, "run.json")) as f:
      method = json.load(f).get("labels", {}).get("method")
    for protocol, methods in protocols.items():
      if methods is None or method in methods:
        reevaluate.reevaluate_sweep(run_dir, protocol)
  return after_run


def chain(*hooks: Callable[[str], None]) -> Callable[[str], None]:
  """run_sweep's after_run: each hook in turn."""
  def after_run(run_dir: str) -> None:
    for hook in hooks:
      hook(run_dir)
  return after_run


STRONG = resweeps({"strong": None})
# The bound's tightness (experiments.bound_tightness) of a run of a table, measured as it ends
# while its checkpoint is there: an archived run keeps its tightness.json, not its checkpoint.
STRONG_TIGHTNESS = chain(STRONG, bound_tightness.measure)


def network_table(workdir: str, net: str,
                  protocols: dict[str, tuple[str, ...] | None] | None = None) -> None:
  """The tuned table; each run re-swept under the strong protocol (and `protocols`) as it ends."""
  network, root = _network(net), os.path.join(workdir, net)
  choices = tuned_choices(_table("tuning", f"net={net}"), os.path.join(root, "tuning"),
                          os.path.join(RESULTS, network.tuning))
  # The curves' runs at the tuned choices: their trainings reused, only the table's sweep run.
  share_from(curve_runs(root, net), root,
             run_sweep.load_sweep(_table("tuned", f"net={net}"), choices),
             os.path.join(root, "tuned"))
  run_sweep.run_sweep(_table("tuned", f"net={net}"), os.path.join(root, "tuned"),
                      choices=choices, after_run=chain(resweeps({"strong": None, **(protocols or {})}),
                                                       bound_tightness.measure))
  both_protocols(os.path.join(root, "tuned"), os.path.join(RESULTS, network.tables))
  if net in table1.NETWORKS:
    print(table1.write_table1(), flush=True)


def default_runs(workdir: str) -> str:
  """The default run and its no-reg twin (configs/tables/default.py); returns their root."""
  root = os.path.join(workdir, "small_cnn", "default")
  run_sweep.run_sweep(_table("default"), root)
  return root


def fair_protocol(workdir: str, net: str) -> None:
  del net
  network_table(workdir, "small_cnn")
  default = default_runs(workdir)
  ladder_out = os.path.join(RESULTS, "protocol_ladder")
  if not os.path.exists(os.path.join(ladder_out, "ladder.md")):  # written last
    print(reevaluate.ladder([os.path.join(default, "no_reg"), os.path.join(default, "l1")],
                            ["no-reg", "l1"], ladder_out), flush=True)
  tuned = os.path.join(workdir, "small_cnn", "tuned")
  reevaluate.reevaluate_sweep(tuned, "strong+adaround")
  print(make_tables.make_tables(
      tuned, os.path.join(RESULTS, NETWORKS["small_cnn"].tables, "strong_adaround"),
      reevaluate.results_name("strong+adaround")), flush=True)


def extend_grids(workdir: str, net: str) -> None:
  network = _network(net)
  if not network.extensions:
    raise ValueError(f"--net={net} has no grid extension; those with one: "
                     f"{', '.join(n for n, w in NETWORKS.items() if w.extensions)}.")
  for ext in network.extensions:
    grid_extension(workdir, net, ext)
  if net in table1.NETWORKS:
    print(table1.write_table1(), flush=True)


def multibit_qat(workdir: str, net: str) -> None:
  grid_extension(workdir, net, "multibit")
  if net in table1.NETWORKS:
    print(table1.write_table1(), flush=True)


def bound_penalty(workdir: str, net: str) -> None:
  grid_extension(workdir, net, "bound")
  root = os.path.join(workdir, net)
  if net != "small_cnn":  # the transfer test: SmallCNN's validation choices, unchanged
    choices = transferred_choices()
    sweep = run_sweep.load_sweep(_table("tuned", f"net={net}"), choices)
    share_tuned_runs(root, net, sweep, os.path.join(root, "bound_transfer"))
    run_sweep.run_sweep(sweep.spec, os.path.join(root, "bound_transfer"), choices=choices,
                        after_run=STRONG_TIGHTNESS)
    both_protocols(os.path.join(root, "bound_transfer"),
                   os.path.join(RESULTS, _network(net).tables, "bound_transfer"))
    print(bound_transfer.write_transfer(), flush=True)
  if (net, "bound_low") in tuning_config.EXTENSIONS:  # a form whose whole grid failed the budget
    grid_extension(workdir, net, "bound_low")  # a supplement, as the tuned table's low grids
  write_tightness(root, net)
  if net in table1.NETWORKS:
    print(table1.write_table1(), flush=True)


def write_tightness(root: str, net: str, rebuild: bool = False) -> None:
  """The bound's tightness of the network's tables' runs (experiments.bound_tightness)."""
  roots = [os.path.join(root, name) for name in ("tuned", "bound", "multibit")
           if os.path.isdir(os.path.join(root, name))]
  if not roots:
    raise FileNotFoundError(f"{root} has no tuned, bound or multibit runs: run the bound_penalty "
                            f"study on {net} first (with --archive, its runs are restored).")
  print(bound_tightness.write_tightness(
      roots, os.path.join(RESULTS, _network(net).tables, "bound", "tightness"), title=net,
      rebuild=rebuild), flush=True)


def tightness(workdir: str, net: str) -> None:
  """write_tightness for every run of the tables, a run restored without its trained model
  measured on its twin, retrained from its archived warm start (run_sweep.rebuild_twin)."""
  share_into_extensions(os.path.join(workdir, net), net)
  write_tightness(os.path.join(workdir, net), net, rebuild=True)


def transferred_choices() -> dict[str, dict]:
  """The bound forms' choices on SmallCNN's validation split, which bound_penalty's transfer
  test applies unchanged elsewhere."""
  return run_sweep.read_choices(os.path.join(
      RESULTS, NETWORKS["small_cnn"].tables, "bound", "tuning", "choices.json"))


def grid_extension(workdir: str, net: str, ext: str) -> None:
  """A grid of configs/tables/tuning.py beyond the tuning's (grid=ext): its tuning beside the
  tuning's no-reg run, and its choices' rows beside the tuned table's no-reg runs (trained
  first where they are gone), in experiments/results/<network's tables>/<ext>."""
  network, root = _network(net), os.path.join(workdir, net)
  out = os.path.join(RESULTS, network.tables, ext)
  spec, tuning_root = _table("tuning", f"net={net},grid={ext}"), os.path.join(root, f"{ext}_tuning")
  # The pre-registered tuning's runs that the grid has too (its no-reg run; kure_high's first
  # values) and lacks: trained there where they are gone, and linked in (with --tuning=run).
  tuning_sweep = run_sweep.load_sweep(_table("tuning", f"net={net}"))
  shared = {source: name for source, name in
            same_training(tuning_sweep, run_sweep.load_sweep(spec)).items()
            if not os.path.lexists(os.path.join(tuning_root, name))}
  if shared and _tuning_source == "run":
    run_sweep.run_sweep(tuning_sweep.spec, os.path.join(root, "tuning"), only=sorted(shared))
    share_runs(os.path.join(root, "tuning"), shared, tuning_root, run_sweep.load_sweep(spec))
  choices = tuned_choices(spec, tuning_root, os.path.join(out, "tuning"))
  # The tuned table's no-reg runs (trained first where they are gone), and a choice that is the
  # tuned table's (or another extension's), take that table's runs.
  share_tuned_runs(root, net, run_sweep.load_sweep(_table("tuned", f"net={net}"), choices),
                   os.path.join(root, ext))
  run_sweep.run_sweep(_table("tuned", f"net={net}"), os.path.join(root, ext), choices=choices,
                      after_run=STRONG_TIGHTNESS)
  both_protocols(os.path.join(root, ext), out)


def lazy_parity(workdir: str, net: str) -> None:
  network, root = _network(net), os.path.join(workdir, net)
  if network.lazy is None:
    raise ValueError(f"--net={net}: the lazy schedules are run on "
                     f"{', '.join(n for n, w in NETWORKS.items() if w.lazy)}.")
  out = os.path.join(RESULTS, network.lazy)
  share_no_reg_runs(root, "lazy_tuning", tuning=True)
  share_no_reg_runs(root, "lazy", tuning=False)
  retuned = tuned_choices(_table("tuning", f"net={net},grid=lazy"),
                          os.path.join(root, "lazy_tuning"), os.path.join(out, "tuning"))
  l1 = run_sweep.read_choices(os.path.join(RESULTS, network.tuning, "choices.json"))["l1"]
  choices = {"l1": l1, **{f"{method}-retuned": o for method, o in retuned.items()}}
  run_sweep.run_sweep(_table("lazy", f"net={net}"), os.path.join(root, "lazy"), choices=choices)
  print(make_tables.make_tables(os.path.join(root, "lazy"), out), flush=True)


def default_comparison(workdir: str, net: str) -> None:
  del net
  root, out = default_runs(workdir), os.path.join(RESULTS, "default_comparison")
  os.makedirs(out, exist_ok=True)
  results, labels = [], []
  for per_channel in (False, True):
    for run, label in (("no_reg", "no-reg"), ("l1", "l1")):
      run_dir, name = os.path.join(root, run), f"{run}_per_channel" if per_channel else run
      if per_channel:
        path = os.path.join(run_dir, "results_per_channel.json")
        if not run_sweep.is_finished(run_dir, "results_per_channel.json"):
          report.write_json_atomic(path, reevaluate.protocol_results(
              run_dir, {"quant.per_channel": True}))
      else:
        path = os.path.join(run_dir, "results.json")
      results.append(report.read_finished_results(path))
      labels.append(f"{label} {'per-channel' if per_channel else 'per-tensor'}")
      report.write_json_atomic(os.path.join(out, f"{name}.json"), results[-1])
      report.plot_accuracy([results[-1]], [name], os.path.join(out, f"{name}.png"))
  print(report.write_comparison(results, labels, out), flush=True)
  l1 = os.path.join(root, "l1")
  lines = ["| file | bytes | ratio to float32 folded params |", "|---|---|---|"]
  for bits in (8, 6, 4):
    path = os.path.join(root, f"l1_w{bits}.npz")
    sizes = export.export_workdir(l1, bits, path)
    lines.append(f"| {bits}-bit export (.npz) | {sizes['export_bytes']:,} | "
                 f"{sizes['export_bytes'] / sizes['float_params_bytes']:.3f} "
                 f"(ideal {bits}/32 = {bits / 32:.3f}) |")
    evaluate.evaluate_export(checkpoint.read_run_config(l1), l1, path)
    shutil.copy(os.path.join(l1, f"export_w{bits}_results.md"), out)
  last = max(int(step) for step in os.listdir(os.path.join(l1, "checkpoints")) if step.isdigit())
  checkpoint_dir = os.path.join(l1, "checkpoints", str(last))
  checkpoint_bytes = sum(os.path.getsize(os.path.join(d, f))
                         for d, _, files in os.walk(checkpoint_dir) for f in files)
  lines += [f"| float32 folded params | {sizes['float_params_bytes']:,} | 1 |",
            f"| orbax checkpoint (params, BN stats, optimizer state) | {checkpoint_bytes:,} | |"]
  report.write_text_atomic(os.path.join(out, "export_sizes.md"), "\n".join(lines) + "\n")


def lambda_search(workdir: str, net: str) -> None:
  del net
  root = os.path.join(workdir, "small_cnn", "lambda_search")
  sweep = run_sweep.run_sweep(_table("lambda_search"), root)
  names = [run["name"] for run in sweep.runs]
  print(report.compare([os.path.join(root, name) for name in names], names,
                       os.path.join(RESULTS, "lambda_search")), flush=True)


def ablations(workdir: str, net: str) -> None:
  network, root = _network(net), os.path.join(workdir, net)
  l1 = {"l1": run_sweep.read_choices(os.path.join(RESULTS, network.tuning, "choices.json"))["l1"]}
  spec, runs = _table("ablations", f"net={net}"), os.path.join(root, "ablations")
  share_tuned_runs(root, net, run_sweep.load_sweep(spec, choices=l1), runs)
  run_sweep.run_sweep(spec, runs, choices=l1, after_run=STRONG)
  out = os.path.join(RESULTS, network.tables, "ablations")
  both_protocols(runs, out)
  for protocol, name in (("paper", "results.json"), ("strong", reevaluate.results_name("strong"))):
    by_method = make_tables.collect(runs, name)
    # The reference runs are the tuned table's l1 runs, linked in: they keep their label, "l1".
    reference = next(m for m in (ablations_config.REFERENCE, "l1") if m in by_method)
    make_tables.write_gains(by_method, make_tables.summarize(by_method)[1],
                            os.path.join(out, protocol), "gains_vs_reference", reference)


def tuned_no_reg_runs(root: str, net: str) -> run_sweep.Sweep:
  """The tuned table's no-reg runs, trained where they are gone; returns the tuned sweep (its
  choices from the committed tuning)."""
  choices = run_sweep.read_choices(os.path.join(RESULTS, _network(net).tuning, "choices.json"))
  return run_sweep.run_sweep(_table("tuned", f"net={net}"), os.path.join(root, "tuned"),
                             choices=choices, only=[f"no-reg/seed{seed}" for seed in tuned.SEEDS],
                             after_run=STRONG_TIGHTNESS)


# Grid extensions whose rows are the tuned table's runs at their own choices (grid_extension).
TABLE_EXTENSIONS = ("multibit", "bound")


def share_tuned_runs(root: str, net: str, sweep: run_sweep.Sweep, sweep_root: str) -> None:
  """Links into sweep_root the runs of the tuned table, of its extensions' tables, of the bound
  forms' transfer test and of the trade-off curves that train as one of the sweep's runs does
  (same config but the sweep's bit settings; share_runs); the tuned table's no-reg runs are
  trained first where they are gone."""
  tables = {"tuned": tuned_no_reg_runs(root, net), **extension_tables(root, net)}
  if net != "small_cnn" and os.path.isdir(os.path.join(root, "bound_transfer")):
    tables["bound_transfer"] = run_sweep.load_sweep(_table("tuned", f"net={net}"),
                                                    transferred_choices())
  share_from({**tables, **curve_runs(root, net)}, root, sweep, sweep_root)


def extension_tables(root: str, net: str) -> dict[str, run_sweep.Sweep]:
  """{ext: the tuned table at ext's committed choices} for each extension with runs in root."""
  tables = {}
  for ext in TABLE_EXTENSIONS:
    choices = os.path.join(RESULTS, _network(net).tables, ext, "tuning", "choices.json")
    if os.path.isdir(os.path.join(root, ext)) and os.path.exists(choices):
      tables[ext] = run_sweep.load_sweep(_table("tuned", f"net={net}"),
                                         run_sweep.read_choices(choices))
  return tables


def share_into_extensions(root: str, net: str) -> None:
  """Links the tuned table's runs into each extension's table, as grid_extension does, where a
  workdir restored from the archive lacks them: its runs' twins start from their no-reg runs'
  checkpoints (run_sweep.rebuild_twin)."""
  for ext, sweep in extension_tables(root, net).items():
    share_tuned_runs(root, net, sweep, os.path.join(root, ext))


def curve_runs(root: str, net: str) -> dict[str, run_sweep.Sweep]:
  """{"tradeoff": the trade-off curves' sweep} where the network's curves have runs."""
  if net in tradeoff_config.GRIDS and os.path.isdir(os.path.join(root, "tradeoff")):
    return {"tradeoff": run_sweep.load_sweep(_table("tradeoff", f"net={net}"))}
  return {}


def share_from(sources: dict[str, run_sweep.Sweep], root: str, sweep: run_sweep.Sweep,
               sweep_root: str) -> None:
  """share_runs from each source sweep (root/<name>) other than sweep_root itself."""
  for name, source in sources.items():
    if os.path.join(root, name) != sweep_root:
      share_runs(os.path.join(root, name), same_training(source, sweep), sweep_root, sweep)


def same_training(source: run_sweep.Sweep, sweep: run_sweep.Sweep) -> dict[str, str]:
  """{source run name: sweep run name} of the sweep's runs that train as a source run does."""
  trained = {}
  for run in source.runs:
    trained.setdefault(_training_key(source.config(run)), run["name"])
  return {trained[key]: run["name"] for run in sweep.runs
          if (key := _training_key(sweep.config(run))) in trained}


def share_runs(source_root: str, names: dict[str, str], sweep_root: str,
               sweep: run_sweep.Sweep) -> None:
  """Links each finished source run into sweep_root under its name there (names: same_training).
  Where the source did not measure every bit setting of the sweep's run, its training is reused
  instead: the run starts from the source's last checkpoint, and only its sweep is run."""
  for source, name in names.items():
    source_dir, run_dir = os.path.join(source_root, source), os.path.join(sweep_root, name)
    results = report.read_finished_results(os.path.join(source_dir, "results.json"))
    if results is None:
      continue
    config = sweep.config(sweep.run(name))
    measured = {(row["weight_bits"], row["act_bits"]) for row in results["rows"]}
    if measured >= {tuple(setting) for setting in config.quant.bit_settings}:
      run_sweep.share_run(source_dir, run_dir)
    elif run_sweep.reuse_training(source_dir, run_dir, config):
      logging.info("%s reuses %s's training: only its sweep runs.", run_dir, source_dir)


def tradeoff_runs(workdir: str, net: str) -> str:
  """The trade-off grids' runs, both protocols; returns their root. The tuned table's no-reg
  runs are trained where they are gone, and its runs at a grid value are linked in. Each run is
  re-swept under the strong protocol as soon as it is trained (and then archived)."""
  _network(net)
  root = os.path.join(workdir, net)
  spec, curves_root = _table("tradeoff", f"net={net}"), os.path.join(root, "tradeoff")
  share_tuned_runs(root, net, run_sweep.load_sweep(spec), curves_root)
  run_sweep.run_sweep(spec, curves_root, after_run=STRONG)
  reevaluate.reevaluate_sweep(curves_root, "strong")
  return curves_root


def _training_key(config) -> str:
  """What decides a run's training: its config but the sweep's bit settings."""
  config = config.copy_and_resolve_references()
  del config.quant["bit_settings"]
  return config.to_json_best_effort(sort_keys=True)


def tradeoff(workdir: str, net: str) -> None:
  root = tradeoff_runs(workdir, net)
  print(curves.write_curves(root, os.path.join(RESULTS, _network(net).tables, "tradeoff"), net),
        flush=True)


# The re-sweeps of the deployment studies, each on the table's runs of its methods.
MIXED = {"mixed": mixed_report.METHODS}
CLE = {protocol: cle_report.METHODS for protocol in ("cle", "cle+bias_correction")}


def deployment(workdir: str, net: str) -> None:
  """cle_ladder and mixed_precision on one training of the table: each run re-swept under both
  as it ends, so that its archived records serve both (a restored run has no checkpoint)."""
  network_table(workdir, net, {**CLE, **MIXED})
  cle_ladder(workdir, net)
  mixed_precision(workdir, net)


def mixed_precision(workdir: str, net: str) -> None:
  network_table(workdir, net, MIXED)
  root = os.path.join(workdir, net, "tuned")
  for method in mixed_report.METHODS:
    reevaluate.reevaluate_sweep(os.path.join(root, method), "mixed")
  print(mixed_report.write_mixed(root, os.path.join(RESULTS, _network(net).tables,
                                                    "mixed_precision")), flush=True)


def cle_ladder(workdir: str, net: str) -> None:
  network_table(workdir, net, CLE)
  root = os.path.join(workdir, net, "tuned")
  out = os.path.join(RESULTS, _network(net).tables, "cle")
  for protocol in ("cle", "cle+bias_correction"):
    for method in cle_report.METHODS:
      reevaluate.reevaluate_sweep(os.path.join(root, method), protocol)
  print(cle_report.write_ladder(root, out), flush=True)


def drift_runs(workdir: str, net: str) -> None:
  """The bound form from the start (configs/tables/drift.py) beside the uniform penalty's runs,
  each against its seed's no-reg run: experiments.drift's tables."""
  network, root = _network(net), os.path.join(workdir, net)
  path = os.path.join(RESULTS, network.tables, "bound", "tuning", "choices.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the bound_penalty study on {net} first.")
  choices = run_sweep.read_choices(path)
  sweep = run_sweep.load_sweep(_table("drift", f"net={net}"), choices)
  share_tuned_runs(root, net, sweep, os.path.join(root, "drift"))
  # The uniform penalty from the start: the ablations' runs, trained here where they are gone.
  l1 = {"l1": run_sweep.read_choices(os.path.join(RESULTS, network.tuning, "choices.json"))["l1"]}
  ablations_sweep = run_sweep.load_sweep(_table("ablations", f"net={net}"), l1)
  # Each worker trains what is free in both sweeps before it waits for the others' runs.
  for wait in (False, True):
    run_sweep.run_sweep(sweep.spec, os.path.join(root, "drift"), choices=choices, wait=wait)
    run_sweep.run_sweep(ablations_sweep.spec, os.path.join(root, "ablations"), choices=l1,
                        only=[r["name"] for r in ablations_sweep.runs
                              if r["labels"]["method"] == ablations_config.FROM_THE_START],
                        after_run=STRONG, wait=wait)
  share_into_extensions(root, net)  # the bound table's twins start from its no-reg runs
  sets = (("bound from the start", os.path.join(root, "drift", "bound_from_the_start")),
          ("bound last epoch", os.path.join(root, "bound", "bound")),
          ("l1 from the start", os.path.join(root, "ablations", "l1_both_from_the_start")),
          ("l1 last epoch", os.path.join(root, "tuned", "l1")))
  references, runs, labels = [], [], []
  for label, run_root in sets:
    for seed in tuned.SEEDS:
      run_dir = os.path.join(run_root, f"seed{seed}")
      if run_sweep.is_finished(run_dir):
        references.append(os.path.join(root, "tuned", "no-reg", f"seed{seed}"))
        runs.append(run_dir)
        labels.append(label)
  print(drift.drift(references, runs, labels, os.path.join(RESULTS, network.tables, "drift_bound"),
                    rebuild=True), flush=True)


def write_table1(workdir: str, net: str) -> None:
  del workdir, net
  print(table1.write_table1(), flush=True)


STUDIES = {
    "network_table": network_table,
    "fair_protocol": fair_protocol,
    "extend_grids": extend_grids,
    "lazy_parity": lazy_parity,
    "default_comparison": default_comparison,
    "lambda_search": lambda_search,
    "ablations": ablations,
    "tradeoff": tradeoff,
    "multibit_qat": multibit_qat,
    "bound_penalty": bound_penalty,
    "mixed_precision": mixed_precision,
    "cle_ladder": cle_ladder,
    "deployment": deployment,
    "drift": drift_runs,
    "tightness": tightness,
    "table1": write_table1,
}


# Where a network's tuned choices come from (--tuning).
TUNING_SOURCES = ("run", "committed")
_tuning_source = "run"


def run_study(name: str, workdir: str, net: str = "small_cnn", tuning: str = "run",
              archive_dir: str | None = None) -> None:
  """Runs a study. tuning='committed' takes each network's tuned choices from its committed
  choices.json instead of training its tuning: a table whose workdir is gone is retrained at
  about half the cost, at the choices its validation tuning made when it ran. archive_dir:
  experiments.archive's root (restored into the workdir first; each run archived as it ends)."""
  global _tuning_source
  if name not in STUDIES:
    raise ValueError(f"unknown study {name!r}: expected one of {', '.join(STUDIES)}.")
  if tuning not in TUNING_SOURCES:
    raise ValueError(f"--tuning={tuning}: expected one of {', '.join(TUNING_SOURCES)}.")
  logging.info("Study %s (net %s, tuning %s) in %s.", name, net, tuning, os.path.abspath(workdir))
  _tuning_source = tuning
  archive.configure(workdir, archive_dir)
  try:
    if archive_dir:
      os.makedirs(workdir, exist_ok=True)
      restored, archived = archive.sync(net)
      logging.info("Archive %s: %d runs restored into the workdir, %d archived.", archive_dir,
                   restored, archived)
    STUDIES[name](os.path.abspath(workdir), net)
  finally:
    _tuning_source = "run"
    archive.configure(None, None)


def _main(argv) -> None:
  if len(argv) != 2:
    raise ValueError(f"name one study: python -m experiments.study <study>, with <study> one of "
                     f"{', '.join(STUDIES)}.")
  cli.configure_logging()
  run_study(argv[1], _WORKDIR.value, _NET.value, _TUNING.value, _ARCHIVE.value or None)


if __name__ == "__main__":
  _NET = flags.DEFINE_string("net", "small_cnn", f"Network: {', '.join(NETWORKS)}.")
  _WORKDIR = flags.DEFINE_string("workdir", "workdirs/studies", "Root of the studies' runs.")
  _TUNING = flags.DEFINE_string(
      "tuning", "run", "Where the tuned choices come from: 'run' (train the validation tuning, "
      "what is unfinished of it, and choose) or 'committed' (the choices.json it wrote when it "
      "ran, under experiments/results; nothing of the tuning is trained).")
  _ARCHIVE = flags.DEFINE_string(
      "archive", "", "Keep each finished run's records (and warm-start checkpoints) under this "
      "folder, e.g. experiments/runs, and restore them into a fresh workdir (experiments.archive).")
  cli.run(_main, positional_args=1)
