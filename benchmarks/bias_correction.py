"""Bias correction's cost and numbers on the Table 1 networks, to compare two implementations.

    python -m benchmarks.bias_correction --output=benchmarks/results/bias_correction/<name>.json

For each network (the Table 1 config: VGG-like and ResNet-18 at width 1/8, MobileNetV2 at
0.35, random init with BatchNorm statistics moved off their init values; or, with
--workdir, a trained run) under the strong protocol's setup (per-channel weights, first and
last kernels at 8 bits, bias correction, 5,000 Fashion-MNIST calibration images): the seconds
that `SweepEvaluator.quantized_weights_at` takes to quantize and bias-correct every weight
width of --widths together, and a SHA-256 digest of each width's corrected params. Run it at
two commits and compare the digests: equal digests are bit-identical params.
"""
import hashlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import fashion_mnist_mobilenetv2, fashion_mnist_resnet18, fashion_mnist_vgg
from configs.tables import protocols
from qreg import checkpoint, cli, data, models, parallel, ptq, report
from qreg import config as config_lib

CONFIGS = {"vgg": fashion_mnist_vgg, "resnet18": fashion_mnist_resnet18,
           "mobilenetv2": fashion_mnist_mobilenetv2}

_NETS = flags.DEFINE_list("nets", list(CONFIGS), "networks to correct (random init)")
_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run instead of --nets")
_WIDTHS = flags.DEFINE_list("widths", ["3", "8"], "weight bit-widths corrected together")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write", required=True)


def digest(tree) -> str:
  """SHA-256 over the tree's leaves in flattening order (shape, dtype and bytes of each)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    leaf = np.asarray(leaf)
    h.update(repr((leaf.shape, leaf.dtype.str)).encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def correct(config, variables, model, widths) -> dict:
  config = config_lib.with_overrides(config, protocols.STRONG)
  pipeline = data.build_input_pipeline(config.data)
  setup = ptq.sweep_setup(config, model, pipeline.info.image_shape)
  folded = ptq.fold(variables["params"], variables["batch_stats"])
  evaluator = ptq.SweepEvaluator(model, pipeline, parallel.make_mesh(), setup,
                                 config.eval.batch_size)
  evaluator.calibration_images()  # the data pipeline's start is not timed
  start = time.time()
  done = evaluator.quantized_weights_at(folded, widths)
  seconds = time.time() - start
  return {"seconds": seconds, "kernels": len(evaluator.kernel_order),
          "digests": {str(bits): digest(params) for bits, (params, _) in done.items()}}


def main(argv):
  del argv
  widths = [int(bits) for bits in _WIDTHS.value]
  results = {}
  if _WORKDIR.value:
    run = checkpoint.load_run(_WORKDIR.value)
    results[_WORKDIR.value] = correct(run.config, run.variables, run.model, widths)
  else:
    for net in _NETS.value:
      config = CONFIGS[net].get_config()
      model = models.build_model(config.model, data.num_classes(config.data.name))
      variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
      variables = {**variables, "batch_stats": jax.tree.map(lambda v: v * 0.5 + 0.3,
                                                            variables["batch_stats"])}
      results[net] = correct(config, variables, model, widths)
  for name, result in results.items():
    print(f"{name}: {result['seconds']:.1f} s, {result['kernels']} kernels", flush=True)
  report.write_json_atomic(_OUTPUT.value, {"widths": widths, "results": results})


if __name__ == "__main__":
  cli.run(main)
