"""Integer export: store the float model once, ship it at whatever bit-width a device needs.

    python -m qreg.export --workdir=<dir> --weight_bits=4 [--act_bits=8] --out=<file>
    python -m qreg.export --format=onnx --workdir=<dir> --weight_bits=4 --act_bits=4 --out=m.onnx
    python -m qreg.export --workdir=<dir> --bit_budget=3 --sensitivity=bound --act_bits=8 --out=<file>

folds BatchNorm into the last checkpoint's layers and writes the kernels as
b-bit integers packed into bytes with their scales (and zero points for the
asymmetric scheme); biases stay float32. With --act_bits it also stores the
range, scale and zero point of every quantized activation, calibrated on the
run's training batches, so that the file alone runs the quantized model.
Scheme, granularity, per-layer rules and calibration come from the run's
config (workdir/config.json). docs/export.md specifies the format.

    python -m qreg.evaluate --workdir=<dir> --export=<file>

evaluates it; its dequantized weights are bit-identical to the fake-quantized
weights of the sweep, so it gets exactly the sweep's accuracy.
"""
import dataclasses
import os

import jax
import numpy as np
from absl import flags

from qreg import checkpoint, cli, data, integer_file, mixed, onnx_export, parallel, ptq, quant
from qreg import report
from qreg import config as config_lib


FORMATS = ("npz", "onnx")


def export_workdir(workdir: str, weight_bits: int | None, out: str,
                   act_bits: int | None = None, file_format: str = "npz",
                   bit_budget: float | None = None, sensitivity: str = "bound",
                   int4: bool = False) -> dict[str, int]:
  """Exports the workdir's last checkpoint to `out`; returns sizes in bytes.

  file_format: 'npz', the packed integer file (docs/export.md), or 'onnx', a QDQ graph that
  onnxruntime runs (qreg.onnx_export). Kernels at weight_bits, or (bit_budget instead) at the
  bits per kernel that mixed precision allocates for that average on `sensitivity` (the run's
  quant.bit_choices and quant.budget_allocation), as the sweep's mixed rows. int4: ONNX
  initializers of int4/uint4 for kernels of 4 bits or fewer. Needs only the workdir, plus the
  training data's calibration batches when act_bits or bit_budget is set.
  """
  if file_format not in FORMATS:
    raise ValueError(f"--format={file_format!r}: expected one of {FORMATS}.")
  if (weight_bits is None) == (bit_budget is None):
    raise ValueError("Pass exactly one of --weight_bits and --bit_budget.")
  if int4 and file_format != "onnx":
    raise ValueError("--int4 is an ONNX container; the npz file packs every bit-width already.")
  quant.check_bits(weight_bits, "--weight_bits")
  quant.check_bits(act_bits, "--act_bits")
  config, _, variables, model = checkpoint.load_run(workdir)
  if config.quant.adaround or config.quant.bias_correction:
    raise ValueError("qreg.export writes rounded-to-nearest kernels; quant.adaround and "
                     "quant.bias_correction are not exported yet.")
  setup = ptq.sweep_setup(config, model,
                          data.image_shape(config.data.name, config.data.image_size))
  # Folded, and equalized with quant.cross_layer_equalization / quant.bias_absorption.
  model, folded = ptq.prepare_folded(setup, model, variables["params"], variables["batch_stats"])
  ranges, samples, evaluator = None, None, None
  if act_bits is not None or bit_budget is not None:
    mesh = parallel.make_mesh()
    config_lib.validate(config, mesh.devices.size)
    evaluator = ptq.SweepEvaluator(model, data.build_input_pipeline(config.data), mesh, setup,
                                   config.eval.batch_size)
  if bit_budget is not None:
    widths = ptq.allocate_budget(evaluator, folded, config.quant, bit_budget, sensitivity)
    setup = dataclasses.replace(setup, weight_rules=mixed.width_rules(widths))
    evaluator = evaluator.with_setup(setup)
    weight_bits = max(config.quant.bit_choices)  # every kernel has its rule
  if act_bits is not None:
    qparams = setup.quantize_weights(folded, weight_bits)
    samples = evaluator.calibration_samples(qparams)
    ranges = evaluator.activation_ranges(qparams, act_bits, samples)
  integers = setup.weight_integers(folded, weight_bits)
  schemes = ptq.tap_schemes(samples, setup) if samples is not None else {}
  if file_format == "onnx":
    graph = onnx_export.build(
        model, integers, data.image_shape(config.data.name, config.data.image_size), act_bits,
        ranges, schemes, int4)
    with report.atomic_file(out, "wb") as f:
      f.write(graph.SerializeToString())
  else:
    integer_file.save(out, integer_file.export_arrays(
        integers, quantization=setup.describe(), weight_bits=weight_bits, act_bits=act_bits,
        act_schemes=schemes, activation_ranges=ranges, bit_budget=bit_budget))
  float_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(folded))
  return {"export_bytes": os.path.getsize(out), "float_params_bytes": float_bytes}


def main(workdir: str, weight_bits: int | None, out: str, act_bits: int | None,
         file_format: str = "npz", bit_budget: float | None = None,
         sensitivity: str = "bound", int4: bool = False) -> None:
  cli.configure_logging()
  sizes = export_workdir(workdir, weight_bits, out, act_bits, file_format, bit_budget,
                         sensitivity, int4)
  bits = weight_bits if bit_budget is None else bit_budget
  print(f"Wrote {out}: {sizes['export_bytes']:,} bytes; float32 folded params "
        f"{sizes['float_params_bytes']:,} bytes (ratio "
        f"{sizes['export_bytes'] / sizes['float_params_bytes']:.3f}, "
        f"{bits:g}/32 = {bits / 32:.3f}).")


if __name__ == "__main__":
  # Flags are defined only when run, so that importing this module defines none.
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained run.", required=True)
  _WEIGHT_BITS = flags.DEFINE_integer("weight_bits", None, "Bit-width of the exported kernels.")
  _BIT_BUDGET = flags.DEFINE_float("bit_budget", None,
                                   "Instead of --weight_bits: mixed precision, bits per kernel "
                                   "allocated for this average bits per weight.")
  _SENSITIVITY = flags.DEFINE_enum("sensitivity", "bound", list(mixed.SENSITIVITIES),
                                   "The per-kernel sensitivity --bit_budget allocates on.")
  _ACT_BITS = flags.DEFINE_integer("act_bits", None,
                                   "Also store activation ranges for this bit-width (calibrated "
                                   "on training batches).")
  _OUT = flags.DEFINE_string("out", None, "Output file (.npz or .onnx).", required=True)
  _FORMAT = flags.DEFINE_enum("format", "npz", list(FORMATS),
                              "npz: the packed integer file; onnx: a QDQ graph for onnxruntime.")
  _INT4 = flags.DEFINE_bool("int4", False, "ONNX: kernels of 4 bits or fewer in int4/uint4 "
                            "initializers (half the bytes; onnxruntime's CPU runs them).")
  cli.run(lambda argv: main(_WORKDIR.value, _WEIGHT_BITS.value, _OUT.value, _ACT_BITS.value,
                            _FORMAT.value, _BIT_BUDGET.value, _SENSITIVITY.value, _INT4.value))
