"""Cost of a regularized train step, per gradient implementation, relative to a plain step.

    python -m benchmarks.step_cost                      # small_cnn at its config batch (128)
    python -m benchmarks.step_cost --models=vgg_like,resnet18 --batch_size=64 --steps=10

For each model: the jitted train step of qreg.train (optimizer update
included) without the penalty ("plain") and with each `reg.impl`, on
synthetic data of the config's input shape, all compiled and timed in this
process. Steps of all variants are interleaved round by round, so that load
from other processes slows them alike; the reported time is the median over
rounds. Peak memory is XLA's static estimate for the compiled step. The
gradient error is ||g - g_nested|| / ||g_nested|| on the first batch.

Writes step_cost.md and step_cost.json to --output_dir. Runs unchanged on
CPU, GPU or TPU (all local devices, batch split over them).
"""
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import cifar10_mobilenetv2, cifar10_resnet18, cifar10_vgg, fashion_mnist
from qreg import models, objectives, parallel, train

# Model name -> (config module giving model, batch size, optimizer and lambdas; input shape).
BENCHMARKS = {
    "small_cnn": (fashion_mnist, (28, 28, 1)),
    "vgg_like": (cifar10_vgg, (32, 32, 3)),
    "resnet18": (cifar10_resnet18, (32, 32, 3)),
    "mobilenetv2": (cifar10_mobilenetv2, (32, 32, 3)),
}
NUM_CLASSES = 10  # of every benchmarked dataset
PLAIN = "plain"

_MODELS = flags.DEFINE_list("models", ["small_cnn"], f"Models to measure, from {list(BENCHMARKS)}.")
_IMPLS = flags.DEFINE_list("impls", list(objectives.IMPLS),
                           f"Penalty implementations to measure, from {list(objectives.IMPLS)}.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Global batch size; default: each model's config batch size.")
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


def flat_gradient(params, batch_stats, batch, apply_fn, penalty) -> np.ndarray:
  _, grads = jax.jit(functools.partial(objectives.penalized_value_and_grad, apply_fn=apply_fn,
                                       penalty=penalty))(params, batch_stats, batch)
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(grads)]).astype(np.float64)


def measure_model(name: str, batch_size: int | None, impls: list[str], steps: int,
                  warmup_steps: int) -> dict:
  """Times the plain step and each impl's step for one model; returns its results row."""
  config_module, image_shape = BENCHMARKS[name]
  config = config_module.get_config()
  batch_size = batch_size or config.data.batch_size
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh.devices.size, "--batch_size")
  model = models.build_model(config.model, NUM_CLASSES)
  optimizer = train.build_optimizer(config.optim, total_steps=1000, steps_per_epoch=100)
  batch = synthetic_batch(batch_size, image_shape, NUM_CLASSES, mesh)
  initial_state = jax.jit(functools.partial(
      train.create_train_state, model=model, optimizer=optimizer, image_shape=image_shape),
      out_shardings=parallel.replicated(mesh))(jax.random.key(0))

  penalties = {PLAIN: None}
  for impl in impls:
    config.reg.impl = impl
    penalties[impl] = train.build_penalty(config.reg)

  steps_by_variant, states, rows = {}, {}, {}
  for variant, penalty in penalties.items():
    step = train.jit_train_step(train.make_train_step(model.apply, optimizer, penalty), mesh,
                                initial_state)
    start = time.perf_counter()
    compiled = step.lower(initial_state, batch).compile()
    rows[variant] = {"compile_s": time.perf_counter() - start,
                     "peak_memory_bytes": peak_memory_bytes(compiled)}
    steps_by_variant[variant] = compiled
    # The step donates its state, so each variant runs on its own copy.
    state = jax.tree.map(jnp.copy, initial_state)
    for _ in range(warmup_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    states[variant] = state

  times = {variant: [] for variant in penalties}
  for _ in range(steps):
    for variant, compiled in steps_by_variant.items():
      start = time.perf_counter()
      states[variant], metrics = compiled(states[variant], batch)
      jax.block_until_ready((states[variant], metrics))
      times[variant].append(time.perf_counter() - start)

  plain_time = statistics.median(times[PLAIN])
  reference = None
  if "nested" in impls:
    reference = flat_gradient(initial_state.params, initial_state.batch_stats, batch, model.apply,
                              penalties["nested"])
  for variant, row in rows.items():
    row["median_step_s"] = statistics.median(times[variant])
    row["ratio_to_plain"] = row["median_step_s"] / plain_time
    if reference is not None and variant != PLAIN:
      grad = flat_gradient(initial_state.params, initial_state.batch_stats, batch, model.apply,
                           penalties[variant])
      row["grad_error_vs_nested"] = float(np.linalg.norm(grad - reference)
                                          / np.linalg.norm(reference))
  return {"model": name, "batch_size": batch_size, "image_shape": list(image_shape),
          "lambda_w": config.reg.lambda_w, "lambda_a": config.reg.lambda_a,
          "fd_step": config.reg.fd_step,
          "steps": steps, "variants": rows}


def markdown_table(results: dict) -> str:
  lines = [f"Device: {results['device_kind']} x{results['num_devices']} ({results['platform']}), "
           f"jax {results['jax_version']}; median of {results['steps']} interleaved steps.", "",
           "| model | batch | variant | step (ms) | × plain | peak memory (MiB) | "
           "grad error vs nested |",
           "|---|---|---|---|---|---|---|"]
  for model in results["models"]:
    for variant, row in model["variants"].items():
      error = row.get("grad_error_vs_nested")
      lines.append(
          f"| {model['model']} | {model['batch_size']} | {variant} | "
          f"{1e3 * row['median_step_s']:.1f} | {row['ratio_to_plain']:.2f} | "
          f"{row['peak_memory_bytes'] / 2**20:.1f} | {'' if error is None else f'{error:.1e}'} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [m for m in _MODELS.value if m not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f"Unknown --models {unknown}; expected some of {list(BENCHMARKS)}.")
  if not _IMPLS.value:
    raise app.UsageError(f"--impls is empty; expected some of {list(objectives.IMPLS)}.")
  device = jax.devices()[0]
  results = {"device_kind": device.device_kind, "platform": device.platform,
             "num_devices": jax.device_count(), "jax_version": jax.__version__,
             "steps": _STEPS.value, "models": []}
  for name in _MODELS.value:
    results["models"].append(measure_model(name, _BATCH_SIZE.value, _IMPLS.value, _STEPS.value,
                                           _WARMUP_STEPS.value))
  table = markdown_table(results)
  print(table)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUTPUT_DIR.value, "step_cost.md"), "w") as f:
    f.write(table)
  with open(os.path.join(_OUTPUT_DIR.value, "step_cost.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
