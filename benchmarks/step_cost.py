"""Cost of a regularized train step against a bare value_and_grad step, per gradient
implementation, penalty batch fraction and penalty frequency.

    python -m benchmarks.step_cost                      # small_cnn at its config batch (128)
    python -m benchmarks.step_cost --models=vgg_like,resnet18 --batch_sizes=64,128 --steps=8

For each model, batch size and compute dtype (--dtypes: model.dtype, float32 params either
way), all compiled and timed in this process:
- "bare": jax.value_and_grad of the cross-entropy w.r.t. the params and the
  optimizer update, nothing else: the denominator of every ratio;
- "plain": qreg.train's step without the penalty (it also takes the
  activation gradients and logs the gradient norms);
- "<impl> f=<f>": the penalized step with each `reg.impl`, the penalty on
  the first fraction f of the batch (reg.penalty_batch_fraction);
- "multibit k=<k>" (--multibit_k): the multi-bit QAT step at k widths a step;
- "<form> <impl>" (--bound_forms, e.g. bound,layer_bound): the bound-aware penalty (reg.form,
  qreg.bound) at the config's lambdas and reg.bound_bits, each impl, on the whole batch.
Steps of all variants are interleaved round by round, so that load from
other processes slows them alike; each time is the median over rounds. Then
for each (impl, k, f) the amortized cost of a step under reg.every_k_steps=k,
one penalized step and k - 1 plain ones: (t_penalized + (k - 1) t_plain) / k,
as a multiple of the bare step. Peak memory is XLA's static estimate for the
compiled step. The gradient error is ||g - g_nested|| / ||g_nested|| on the
first batch (same f).

Writes step_cost.md and step_cost.json to --output_dir. Runs unchanged on
CPU, GPU or TPU (all local devices, batch split over them).
"""
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from configs import (cifar10_mobilenetv2, cifar10_resnet18, cifar10_vgg, fashion_mnist,
                     fashion_mnist_mobilenetv2, fashion_mnist_resnet18, fashion_mnist_vgg)
from qreg import bound, cli, models, objectives, parallel, ptq, report, train

# Model name -> (config module giving model, batch size, optimizer and lambdas; input shape).
BENCHMARKS = {
    "small_cnn": (fashion_mnist, (28, 28, 1)),
    "vgg_like": (cifar10_vgg, (32, 32, 3)),
    "resnet18": (cifar10_resnet18, (32, 32, 3)),
    "mobilenetv2": (cifar10_mobilenetv2, (32, 32, 3)),
    # The CPU-scale Table 1 networks (experiments/results/README.md).
    "vgg_like_fmnist": (fashion_mnist_vgg, (28, 28, 1)),
    "resnet18_fmnist": (fashion_mnist_resnet18, (28, 28, 1)),
    "mobilenetv2_fmnist": (fashion_mnist_mobilenetv2, (28, 28, 1)),
}
NUM_CLASSES = 10  # of every benchmarked dataset
BARE, PLAIN = "bare", "plain"
MULTIBIT_BIT_SET = (2, 3, 4, 5, 6, 8)  # multi-bit QAT's default set (issue 22)

_MODELS = flags.DEFINE_list("models", ["small_cnn"], f"Models to measure, from {list(BENCHMARKS)}.")
_IMPLS = flags.DEFINE_list("impls", list(objectives.IMPLS),
                           f"Penalty implementations to measure, from {list(objectives.IMPLS)}.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [],
                                 "Global batch sizes; default: each model's config batch size.")
_FRACTIONS = flags.DEFINE_list("fractions", ["1", "0.25"],
                               "Penalty batch fractions (reg.penalty_batch_fraction) to time.")
_EVERY_K = flags.DEFINE_list("every_k", ["1", "4", "16"],
                             "Penalty frequencies (reg.every_k_steps) to amortize over.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"],
                            f"Compute dtypes (model.dtype) to measure, from {list(models.DTYPES)}.")
_MULTIBIT_K = flags.DEFINE_list("multibit_k", [],
                                "Also time multi-bit QAT steps (qat.bit_set = MULTIBIT_BIT_SET) "
                                "with this many widths a step (qat.bits_per_step).")
_BOUND_FORMS = flags.DEFINE_list("bound_forms", [],
                                  "Also time the bound-aware penalty's forms (reg.form).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per variant (rounds).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 3,
                                     "Untimed steps per variant after compiling.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "benchmarks/results",
                                  "Directory for step_cost.md and step_cost.json.")


def peak_memory_bytes(compiled) -> int:
  """XLA's buffer assignment for a compiled step: temporaries plus arguments and outputs.

  Donated arguments alias outputs, so they count once. (The backend's own
  peak_memory_in_bytes is not filled in on every platform; this sum is.)
  """
  stats = compiled.memory_analysis()
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
             + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def synthetic_batch(batch_size: int, image_shape: tuple[int, ...], num_classes: int, mesh):
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, *image_shape)).astype(np.float32),
           "label": rng.integers(0, num_classes, size=batch_size).astype(np.int32)}
  return parallel.global_batch(batch, mesh)


def make_bare_train_step(apply_fn, optimizer: optax.GradientTransformation):
  """The baseline: value_and_grad of the cross-entropy w.r.t. the params, the optimizer update."""

  def loss(params, batch_stats, batch):
    logits, updates = apply_fn({"params": params, "batch_stats": batch_stats}, batch["image"],
                               train=True, mutable=["batch_stats"])
    return objectives.cross_entropy(logits, batch["label"]), updates["batch_stats"]

  def train_step(state: train.TrainState, batch):
    (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, state.batch_stats, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), {"loss": value}

  return train_step


def median_step_seconds(compiled_steps: dict, states: dict, batch, steps: int) -> dict:
  """name -> median wall time (s) of compiled_steps[name](state, batch) -> (state, metrics),
  over `steps` rounds of one step of each, so that load from other processes slows them alike;
  states[name] advances with each step."""
  times = {name: [] for name in compiled_steps}
  for _ in range(steps):
    for name, compiled in compiled_steps.items():
      start = time.perf_counter()
      states[name], metrics = compiled(states[name], batch)
      jax.block_until_ready((states[name], metrics))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def flat_gradient(params, batch_stats, batch, apply_fn, penalty, sub_batch) -> np.ndarray:
  def value_and_grad(params, batch_stats, batch):
    penalty_batch = None if sub_batch is None else parallel.leading_per_device(batch, *sub_batch)
    return objectives.penalized_value_and_grad(params, batch_stats, batch, apply_fn, penalty,
                                               penalty_batch=penalty_batch)

  _, grads = jax.jit(value_and_grad)(params, batch_stats, batch)
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(grads)]).astype(np.float64)


def _variant(impl: str, fraction: float) -> str:
  return f"{impl} f={fraction:g}"


def measure_model(name: str, batch_size: int | None, impls: list[str], fractions: list[float],
                  every_k: list[int], steps: int, warmup_steps: int,
                  dtype: str = "float32", multibit_k: tuple[int, ...] = (),
                  bound_forms: tuple[str, ...] = ()) -> dict:
  """Times the bare, plain and penalized steps for one model computing in `dtype` (float32
  params either way); returns its results row."""
  config_module, image_shape = BENCHMARKS[name]
  config = config_module.get_config()
  batch_size = batch_size or config.data.batch_size
  mesh = parallel.make_mesh()
  num_devices = mesh.devices.size
  parallel.check_batch_size(batch_size, num_devices, "--batch_sizes")
  model = models.with_compute_dtype(models.build_model(config.model, NUM_CLASSES), dtype)
  optimizer = train.build_optimizer(config.optim, total_steps=1000, steps_per_epoch=100)
  batch = synthetic_batch(batch_size, image_shape, NUM_CLASSES, mesh)
  initial_state = jax.jit(functools.partial(
      train.create_train_state, model=model, optimizer=optimizer, image_shape=image_shape),
      out_shardings=parallel.replicated(mesh))(jax.random.key(0))

  train_steps = {BARE: make_bare_train_step(model.apply, optimizer),
                 PLAIN: train.make_train_step(model.apply, optimizer, None)}
  penalties, sub_batches = {}, {}
  for fraction in fractions:
    sub_batch = None
    if fraction < 1:
      sub_batch = (parallel.check_batch_fraction(fraction, batch_size, num_devices, "--fractions"),
                   num_devices)
    for impl in impls:
      config.reg.impl = impl
      variant = _variant(impl, fraction)
      penalties[variant], sub_batches[variant] = train.build_penalty(config.reg), sub_batch
      train_steps[variant] = train.make_train_step(model.apply, optimizer, penalties[variant],
                                                   penalty_sub_batch=sub_batch)

  for form in bound_forms:
    for impl in impls:
      reg = config.reg.copy_and_resolve_references()
      reg.form, reg.impl = form, impl
      train_steps[f"{form} {impl}"] = train.make_train_step(
          model.apply, optimizer, train.build_penalty(reg, model, config.quant.per_channel))

  setup = ptq.build_quant_setup(config.quant)
  for k in multibit_k:
    train_steps[f"multibit k={k}"] = train.make_multibit_train_step(
        model, optimizer, train.drawn_widths(0, 0, MULTIBIT_BIT_SET, k), setup)

  compiled_steps, states, rows = {}, {}, {}
  for variant, train_step in train_steps.items():
    step = train.jit_train_step(train_step, mesh, initial_state)
    start = time.perf_counter()
    compiled = step.lower(initial_state, batch).compile()
    rows[variant] = {"compile_s": time.perf_counter() - start,
                     "peak_memory_bytes": peak_memory_bytes(compiled)}
    compiled_steps[variant] = compiled
    # The step donates its state, so each variant runs on its own copy.
    state = jax.tree.map(jnp.copy, initial_state)
    for _ in range(warmup_steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    states[variant] = state

  medians = median_step_seconds(compiled_steps, states, batch, steps)
  for variant, row in rows.items():
    row["median_step_s"] = medians[variant]
  bare_time, plain_time = rows[BARE]["median_step_s"], rows[PLAIN]["median_step_s"]
  for variant, row in rows.items():
    row["ratio_to_bare"] = row["median_step_s"] / bare_time
    row["ratio_to_plain"] = row["median_step_s"] / plain_time
  if "nested" in impls:
    for fraction in fractions:
      reference_variant = _variant("nested", fraction)
      reference = flat_gradient(initial_state.params, initial_state.batch_stats, batch,
                                model.apply, penalties[reference_variant],
                                sub_batches[reference_variant])
      for impl in impls:
        variant = _variant(impl, fraction)
        grad = flat_gradient(initial_state.params, initial_state.batch_stats, batch, model.apply,
                             penalties[variant], sub_batches[variant])
        rows[variant]["grad_error_vs_nested"] = float(np.linalg.norm(grad - reference)
                                                      / np.linalg.norm(reference))
  amortized = [{"impl": impl, "every_k_steps": k, "penalty_batch_fraction": fraction,
                "step_s": (rows[_variant(impl, fraction)]["median_step_s"]
                           + (k - 1) * plain_time) / k}
               for impl in impls for fraction in fractions for k in every_k]
  for row in amortized:
    row["ratio_to_bare"] = row["step_s"] / bare_time
  return {"model": name, "batch_size": batch_size, "dtype": dtype,
          "image_shape": list(image_shape),
          "lambda_w": config.reg.lambda_w, "lambda_a": config.reg.lambda_a,
          "fd_step": config.reg.fd_step, "steps": steps, "variants": rows,
          "amortized": amortized}


def markdown_table(results: dict) -> str:
  lines = [f"Device: {results['device_kind']} x{results['num_devices']} ({results['platform']}), "
           f"jax {results['jax_version']}; median of {results['steps']} interleaved steps.", "",
           "Measured steps:", "",
           "| model | batch, dtype | variant | step (ms) | × bare | × plain | peak memory (MiB) | "
           "grad error vs nested |",
           "|---|---|---|---|---|---|---|---|"]
  for model in results["models"]:
    for variant, row in model["variants"].items():
      error = row.get("grad_error_vs_nested")
      lines.append(
          f"| {model['model']} | {model['batch_size']}, {model['dtype']} | {variant} | "
          f"{1e3 * row['median_step_s']:.1f} | {row['ratio_to_bare']:.2f} | "
          f"{row['ratio_to_plain']:.2f} | {row['peak_memory_bytes'] / 2**20:.1f} | "
          f"{'' if error is None else f'{error:.1e}'} |")
  lines += ["", "Amortized cost per step, × bare (penalty on one step in k, on fraction f of "
            "the batch; plain steps between):", ""]
  for model in results["models"]:
    columns = sorted({(r["penalty_batch_fraction"], r["every_k_steps"])
                      for r in model["amortized"]}, key=lambda c: (-c[0], c[1]))
    lines += [f"{model['model']}, batch {model['batch_size']}, {model['dtype']}:", "",
              "| impl | " + " | ".join(f"f={f:g} k={k}" for f, k in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for impl in dict.fromkeys(r["impl"] for r in model["amortized"]):
      by_column = {(r["penalty_batch_fraction"], r["every_k_steps"]): r["ratio_to_bare"]
                   for r in model["amortized"] if r["impl"] == impl}
      lines.append(f"| {impl} | " + " | ".join(f"{by_column[c]:.2f}" for c in columns) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = [m for m in _MODELS.value if m not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f"Unknown --models {unknown}; expected some of {list(BENCHMARKS)}.")
  if not _IMPLS.value:
    raise app.UsageError(f"--impls is empty; expected some of {list(objectives.IMPLS)}.")
  device = jax.devices()[0]
  results = {"device_kind": device.device_kind, "platform": device.platform,
             "num_devices": jax.device_count(), "jax_version": jax.__version__,
             "steps": _STEPS.value, "models": []}
  fractions = [float(f) for f in _FRACTIONS.value]
  every_k = [int(k) for k in _EVERY_K.value]
  if any(k < 1 for k in every_k):
    raise app.UsageError(f"--every_k={_EVERY_K.value}: each must be an integer >= 1.")
  unknown = [d for d in _DTYPES.value if d not in models.DTYPES]
  if unknown:
    raise app.UsageError(f"Unknown --dtypes {unknown}; expected some of {list(models.DTYPES)}.")
  multibit_k = tuple(int(k) for k in _MULTIBIT_K.value)
  if any(not 1 <= k <= len(MULTIBIT_BIT_SET) for k in multibit_k):
    raise app.UsageError(f"--multibit_k={_MULTIBIT_K.value}: each in 1..{len(MULTIBIT_BIT_SET)}.")
  unknown = [f for f in _BOUND_FORMS.value if f not in bound.FORMS[1:]]
  if unknown:
    raise app.UsageError(f"Unknown --bound_forms {unknown}; expected some of {bound.FORMS[1:]}.")
  for name in _MODELS.value:
    for batch_size in [int(b) for b in _BATCH_SIZES.value] or [None]:
      for dtype in _DTYPES.value:
        results["models"].append(measure_model(name, batch_size, _IMPLS.value, fractions,
                                               every_k, _STEPS.value, _WARMUP_STEPS.value, dtype,
                                               multibit_k, tuple(_BOUND_FORMS.value)))
  table = markdown_table(results)
  print(table)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  report.write_text_atomic(os.path.join(_OUTPUT_DIR.value, "step_cost.md"), table)
  report.write_json_atomic(os.path.join(_OUTPUT_DIR.value, "step_cost.json"), results)


if __name__ == "__main__":
  cli.run(main)
