"""What MobileNetV2 costs on 28x28 inputs per stem and width, against the VGG-like row of the
CPU-scale Table 1 (why configs/fashion_mnist_mobilenetv2.py is sized so).

    python -m benchmarks.mobilenet_stems --steps=5 --output_dir=benchmarks/results/table1_networks_cpu

The bare step (benchmarks.step_cost's: value_and_grad of the cross-entropy and the optimizer
update, the offline default's SGD) of VGG-like at width 1/8 and of MobileNetV2 at each
(stem, width), batch 128, synthetic 28x28x1 data; steps of all variants interleaved round by
round, median per variant, each as a multiple of VGG-like's. Writes mobilenet_stems.md/json.
"""
import functools
import os

import jax
import jax.numpy as jnp

# --steps and --output_dir are step_cost's flags (defined there, shared by this benchmark).
from benchmarks.step_cost import (_OUTPUT_DIR, _STEPS, NUM_CLASSES, make_bare_train_step,
                                  median_step_seconds, synthetic_batch)
from configs import fashion_mnist_mobilenetv2, fashion_mnist_vgg
from qreg import cli, models, parallel, report, train

VARIANTS = (("cifar", 0.25), ("stride16", 0.25), ("stride16", 0.35), ("stride16", 0.5),
            ("imagenet", 0.5))
IMAGE_SHAPE = (28, 28, 1)
REFERENCE = "vgg_like width 0.125"

BATCH_SIZE = 128


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  batch = synthetic_batch(BATCH_SIZE, IMAGE_SHAPE, NUM_CLASSES, mesh)
  configs = {REFERENCE: fashion_mnist_vgg.get_config()}
  for stem, width in VARIANTS:
    config = fashion_mnist_mobilenetv2.get_config()
    config.model.stem, config.model.width = stem, width
    configs[f"mobilenetv2 {stem} width {width:g}"] = config
  compiled, states = {}, {}
  for name, config in configs.items():
    model = models.build_model(config.model, NUM_CLASSES)
    optimizer = train.build_optimizer(config.optim, total_steps=1000, steps_per_epoch=100)
    state = jax.jit(functools.partial(train.create_train_state, model=model, optimizer=optimizer,
                                      image_shape=IMAGE_SHAPE),
                    out_shardings=parallel.replicated(mesh))(jax.random.key(0))
    step = train.jit_train_step(make_bare_train_step(model.apply, optimizer), mesh, state)
    compiled[name] = step.lower(state, batch).compile()
    states[name], _ = compiled[name](jax.tree.map(jnp.copy, state), batch)  # warm-up
    print(f"compiled {name}", flush=True)
  medians = median_step_seconds(compiled, states, batch, _STEPS.value)
  rows = [{"model": name, "step_ms": 1e3 * m, "ratio_to_vgg": m / medians[REFERENCE]}
          for name, m in medians.items()]
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  report.write_json_atomic(os.path.join(_OUTPUT_DIR.value, "mobilenet_stems.json"),
                           {"batch_size": BATCH_SIZE, "steps": _STEPS.value,
                            "device": str(jax.devices()[0].device_kind), "rows": rows})
  lines = [f"Bare step, batch {BATCH_SIZE}, 28x28x1, median of {_STEPS.value} interleaved "
           f"rounds on {jax.devices()[0].device_kind}.", "",
           "| model | step (ms) | x VGG-like 1/8 |", "|---|---|---|"]
  lines += [f"| {r['model']} | {r['step_ms']:.0f} | {r['ratio_to_vgg']:.2f} |" for r in rows]
  report.write_text_atomic(os.path.join(_OUTPUT_DIR.value, "mobilenet_stems.md"),
                           "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  cli.run(main)
