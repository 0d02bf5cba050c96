"""The training loop: jitted data-parallel step, checkpoints, metrics, then the PTQ sweep."""
import contextlib
import functools
import json
import logging as std_logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from qreg import data, evaluate, models, objectives, parallel, quant, report

PyTree = Any

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
# Config fields that a checkpoint's array shapes depend on (data.name: input channels and
# classes); a workdir's checkpoints only resume under the same values.
CHECKPOINT_SHAPE_FIELDS = ("data.name", "model.name", "model.stem", "optim.name")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def build_optimizer(optim_config: ml_collections.ConfigDict, total_steps: int,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """Optimizer and learning-rate schedule from config.optim; weight decay on kernels only."""
  warmup_steps = int(optim_config.get("warmup_epochs", 0) * steps_per_epoch)
  lr = optim_config.learning_rate
  if optim_config.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  elif optim_config.schedule == "constant":
    after_warmup = optax.constant_schedule(lr)
  else:
    raise ValueError(f"Unknown optim.schedule {optim_config.schedule!r}; expected one of {SCHEDULES}.")
  schedule = after_warmup if warmup_steps == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup_steps), after_warmup], [warmup_steps])

  decay = optim_config.get("weight_decay", 0.0)
  if optim_config.name == "sgd":
    return optax.chain(optax.add_decayed_weights(decay, objectives.kernel_mask),
                       optax.sgd(schedule, momentum=optim_config.momentum, nesterov=True))
  if optim_config.name == "adam":
    return optax.chain(optax.add_decayed_weights(decay, objectives.kernel_mask),
                       optax.adam(schedule))
  if optim_config.name == "adamw":
    return optax.adamw(schedule, weight_decay=decay, mask=objectives.kernel_mask)
  raise ValueError(f"Unknown optim.name {optim_config.name!r}; expected one of {OPTIMIZERS}.")


def create_train_state(rng: jax.Array, model, optimizer: optax.GradientTransformation,
                       image_shape: tuple[int, ...]) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=optimizer.init(params))


def make_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation,
                    penalty: objectives.Penalty | None, lambda_kurtosis: float = 0.0):
  """One optimizer step on a global batch; penalty=None is the plain (unregularized) step.

  lambda_kurtosis > 0 adds KURE's weight-kurtosis term to the objective.
  """
  if penalty is None:
    value_and_grad = functools.partial(objectives.plain_value_and_grad, apply_fn=apply_fn)
  else:
    value_and_grad = functools.partial(objectives.penalized_value_and_grad, apply_fn=apply_fn,
                                       penalty=penalty)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    (loss, (batch_stats, logits, terms)), grads = value_and_grad(
        state.params, state.batch_stats, batch)
    if lambda_kurtosis:
      kurtosis, kurtosis_grads = jax.value_and_grad(objectives.kurtosis_penalty)(state.params)
      loss = loss + lambda_kurtosis * kurtosis
      grads = jax.tree.map(lambda g, k: g + lambda_kurtosis * k, grads, kurtosis_grads)
      terms = dict(terms, kurtosis_penalty=kurtosis)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads),
                   accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def quantization_aware_apply_fn(model, weight_bits: int | None, act_bits: int | None,
                                setup: "evaluate.QuantSetup") -> Callable:
  """model.apply with straight-through fake quantization, for QAT (the STE baseline).

  Kernels are fake-quantized with the sweep's weight scheme (on the unfolded
  layers: BatchNorm is folded only after training); activations at every
  tapped point with each batch's own min-max range.
  """
  qat_model = model.clone(act_bits=act_bits, act_scheme=setup.act_scheme,
                          act_straight_through=act_bits is not None)

  def apply_fn(variables, images, **kwargs):
    params = variables["params"]
    if weight_bits is not None:
      quantized = setup.quantize_weights(params, weight_bits)
      params = jax.tree.map(quant.straight_through, params, quantized)
    return qat_model.apply(dict(variables, params=params), images, **kwargs)

  return apply_fn


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, state: TrainState):
  """jax.jit with explicit shardings: state replicated, batch split over `data`."""
  state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  return jax.jit(train_step,
                 in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)),
                 donate_argnums=0)


def _check_non_negative(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < 0:
    raise ValueError(f"{name}={value!r} must be a finite number >= 0.")


def build_penalty(reg_config: ml_collections.ConfigDict) -> objectives.Penalty | None:
  """The penalty from config.reg, or None when both weights are zero (the plain step)."""
  for name in ("lambda_w", "lambda_a"):
    _check_non_negative(f"reg.{name}", reg_config[name])
  if reg_config.impl not in objectives.IMPLS:
    raise ValueError(f"Unknown reg.impl {reg_config.impl!r}; expected one of {objectives.IMPLS}.")
  if reg_config.norm not in objectives.NORMS:
    raise ValueError(f"Unknown reg.norm {reg_config.norm!r}; expected one of {objectives.NORMS}.")
  fd_step = reg_config.fd_step
  if not isinstance(fd_step, (int, float)) or not math.isfinite(fd_step) or fd_step <= 0:
    raise ValueError(f"reg.fd_step={fd_step!r} must be a finite number > 0.")
  if reg_config.lambda_w == 0 and reg_config.lambda_a == 0:
    return None
  return objectives.Penalty(float(reg_config.lambda_w), float(reg_config.lambda_a),
                            reg_config.impl, float(fd_step), reg_config.norm)


def build_method_step(config: ml_collections.ConfigDict, model,
                      optimizer: optax.GradientTransformation) -> Callable | None:
  """The train step used from reg.start_epoch on: gradient penalty, KURE and/or STE QAT.

  None when the config asks for none of them (plain training throughout).
  """
  penalty = build_penalty(config.reg)
  _check_non_negative("reg.lambda_kurtosis", config.reg.lambda_kurtosis)
  weight_bits, act_bits = config.qat.weight_bits, config.qat.act_bits
  quant.check_bits(weight_bits, "qat.weight_bits")
  quant.check_bits(act_bits, "qat.act_bits")
  if penalty is None and not config.reg.lambda_kurtosis and weight_bits is None and act_bits is None:
    return None
  apply_fn = model.apply
  if weight_bits is not None or act_bits is not None:
    apply_fn = quantization_aware_apply_fn(model, weight_bits, act_bits,
                                           evaluate.build_quant_setup(config.quant))
  return make_train_step(apply_fn, optimizer, penalty, float(config.reg.lambda_kurtosis))


def _checkpoint_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
  """The newest checkpoint that restores onto abstract_state's structure and shardings.

  A damaged or partly written checkpoint (a full disk, a copy cut short) is
  skipped with a warning in favour of the one before it. Returns None when
  there is no checkpoint; raises RuntimeError when there are some but none restores.
  """
  unfinished = [name for name in os.listdir(manager.directory) if ocp.utils.TMP_DIR_SUFFIX in name]
  if unfinished:
    logging.warning("Ignoring unfinished checkpoint writes in %s (the process died while saving): %s",
                    manager.directory, ", ".join(sorted(unfinished)))
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises several types for a mismatched or damaged checkpoint
      reason = f"{type(e).__name__}: {str(e)[:500]}"
      failures.append(f"step {step}: {reason}")
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the previous one.",
                      step, manager.directory, reason)
      continue
    if failures:
      logging.warning("Restored checkpoint step %d instead of the damaged newer one(s).", step)
    return state
  if failures:
    raise RuntimeError(
        f"No checkpoint in {manager.directory} can be restored:\n  " + "\n  ".join(failures) +
        "\nThey were written by a different model/optimizer config or are damaged; use a fresh "
        "--workdir, or move the checkpoints directory away to start over.")
  return None


def _set_aside_newer_checkpoints(manager: ocp.CheckpointManager, step: int, workdir: str) -> None:
  """Moves the checkpoints newer than `step` (they failed to restore) to workdir/damaged_checkpoints.

  Left in place they would shadow the checkpoints this run writes at the same steps.
  """
  newer = [s for s in manager.all_steps() if s > step]
  if not newer:
    return
  if jax.process_index() == 0:
    target_dir = os.path.join(workdir, "damaged_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    for damaged in newer:
      target = os.path.join(target_dir, f"{damaged}-{time.strftime('%Y%m%d-%H%M%S')}")
      shutil.move(os.fspath(manager.directory / str(damaged)), target)
      logging.warning("Moved the unrestorable checkpoint step %d to %s; training goes on from "
                      "step %d.", damaged, target, step)
  multihost_utils.sync_global_devices("qreg: damaged checkpoints set aside")
  manager.reload()


def _config_value(config: ml_collections.ConfigDict | dict, field: str):
  section, key = field.split(".")
  return config.get(section, {}).get(key)


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError when workdir's checkpoints come from a config with other array shapes.

  Compares the fields in CHECKPOINT_SHAPE_FIELDS with workdir/config.json (written
  with the checkpoints), so the message names what differs.
  """
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:
    logging.warning("Cannot read %s (%s); not checking that its checkpoints match this config.",
                    path, e)
    return
  differences = [f"{field}={_config_value(config, field)!r} here but "
                 f"{_config_value(stored, field)!r} there"
                 for field in CHECKPOINT_SHAPE_FIELDS
                 if _config_value(stored, field) is not None
                 and _config_value(stored, field) != _config_value(config, field)]
  if differences:
    raise ValueError(
        f"{workdir} holds checkpoints of a different run ({'; '.join(differences)}; see {path}). "
        "They cannot be resumed with this config: pass another --workdir, or the run's own "
        "values to resume it.")


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError, naming the field, for values the build_* functions do not check.

  Runs before anything is written, so that a mistyped value costs no work.
  """
  for field, minimum in (("train.num_epochs", 1), ("train.log_every_steps", 1),
                         ("train.checkpoint_every_steps", 0), ("train.checkpoints_to_keep", 2),
                         ("reg.start_epoch", 0)):
    value = _config_value(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"{field}={value!r} must be an integer >= {minimum}.")
  lr = config.optim.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"optim.learning_rate={lr!r} must be a finite number > 0.")
  parallel.check_batch_size(config.data.batch_size, mesh, "data.batch_size")
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  evaluate.parse_bit_settings(config.quant.bit_settings)
  evaluate.build_quant_setup(config.quant)
  quant.check_bits(config.quant.sensitivity_bits, "quant.sensitivity_bits")
  if (config.reg.start_epoch >= config.train.num_epochs
      and (config.reg.lambda_w != 0 or config.reg.lambda_a != 0)):
    logging.warning("reg.start_epoch=%d >= train.num_epochs=%d: the regularizer never runs.",
                    config.reg.start_epoch, config.train.num_epochs)


class Preempted(Exception):
  """Training stopped on SIGTERM after checkpointing; rerunning the same command resumes it."""


@contextlib.contextmanager
def _sigterm_sets_flag():
  """While active, SIGTERM sets the yielded Event instead of killing the process.

  Not under jax.distributed, whose preemption service owns SIGTERM and picks a
  step that all processes reach (CheckpointManager.reached_preemption).
  """
  received = threading.Event()
  if jax.distributed.is_initialized() or threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
  try:
    yield received
  finally:
    signal.signal(signal.SIGTERM, previous)


def _check_finite(metrics: dict[str, float], step: int) -> None:
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"Non-finite training metrics at step {step}: {bad}. Training stopped before "
        "checkpointing it; lower optim.learning_rate or reg.lambda_w / reg.lambda_a.")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of checkpointing and backend discovery; warnings still pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = "orbax" in record.pathname or record.pathname.endswith("xla_bridge.py")
    return record.levelno >= std_logging.WARNING or not noisy


def configure_logging() -> None:
  """INFO logs for qreg's progress and metrics, without the per-checkpoint library logs.

  Processes other than 0 log warnings and errors only.
  """
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def _write_train_metrics(writer: metric_writers.MetricWriter, window: list[dict[str, jax.Array]],
                         step: int) -> None:
  """Writes the means of the window's step metrics; raises on a non-finite one."""
  summary = {k: float(np.mean([m[k] for m in window if k in m])) for k in window[-1]}
  _check_finite(summary, step)
  writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: jax.sharding.Mesh | None = None,
                       pipeline: data.InputPipeline | None = None) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds a checkpoint), then runs the PTQ sweep.

  The whole config is checked before anything is written to workdir. Checkpoints
  are saved at each epoch end, every train.checkpoint_every_steps steps and on
  SIGTERM, after which Preempted is raised. mesh defaults to all devices of all
  processes, pipeline to the one config.data describes. Returns the results dict
  also written to workdir/results.json.
  """
  workdir = os.path.abspath(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  check_config(config, mesh)
  pipeline = data.build_input_pipeline(config.data) if pipeline is None else pipeline
  model = models.build_model(config.model, pipeline.info.num_classes)

  steps_per_epoch = pipeline.steps_per_epoch(config.data.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"data.batch_size={config.data.batch_size} exceeds the "
                     f"{pipeline.info.num_train} training examples of {config.data.name}.")
  total_steps = config.train.num_epochs * steps_per_epoch
  reg_start_step = config.reg.start_epoch * steps_per_epoch
  optimizer = build_optimizer(config.optim, total_steps, steps_per_epoch)
  method_step = build_method_step(config, model, optimizer)

  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory.")
  os.makedirs(workdir, exist_ok=True)
  manager = _checkpoint_manager(workdir, config.train.checkpoints_to_keep)
  if manager.all_steps():
    check_workdir_matches(config, workdir)
  state = jax.jit(functools.partial(create_train_state, model=model, optimizer=optimizer,
                                    image_shape=pipeline.info.image_shape),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  restored = restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  if restored is not None:
    state = restored
    _set_aside_newer_checkpoints(manager, int(state.step), workdir)
    logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))
  start_step = int(state.step)

  plain_step = jit_train_step(make_train_step(model.apply, optimizer, None), mesh, state)
  reg_step = plain_step if method_step is None else jit_train_step(method_step, mesh, state)

  # Metrics are written by process 0 only; the others train silently.
  writer = (metric_writers.create_default_writer(workdir) if jax.process_index() == 0
            else metric_writers.MultiWriter([]))
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_secs=30)
  log_every = config.train.log_every_steps
  checkpoint_every = config.train.checkpoint_every_steps
  batches = pipeline.train_batches(config.data.batch_size, config.seed, start_step)
  window = []
  config_written = False
  logging.info("Training %s on %s: %d steps (%d/epoch), regularized from step %d, %d devices "
               "in %d process(es).", config.model.name, config.data.name, total_steps,
               steps_per_epoch, reg_start_step if method_step is not None else total_steps,
               mesh.devices.size, jax.process_count())
  with _sigterm_sets_flag() as sigterm_received:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(next(batches), mesh)
      train_step = reg_step if step >= reg_start_step else plain_step
      state, metrics = train_step(state, batch)
      window.append(metrics)
      done = step + 1
      progress(done)
      last_in_epoch = done % steps_per_epoch == 0
      preempted = sigterm_received.is_set() or manager.reached_preemption(done)
      checkpoint = (last_in_epoch or preempted
                    or (checkpoint_every > 0 and done % checkpoint_every == 0))
      # Metrics are checked before every checkpoint, so that a NaN state is never saved.
      if done % log_every == 0 or checkpoint:
        _write_train_metrics(writer, window, done)
        window = []
      if last_in_epoch:
        test_accuracy = evaluate.accuracy(
            model.apply, {"params": state.params, "batch_stats": state.batch_stats},
            pipeline.eval_batches(config.eval.batch_size), mesh)
        writer.write_scalars(done, {"test/accuracy": test_accuracy,
                                    "epoch": done / steps_per_epoch})
      if checkpoint:
        # config.json describes the checkpoints next to it: (re)written with this run's first.
        if not config_written and jax.process_index() == 0:
          with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        config_written = True
        manager.save(done, args=ocp.args.StandardSave(state))
      if preempted:
        manager.wait_until_finished()
        writer.flush()
        raise Preempted(f"Stopped by SIGTERM after step {done} of {total_steps}; saved checkpoint "
                        f"{done} in {manager.directory}. Rerun the same command to resume.")
  manager.wait_until_finished()
  writer.flush()

  results = evaluate.run_sweep(config, model, state.params, state.batch_stats, pipeline, mesh)
  results["step"] = int(state.step)
  report.write_results(results, workdir)
  return results


def load_trained(config: ml_collections.ConfigDict, workdir: str):
  """The model, input pipeline, mesh and last TrainState of a workdir's run."""
  mesh = parallel.make_mesh()
  pipeline = data.build_input_pipeline(config.data)
  model = models.build_model(config.model, pipeline.info.num_classes)
  steps_per_epoch = pipeline.steps_per_epoch(config.data.batch_size)
  optimizer = build_optimizer(config.optim, config.train.num_epochs * steps_per_epoch,
                              steps_per_epoch)
  abstract_state = jax.eval_shape(functools.partial(
      create_train_state, model=model, optimizer=optimizer, image_shape=pipeline.info.image_shape),
      jax.random.key(config.seed))
  sharding = parallel.replicated(mesh)
  abstract_state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract_state)
  manager = _checkpoint_manager(os.path.abspath(workdir))
  if manager.all_steps():
    check_workdir_matches(config, os.path.abspath(workdir))
  state = restore_latest(manager, abstract_state)
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}; train first with qreg.main.")
  return model, pipeline, mesh, state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Reruns only the PTQ sweep on the workdir's last checkpoint; writes results like training."""
  model, pipeline, mesh, state = load_trained(config, workdir)
  results = evaluate.run_sweep(config, model, state.params, state.batch_stats, pipeline, mesh)
  results["step"] = int(state.step)
  report.write_results(results, os.path.abspath(workdir))
  return results
