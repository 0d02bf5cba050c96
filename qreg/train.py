"""The training loop: TrainState, the jitted data-parallel step, the epoch loop.

train(config, workdir) trains a config in a workdir, resuming from its last
checkpoint, and returns the final state; qreg.main sweeps and writes after it.
"""
import collections
import contextlib
import dataclasses
import functools
import math
import signal
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from qreg import bound, checkpoint, data, metrics, models, objectives, parallel, ptq, quant
from qreg import config as config_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def build_optimizer(optim_config: ml_collections.ConfigDict, total_steps: int,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """Optimizer and learning-rate schedule from a validated config.optim; weight decay on kernels
  only."""
  warmup_steps = int(optim_config.get("warmup_epochs", 0) * steps_per_epoch)
  lr = optim_config.learning_rate
  if optim_config.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  else:
    after_warmup = optax.constant_schedule(lr)
  schedule = after_warmup if warmup_steps == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup_steps), after_warmup], [warmup_steps])

  decay = optim_config.get("weight_decay", 0.0)
  if optim_config.name == "sgd":
    return optax.chain(optax.add_decayed_weights(decay, objectives.kernel_mask),
                       optax.sgd(schedule, momentum=optim_config.momentum, nesterov=True))
  if optim_config.name == "adam":
    return optax.chain(optax.add_decayed_weights(decay, objectives.kernel_mask),
                       optax.adam(schedule))
  return optax.adamw(schedule, weight_decay=decay, mask=objectives.kernel_mask)


def create_train_state(rng: jax.Array, model, optimizer: optax.GradientTransformation,
                       image_shape: tuple[int, ...]) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=optimizer.init(params))


def make_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation,
                    penalty: objectives.Penalty | bound.BoundPenalty | None,
                    lambda_kurtosis: float = 0.0,
                    penalty_sub_batch: tuple[int, int] | None = None):
  """One optimizer step on a global batch; penalty=None is the plain (unregularized) step.

  lambda_kurtosis > 0 adds KURE's weight-kurtosis term to the objective.
  penalty_sub_batch=(examples per device, devices): the penalty on the first
  examples of each device's shard only (objectives.penalized_value_and_grad).
  Every step logs penalty_applied (1 or 0) and the lambdas it applied, so that
  a log window's means are the fraction of penalized steps and the average weights.
  """
  if penalty is None:
    value_and_grad = functools.partial(objectives.plain_value_and_grad, apply_fn=apply_fn)
  else:
    penalized = (bound.penalized_value_and_grad if isinstance(penalty, bound.BoundPenalty)
                 else objectives.penalized_value_and_grad)
    value_and_grad = functools.partial(penalized, apply_fn=apply_fn, penalty=penalty)
    if penalty_sub_batch is not None:
      per_device, num_devices = penalty_sub_batch
      full_batch_value_and_grad = value_and_grad
      value_and_grad = lambda params, batch_stats, batch: full_batch_value_and_grad(
          params, batch_stats, batch,
          penalty_batch=parallel.leading_per_device(batch, per_device, num_devices))
  applied = {"penalty_applied": float(penalty is not None),
             "lambda_w_applied": penalty.lambda_w if penalty else 0.0,
             "lambda_a_applied": penalty.lambda_a if penalty else 0.0}

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
                   accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                   **{k: jnp.asarray(v, jnp.float32) for k, v in applied.items()})
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def quantization_aware_apply_fn(model, weight_bits: int | None, act_bits: int | None,
                                setup: ptq.QuantSetup) -> Callable:
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


def drawn_bit_indices(seed: int, step: jax.Array, num_widths: int,
                      widths_per_step: int) -> jax.Array:
  """The indices into qat.bit_set that multi-bit QAT trains at `step`: widths_per_step distinct
  ones, drawn from (seed, step) alone, so that a resumed run draws what an unbroken one does."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.choice(key, num_widths, (widths_per_step,), replace=False)


_draw_bit_indices = jax.jit(drawn_bit_indices, static_argnums=(2, 3))


def drawn_widths(seed: int, step: int, bit_set: tuple[int, ...],
                 widths_per_step: int) -> tuple[int, ...]:
  """The bit-widths multi-bit QAT trains at `step`, on the host, in the order they are drawn."""
  indices = _draw_bit_indices(seed, jnp.int32(step), len(bit_set), widths_per_step)
  return tuple(bit_set[int(i)] for i in np.asarray(indices))


def make_multibit_train_step(model, optimizer: optax.GradientTransformation,
                             widths: tuple[int, ...], setup: ptq.QuantSetup):
  """Multi-bit QAT (Any-Precision DNN, Yu et al., AAAI 2021) at the widths drawn for a step: the
  mean task loss of the straight-through fake-quantized model at W = A = b over `widths`.

  The widths are drawn on the host (drawn_widths) and each drawn tuple gets its own compiled
  step, as step_kind picks the plain or regularized one: choosing the width inside the jitted
  step (lax.switch over one branch per width) ran about 5x slower than a fixed-width STE step
  on the 2-core CPU. Unlike Any-Precision, one BatchNorm serves every width (the model is folded
  and swept like the other methods'); each width's forward updates its running statistics in
  turn, in the drawn order.
  """
  value_and_grads = [functools.partial(objectives.plain_value_and_grad,
                                       apply_fn=quantization_aware_apply_fn(model, b, b, setup))
                     for b in widths]

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    batch_stats, outputs = state.batch_stats, []
    for value_and_grad in value_and_grads:
      (loss, (batch_stats, logits, terms)), grads = value_and_grad(state.params, batch_stats,
                                                                     batch)
      outputs.append((loss, logits, terms, grads))
    losses, logits, terms, grads = jax.tree.map(lambda *x: jnp.stack(x), *outputs)
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
    grads, loss = mean(grads), jnp.mean(losses)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(mean(terms), loss=loss, grad_norm=optax.tree.norm(grads),
                   accuracy=jnp.mean(jnp.argmax(logits[0], -1) == batch["label"]),
                   qat_bits=jnp.float32(widths[0]), penalty_applied=jnp.float32(0.0))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, state: TrainState):
  """jax.jit with explicit shardings: state replicated, batch split over `data`."""
  state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  return jax.jit(train_step,
                 in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=(state_sharding, parallel.replicated(mesh)),
                 donate_argnums=0)


def build_penalty(reg_config: ml_collections.ConfigDict, model=None,
                  per_channel: bool = False) -> objectives.Penalty | bound.BoundPenalty | None:
  """The penalty of a validated config.reg, or None when both weights are zero (the plain step).

  Its lambdas are reg.every_k_steps times the config's: applied on one step in
  k, the penalty keeps its average weight. reg.form 'bound' needs the model (its folded
  clone is what the bound is taken on); per_channel is quant.per_channel, the weight
  quantizer whose steps the bound forms use.
  """
  if reg_config.lambda_w == 0 and reg_config.lambda_a == 0:
    return None
  k = reg_config.every_k_steps
  lambda_w, lambda_a = float(reg_config.lambda_w) * k, float(reg_config.lambda_a) * k
  if reg_config.form == "uniform":
    return objectives.Penalty(lambda_w, lambda_a, reg_config.impl, float(reg_config.fd_step),
                              reg_config.norm)
  fold = reg_config.form == "bound"
  if fold and model is None:
    raise ValueError("reg.form='bound' needs the model, to fold it.")
  return bound.BoundPenalty(
      lambda_w, lambda_a, int(reg_config.bound_bits), bool(per_channel), fold,
      reg_config.bound_steps == "differentiated", reg_config.impl, float(reg_config.fd_step),
      model.clone(folded=True).apply if fold else None)


class MethodSteps(NamedTuple):
  """The train steps from reg.start_epoch on.

  regularized: the method's step (gradient penalty, KURE and/or STE QAT);
  between: on the steps between two penalized ones (reg.every_k_steps > 1),
  the method without the gradient penalty, or None where that is the plain step.
  widths: multi-bit QAT only, step -> the bit-widths drawn for it; `regularized` is then
  widths -> the train step at those widths.
  """
  regularized: Callable
  between: Callable | None
  every_k_steps: int
  widths: Callable[[int], tuple[int, ...]] | None = None


def build_method_steps(config: ml_collections.ConfigDict, model,
                       optimizer: optax.GradientTransformation,
                       num_devices: int) -> MethodSteps | None:
  """The train steps used from reg.start_epoch on, for a validated config.

  None when the config asks for no method (plain training throughout).
  """
  if config.qat.bit_set:
    setup = ptq.build_quant_setup(config.quant)
    bit_set, per_step, seed = tuple(config.qat.bit_set), config.qat.bits_per_step, config.seed
    return MethodSteps(
        lambda widths: make_multibit_train_step(model, optimizer, widths, setup), None, 1,
        widths=lambda step: drawn_widths(seed, step, bit_set, per_step))
  penalty = build_penalty(config.reg, model, config.quant.per_channel)
  weight_bits, act_bits = config.qat.weight_bits, config.qat.act_bits
  lambda_kurtosis = float(config.reg.lambda_kurtosis)
  if penalty is None and not lambda_kurtosis and weight_bits is None and act_bits is None:
    return None
  qat = weight_bits is not None or act_bits is not None
  apply_fn = model.apply
  if qat:
    apply_fn = quantization_aware_apply_fn(model, weight_bits, act_bits,
                                           ptq.build_quant_setup(config.quant))
  sub_batch = None
  if penalty is not None and config.reg.penalty_batch_fraction < 1:
    sub_batch = (parallel.check_batch_fraction(config.reg.penalty_batch_fraction,
                                               config.data.batch_size, num_devices),
                 num_devices)
  every_k = config.reg.every_k_steps if penalty is not None else 1
  # Between penalized steps: KURE and/or QAT go on; without them it is the plain step.
  between = None
  if every_k > 1 and (lambda_kurtosis or qat):
    between = make_train_step(apply_fn, optimizer, None, lambda_kurtosis)
  return MethodSteps(make_train_step(apply_fn, optimizer, penalty, lambda_kurtosis, sub_batch),
                     between, every_k)


def step_kind(step: int, reg_start_step: int, method: MethodSteps | None) -> str:
  """Which train step runs at `step`: 'plain', 'regularized' or 'between'.

  A function of the step number alone, so a resumed run takes the same steps.
  """
  if method is None or step < reg_start_step:
    return "plain"
  if (step - reg_start_step) % method.every_k_steps == 0:
    return "regularized"
  return "plain" if method.between is None else "between"


@contextlib.contextmanager
def _stop_signals_set_flag():
  """While active, SIGTERM and SIGINT (Ctrl-C) record their number in the yielded list instead
  of ending the process, so that the loop checkpoints the step in flight first.

  Under jax.distributed, JAX's preemption service owns SIGTERM and picks a step that all
  processes reach (CheckpointManager.reached_preemption); only SIGINT is caught here.
  """
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  signals = [signal.SIGINT] if jax.distributed.is_initialized() else [signal.SIGTERM, signal.SIGINT]
  previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
              for signum in signals}
  try:
    yield received
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _check_finite(summary: dict[str, float], step: int) -> None:
  bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"Non-finite training metrics at step {step}: {bad}. Training stopped before "
        "checkpointing it; lower optim.learning_rate or reg.lambda_w / reg.lambda_a.")


def _window_means(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means of a log window's step metrics, fetched from the devices in one transfer; a metric
  that only some steps log (the bound's terms, on penalized steps) is averaged over those."""
  window = jax.device_get(window)
  keys = dict.fromkeys([*window[-1], *(k for m in window for k in m)])
  return {k: float(np.mean([m[k] for m in window if k in m])) for k in keys}


# The cost of a regularized step in plain steps, for the ETA until one has been timed
# (docs/cost.md measures it).
REGULARIZED_STEP_COST_GUESS = 2.0


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
  """What the epoch loop is built from, made by training_setup before anything is written.

  model: the model as it trains, computing in config.model.dtype.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  pipeline: data.InputPipeline
  model: Any
  optimizer: optax.GradientTransformation
  method: MethodSteps | None
  steps_per_epoch: int

  @property
  def total_steps(self) -> int:
    return self.config.train.num_epochs * self.steps_per_epoch

  @property
  def reg_start_step(self) -> int:
    return self.config.reg.start_epoch * self.steps_per_epoch


def training_setup(config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None,
                   pipeline: data.InputPipeline | None = None) -> TrainingSetup:
  """Validates the whole config, then builds the loop's parts; writes nothing.

  mesh defaults to all devices of all processes, pipeline to the one config.data describes.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  config_lib.validate(config, mesh.devices.size)
  pipeline = data.build_input_pipeline(config.data) if pipeline is None else pipeline
  model = models.build_model(config.model, pipeline.info.num_classes)
  steps_per_epoch = pipeline.steps_per_epoch(config.data.batch_size)
  optimizer = build_optimizer(config.optim, config.train.num_epochs * steps_per_epoch,
                              steps_per_epoch)
  # Training computes in model.dtype; the sweep runs the float32 model.
  train_model = models.with_compute_dtype(model, config.model.dtype)
  method = build_method_steps(config, train_model, optimizer, mesh.devices.size)
  return TrainingSetup(config, mesh, pipeline, train_model, optimizer, method, steps_per_epoch)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          mesh: jax.sharding.Mesh | None = None,
          pipeline: data.InputPipeline | None = None) -> TrainState:
  """Trains config in workdir, resuming from its last checkpoint; returns the final state.

  The whole config is checked before anything is written to workdir. Checkpoints
  are saved at each epoch end, every train.checkpoint_every_steps steps and on
  SIGTERM/SIGINT, after which checkpoint.Preempted is raised.
  """
  setup = training_setup(config, mesh=mesh, pipeline=pipeline)
  workdir = checkpoint.prepare_workdir(config, workdir)
  with checkpoint.workdir_lock(workdir):
    return train_in_workdir(setup, workdir)


def train_in_workdir(setup: TrainingSetup, workdir: str) -> TrainState:
  """The epoch loop, from the last checkpoint of workdir (prepared and locked by the caller)."""
  config, mesh, pipeline, model = setup.config, setup.mesh, setup.pipeline, setup.model
  optimizer, method, steps_per_epoch = setup.optimizer, setup.method, setup.steps_per_epoch
  total_steps, reg_start_step = setup.total_steps, setup.reg_start_step
  manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoints_to_keep)
  state = jax.jit(functools.partial(create_train_state, model=model, optimizer=optimizer,
                                    image_shape=pipeline.info.image_shape),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  restored = checkpoint.restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  if restored is not None:
    state = restored
    checkpoint.set_aside_newer_checkpoints(manager, int(state.step), workdir)
    logging.info("Resumed from %s at step %d.", manager.directory, int(state.step))
  start_step = int(state.step)

  steps = {"plain": jit_train_step(make_train_step(model.apply, optimizer, None), mesh, state)}
  if method is not None and method.widths is None:
    steps["regularized"] = jit_train_step(method.regularized, mesh, state)
    if method.between is not None:
      steps["between"] = jit_train_step(method.between, mesh, state)

  def train_step_at(step: int, kind: str) -> Callable:
    if kind != "regularized" or method.widths is None:
      return steps[kind]
    widths = method.widths(step)  # multi-bit QAT: one compiled step per drawn tuple of widths
    if widths not in steps:
      steps[widths] = jit_train_step(method.regularized(widths), mesh, state)
    return steps[widths]
  remaining = collections.Counter(step_kind(step, reg_start_step, method)
                                  for step in range(start_step, total_steps))

  # Metrics are written by process 0 only; the others train silently.
  writer = metrics.MetricWriter(workdir) if jax.process_index() == 0 else metrics.NullWriter()
  progress = metrics.Progress({kind: remaining[kind] for kind in ("plain", *remaining)},
                              {"regularized": REGULARIZED_STEP_COST_GUESS})
  log_every = config.train.log_every_steps
  checkpoint_every = config.train.checkpoint_every_steps
  batches = parallel.prefetch_to_mesh(
      pipeline.train_batches(config.data.batch_size, config.seed, start_step), mesh)
  window = []
  config_written = False
  compiled = set()
  logging.info("Training %s on %s: %d steps (%d/epoch), regularized from step %d, %d devices "
               "in %d process(es).", config.model.name, config.data.name, total_steps,
               steps_per_epoch, reg_start_step if method else total_steps, mesh.devices.size,
               jax.process_count())
  if method is not None and (method.every_k_steps > 1 or config.reg.penalty_batch_fraction < 1):
    logging.info("Gradient penalty on one step in %d with lambda_w=%g, lambda_a=%g (the "
                 "config's times %d), on %g of each device's batch.", method.every_k_steps,
                 config.reg.lambda_w * method.every_k_steps,
                 config.reg.lambda_a * method.every_k_steps, method.every_k_steps,
                 config.reg.penalty_batch_fraction)
  try:
    with _stop_signals_set_flag() as signals_received:
      for step in range(start_step, total_steps):
        kind = step_kind(step, reg_start_step, method)
        train_step = train_step_at(step, kind)
        state, step_metrics = train_step(state, next(batches))
        window.append(step_metrics)
        done = step + 1
        line = progress.step_done(kind, done, compiled_now=train_step not in compiled)
        compiled.add(train_step)
        if line:
          logging.info("%s", line)
        last_in_epoch = done % steps_per_epoch == 0
        preempted = bool(signals_received) or manager.reached_preemption(done)
        save = (last_in_epoch or preempted
                or (checkpoint_every > 0 and done % checkpoint_every == 0))
        # Metrics are checked before every checkpoint, so that a NaN state is never saved.
        if done % log_every == 0 or save:
          summary = _window_means(window)
          _check_finite(summary, done)
          writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
          if config.train.log_norms:
            writer.write_scalars(done, {f"norms/{k}": float(v) for k, v in jax.device_get(
                objectives.parameter_norms(state.params)).items()})
          window = []
        if last_in_epoch:
          # eval.split: never the test set while hyperparameters are being chosen.
          eval_accuracy = ptq.accuracy(
              model.apply, {"params": state.params, "batch_stats": state.batch_stats},
              pipeline.eval_batches(config.eval.batch_size, split=config.eval.split), mesh)
          writer.write_scalars(done, {f"{config.eval.split}/accuracy": eval_accuracy,
                                      "epoch": done / steps_per_epoch})
        if save:
          # config.json describes the checkpoints next to it: (re)written with this run's first.
          if not config_written:
            checkpoint.write_run_config(config, workdir)
            config_written = True
          manager.save(done, args=ocp.args.StandardSave(state))
        if last_in_epoch or save:
          progress.exclude_pause()
        if preempted:
          signum = signals_received[0] if signals_received else signal.SIGTERM
          manager.wait_until_finished()
          raise checkpoint.Preempted(
              f"Stopped by {signal.Signals(signum).name} after step {done} of {total_steps}; "
              f"saved checkpoint {done} in {manager.directory}. Rerun the same command to "
              "resume.", signum)
    manager.wait_until_finished()
  finally:
    batches.close()
    writer.close()
  return state
