"""The first regularized steps of a bound-form run, step by step (issue 23): why the folded
forms' task loss jumps in their first steps at 8 bits on VGG-like and ResNet-18.

    python -m experiments.bound_first_steps --run=experiments/runs/vgg/bound_transfer/bound/seed0 \
        --start=experiments/runs/vgg/tuned/no-reg/seed0 --steps=30 \
        --out=experiments/results/vgg/bound/first_steps

Each variant of the run's config starts from the same checkpoint, --start's at the run's
reg.start_epoch (a workdir or its archive, as the run warm-started), and takes --steps steps of
its regularized step on the run's own batches, in the training loop's order (qreg.train's parts,
not a copy of them): each step's task loss, bound terms and gradient norm, as the run's
metrics.jsonl would log them with train.log_every_steps=1. The variants (VARIANTS) each change
one thing:

- `bn momentum 0`: BatchNorm's running statistics become the last batch's, so the fold the bound
  is taken on does not lag the weights (the lag of running statistics as the cause);
- `learning rate / 4`: the same penalty with smaller steps (a step-size instability as the cause);
- `10 bits`, `layer_bound`: the strength the validation chose, and the same steps unfolded.

Writes first_steps.json (every variant's per-step values), first_steps.md and first_steps.png.
"""
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import jax
import matplotlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from experiments import run_sweep
from qreg import checkpoint, cli, parallel, report, train
from qreg import config as config_lib
from qreg.models import layers

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

KEYS = ("task_loss", "bound_weights", "bound_activations", "grad_norm")
# name -> overrides of the run's config; "bn_momentum" sets BatchNorm's momentum instead.
VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], dict]] = {
    "as run": lambda c: {},
    "bn momentum 0": lambda c: {"bn_momentum": 0.0},
    "learning rate / 4": lambda c: {"optim.learning_rate": c.optim.learning_rate / 4},
    "10 bits": lambda c: {"reg.bound_bits": 10},
    "layer_bound": lambda c: {"reg.form": "layer_bound"},
}


def start_checkpoint(config: ml_collections.ConfigDict, start: str) -> str:
  """The step folder of start's checkpoint at config.reg.start_epoch."""
  step_dir = run_sweep.start_checkpoint(config, start)
  if not os.path.isdir(step_dir):
    raise FileNotFoundError(f"No checkpoint {step_dir}: --start must be the run (its workdir or "
                            "archived folder) the bound run warm-started from.")
  return step_dir


def first_steps(config: ml_collections.ConfigDict, step_dir: str, steps: int,
                bn_momentum: float | None = None) -> list[dict[str, float]]:
  """Each of the first `steps` regularized steps' metrics from the checkpoint in step_dir."""
  if not config.reg.start_epoch:
    raise ValueError("the run is regularized from the start: there is no warm start to take.")
  saved = layers.BN_MOMENTUM
  if bn_momentum is not None:
    layers.BN_MOMENTUM = bn_momentum  # read when the model is traced
  try:
    setup = train.training_setup(config)
    with tempfile.TemporaryDirectory() as workdir:
      shutil.copytree(step_dir, os.path.join(workdir, "checkpoints", os.path.basename(step_dir)))
      init = functools.partial(train.create_train_state, model=setup.model,
                               optimizer=setup.optimizer,
                               image_shape=setup.pipeline.info.image_shape)
      state = jax.jit(init, out_shardings=parallel.replicated(setup.mesh))(
          jax.random.key(config.seed))
      state = checkpoint.restore_latest(checkpoint.checkpoint_manager(workdir), jax.tree.map(
          ocp.utils.to_shape_dtype_struct, state))
    start = int(state.step)
    if start != setup.reg_start_step:
      raise ValueError(f"{step_dir} is step {start}, not the run's first regularized step "
                       f"{setup.reg_start_step}.")
    step_fn = train.jit_train_step(setup.method.regularized, setup.mesh, state)
    batches = parallel.prefetch_to_mesh(
        setup.pipeline.train_batches(config.data.batch_size, config.seed, start), setup.mesh)
    rows = []
    for _ in range(steps):
      state, metrics = step_fn(state, next(batches))
      metrics = jax.device_get(metrics)
      rows.append({key: float(metrics[key]) for key in KEYS if key in metrics})
    return rows
  finally:
    layers.BN_MOMENTUM = saved


def run_variants(run: str, start: str, steps: int,
                 variants: Mapping[str, Callable] = VARIANTS) -> dict:
  config = checkpoint.read_run_config(run)
  step_dir = start_checkpoint(config, start)
  out = {"run": run, "start": step_dir, "steps": steps, "variants": {}}
  for name, changes in variants.items():
    overrides = changes(config)
    momentum = overrides.pop("bn_momentum", None)
    print(f"=== {name} ===", flush=True)
    out["variants"][name] = {"overrides": overrides, "bn_momentum": momentum,
                             "steps": first_steps(config_lib.with_overrides(config, overrides),
                                                  step_dir, steps, momentum)}
  out["environment"] = report.environment()
  return out


def markdown(record: dict, at=(1, 2, 3, 5, 10, 20, 30)) -> str:
  at = [s for s in at if s <= record["steps"]]
  lines = [f"The first {record['steps']} regularized steps of `{record['run']}` from "
           f"`{record['start']}`; per variant the task loss after each of steps "
           f"{', '.join(map(str, at))}, then B (weights + activations, the penalty's value at its "
           "reference width) and the gradient norm at their largest.", "",
           "| variant | task loss at " + " / ".join(map(str, at)) + " | largest B | largest "
           "gradient norm |", "|---|---|---|---|"]
  for name, variant in record["variants"].items():
    rows = variant["steps"]
    loss = " / ".join(f"{rows[s - 1]['task_loss']:.3f}" for s in at)
    bound = max(r.get("bound_weights", 0) + r.get("bound_activations", 0) for r in rows)
    lines.append(f"| {name} | {loss} | {bound:.3f} | "
                 f"{max(r['grad_norm'] for r in rows):.1f} |")
  return "\n".join(lines) + "\n"


def plot(record: dict, path: str) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name, variant in record["variants"].items():
    rows = variant["steps"]
    steps = np.arange(1, len(rows) + 1)
    axes[0].plot(steps, [r["task_loss"] for r in rows], label=name)
    axes[1].plot(steps, [r.get("bound_weights", 0) + r.get("bound_activations", 0)
                         for r in rows], label=name)
    axes[2].plot(steps, [r["grad_norm"] for r in rows], label=name)
  for ax, title in zip(axes, ("task loss", "B (weights + activations)", "gradient norm")):
    ax.set_title(title)
    ax.set_xlabel("regularized step")
    ax.set_yscale("log")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(record: dict, out: str) -> str:
  os.makedirs(out, exist_ok=True)
  report.write_json_atomic(os.path.join(out, "first_steps.json"), record)
  text = markdown(record)
  report.write_text_atomic(os.path.join(out, "first_steps.md"), text)
  plot(record, os.path.join(out, "first_steps.png"))
  return text


def _main(argv) -> None:
  del argv
  print(write(run_variants(_RUN.value, _START.value, _STEPS.value), _OUT.value))


if __name__ == "__main__":
  _RUN = flags.DEFINE_string("run", None, "A bound-form run (its config.json).", required=True)
  _START = flags.DEFINE_string("start", None, "The run it warm-started from (workdir or "
                               "archive).", required=True)
  _STEPS = flags.DEFINE_integer("steps", 30, "Regularized steps per variant.")
  _OUT = flags.DEFINE_string("out", None, "Where the results go.", required=True)
  cli.run(_main)
