"""The training loop: jitted data-parallel step, checkpoints, metrics, then the PTQ sweep."""
import functools
import logging as std_logging
import math
import os
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

from qreg import data, evaluate, models, objectives, parallel, quant, report

PyTree = Any

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


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
    decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  elif optim_config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"Unknown optim.schedule {optim_config.schedule!r}; expected one of {SCHEDULES}.")
  schedule = decay if warmup_steps == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])

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


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
  """The latest checkpoint restored onto abstract_state's structure and shardings, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises several types for a mismatched or damaged checkpoint
    raise RuntimeError(
        f"Could not restore checkpoint step {step} from {manager.directory}: {e}\n"
        "It was written by a different model/optimizer config or is damaged; use a fresh "
        "--workdir or delete that checkpoint.") from e


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
  """INFO logs for qreg's progress and metrics, without the per-checkpoint library logs."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds a checkpoint), then runs the PTQ sweep.

  Returns the results dict also written to workdir/results.json.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.data.batch_size, mesh, "data.batch_size")
  pipeline = data.build_input_pipeline(config.data)
  model = models.build_model(config.model, pipeline.info.num_classes)

  steps_per_epoch = pipeline.steps_per_epoch(config.data.batch_size)
  total_steps = config.train.num_epochs * steps_per_epoch
  reg_start_step = config.reg.start_epoch * steps_per_epoch
  optimizer = build_optimizer(config.optim, total_steps, steps_per_epoch)
  method_step = build_method_step(config, model, optimizer)

  state = jax.jit(functools.partial(create_train_state, model=model, optimizer=optimizer,
                                    image_shape=pipeline.info.image_shape),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  manager = _checkpoint_manager(workdir)
  restored = restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))
  start_step = int(state.step)

  plain_step = jit_train_step(make_train_step(model.apply, optimizer, None), mesh, state)
  reg_step = plain_step if method_step is None else jit_train_step(method_step, mesh, state)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_secs=30)
  log_every = config.train.log_every_steps
  batches = pipeline.train_batches(config.data.batch_size, config.seed, start_step)
  window = []
  logging.info("Training %s on %s: %d steps (%d/epoch), regularized from step %d, %d devices.",
               config.model.name, config.data.name, total_steps, steps_per_epoch,
               reg_start_step if method_step is not None else total_steps, mesh.devices.size)
  for step in range(start_step, total_steps):
    batch = parallel.global_batch(next(batches), mesh)
    train_step = reg_step if step >= reg_start_step else plain_step
    state, metrics = train_step(state, batch)
    window.append(metrics)
    progress(step + 1)
    last_in_epoch = (step + 1) % steps_per_epoch == 0
    if (step + 1) % log_every == 0 or last_in_epoch or step + 1 == total_steps:
      summary = {k: float(np.mean([m[k] for m in window if k in m])) for k in window[-1]}
      _check_finite(summary, step + 1)
      writer.write_scalars(step + 1, {f"train/{k}": v for k, v in summary.items()})
      window = []
    if last_in_epoch or step + 1 == total_steps:
      test_accuracy = evaluate.accuracy(
          model.apply, {"params": state.params, "batch_stats": state.batch_stats},
          pipeline.eval_batches(config.eval.batch_size), mesh)
      writer.write_scalars(step + 1, {"test/accuracy": test_accuracy,
                                      "epoch": (step + 1) / steps_per_epoch})
      manager.save(step + 1, args=ocp.args.StandardSave(state))
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
