"""Plain train steps per second through the real input pipeline vs on one resident batch.

    python -m benchmarks.input_pipeline [--steps=300] [--output_dir=benchmarks/results/input_pipeline]

On the offline default (configs/fashion_mnist.py: SmallCNN, batch 128, the IDX
files), times the jitted plain step of qreg.train three ways, in one process:
- resident: the same device batch every step (the step alone);
- pipeline: the loop as qreg.train runs it: batches from the input pipeline,
  the metrics of each log window fetched in one jax.device_get, and, where
  qreg.parallel has it, the next batch assembled while the step runs;
- the ratio pipeline / resident: what the host costs.
The loop is written against the API that qreg had before and after the
prefetch was added (the same functions), so the same file measures both.
"""
import functools
import json
import os
import time

import jax
import numpy as np
from absl import flags

from configs import fashion_mnist
from qreg import cli, data, models, parallel, report, train

_STEPS = flags.DEFINE_integer("steps", 300, "Timed steps per variant.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Steps per metrics window.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write input_pipeline.json.")


def main(argv):
  del argv
  config = fashion_mnist.get_config()
  mesh = parallel.make_mesh()
  pipeline = data.build_input_pipeline(config.data)
  model = models.build_model(config.model, pipeline.info.num_classes)
  steps_per_epoch = pipeline.steps_per_epoch(config.data.batch_size)
  optimizer = train.build_optimizer(config.optim, 10 * steps_per_epoch, steps_per_epoch)
  state = jax.jit(functools.partial(train.create_train_state, model=model, optimizer=optimizer,
                                    image_shape=pipeline.info.image_shape),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(0))
  step = train.jit_train_step(train.make_train_step(model.apply, optimizer, None), mesh, state)
  local_batches = pipeline.train_batches(config.data.batch_size, config.seed)
  prefetch = getattr(parallel, "prefetch_to_mesh", None)
  batches = (prefetch(local_batches, mesh) if prefetch else
             (parallel.global_batch(b, mesh) for b in local_batches))
  resident = parallel.global_batch(next(local_batches), mesh)
  for _ in range(5):  # compile and warm up both paths
    state, metrics = step(state, next(batches))
    state, metrics = step(state, resident)
  jax.block_until_ready(metrics)

  def timed(next_batch):
    nonlocal state
    window = []
    start = time.perf_counter()
    for i in range(_STEPS.value):
      state, metrics = step(state, next_batch())
      window.append(metrics)
      if (i + 1) % _LOG_EVERY.value == 0:
        if prefetch:
          window = jax.device_get(window)
        summary = {k: float(np.mean([m[k] for m in window])) for k in window[-1]}
        assert np.isfinite(summary["loss"])
        window = []
    jax.block_until_ready(state)
    return _STEPS.value / (time.perf_counter() - start)

  results = {"resident_steps_per_s": timed(lambda: resident),
             "pipeline_steps_per_s": timed(lambda: next(batches)),
             "prefetch": prefetch is not None, "steps": _STEPS.value,
             "batch_size": config.data.batch_size, "device": jax.devices()[0].device_kind,
             "num_devices": jax.device_count(), "jax_version": jax.__version__}
  results["pipeline_over_resident"] = (results["pipeline_steps_per_s"]
                                       / results["resident_steps_per_s"])
  print(json.dumps(results, indent=2))
  if _OUTPUT_DIR.value:
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    name = "after.json" if prefetch else "before.json"
    report.write_json_atomic(os.path.join(_OUTPUT_DIR.value, name), results)


if __name__ == "__main__":
  cli.run(main)
