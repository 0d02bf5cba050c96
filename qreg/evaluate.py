"""Rerun the post-training quantization sweep on a trained workdir, or evaluate an export file.

    python -m qreg.evaluate --workdir=<dir> [--config=<file> --config.quant.per_channel=True ...]
    python -m qreg.evaluate --workdir=<dir> --export=<file>

The first reruns the sweep (qreg.ptq) on the workdir's last checkpoint and
writes results.{json,md,png} there; the config defaults to the one the run
was trained with (workdir/config.json). The second measures the accuracy of
the integer weights of a qreg.export file: at its stored activation ranges
when it has them (no training data needed), else at each of the config's
activation settings for its weight bit-width, calibrated on training batches.
"""
import functools
import os
from typing import Any

import ml_collections
from absl import flags

from qreg import checkpoint, cli, data, integer_file, main, models, parallel, ptq, report
from qreg import config as config_lib


def _validated_mesh(config: ml_collections.ConfigDict):
  mesh = parallel.make_mesh()
  config_lib.validate(config, mesh.devices.size)
  return mesh


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Reruns only the PTQ sweep on the workdir's last checkpoint; writes results like training."""
  workdir = os.path.abspath(workdir)
  mesh = _validated_mesh(config)
  run = checkpoint.load_run(workdir, config)
  pipeline = data.build_input_pipeline(config.data)
  setup = ptq.sweep_setup(config, run.model, pipeline.info.image_shape)
  with checkpoint.workdir_lock(workdir):
    return main.sweep_and_write(config, setup, run.model, run.variables, pipeline, mesh, workdir,
                                run.step)


def evaluate_export(config: ml_collections.ConfigDict, workdir: str, path: str) -> dict[str, Any]:
  """Accuracy of an export file's weights (and stored activation ranges, if any); written to
  workdir/export_w<bits>[_a<bits>]_results.{json,md}."""
  mesh = _validated_mesh(config)
  setup = ptq.build_quant_setup(config.quant)
  model = ptq.sweep_model(setup, models.build_model(config.model,
                                                    data.num_classes(config.data.name)))
  params, ranges, header = integer_file.load(path)
  weight_bits = header["weight_bits"]
  pipeline = data.build_input_pipeline(config.data)
  evaluator = ptq.SweepEvaluator(model, pipeline, mesh, setup, config.eval.batch_size)
  if ranges is not None:
    schemes = ptq.model_tap_schemes(model, setup, pipeline.info.image_shape)
    differing = sorted(name for name, e in header["activations"].items()
                       if e["scheme"] != schemes.get(name))
    if differing:
      raise ValueError(f"{path} quantizes the activations at {', '.join(differing)} with "
                       f"another scheme than the model does there (quant.act_scheme="
                       f"{config.quant.act_scheme!r}; signed taps are symmetric).")
    rows = [{"weight_bits": weight_bits, "act_bits": header["act_bits"],
             "accuracy": evaluator.accuracy(params, header["act_bits"], ranges=ranges)}]
  else:
    act_settings = [a for w, a in config_lib.parse_bit_settings(config.quant.bit_settings)
                    if w == weight_bits] or [None]
    samples = (evaluator.calibration_samples(params) if any(a is not None for a in act_settings)
               else None)
    rows = [{"weight_bits": weight_bits, "act_bits": a,
             "accuracy": evaluator.accuracy(params, a, samples)} for a in act_settings]
  results = {"rows": rows, "export": os.path.abspath(path), "quantization": header["quantization"]}
  table = report.results_table(results)
  report.print_once(table)
  act_suffix = f"_a{header['act_bits']}" if ranges is not None else ""
  name = os.path.join(workdir, f"export_w{weight_bits}{act_suffix}_results")
  report.write_json_atomic(f"{name}.json", results)
  report.write_text_atomic(f"{name}.md", f"From {path}\n\n{table}")
  return results


def evaluate_command(config_flag, workdir_flag, export_flag, argv) -> None:
  del argv
  cli.configure_logging()
  config = config_flag.value or checkpoint.read_run_config(workdir_flag.value)
  if export_flag.value:
    evaluate_export(config, workdir_flag.value, export_flag.value)
  else:
    evaluate_workdir(config, workdir_flag.value)


if __name__ == "__main__":
  # Flags are defined only when run, so that importing this module defines none.
  cli.run(functools.partial(
      evaluate_command, cli.define_config_flag(required=False),
      flags.DEFINE_string("workdir", None, "Workdir of a trained run.", required=True),
      flags.DEFINE_string("export", None,
                          "Evaluate this qreg.export file instead of the last checkpoint.")))
