"""Integer export: store the float model once, ship it at whatever bit-width a device needs.

    python -m qreg.export --workdir=<dir> --weight_bits=4 --out=<file>

folds BatchNorm into the last checkpoint's layers and writes the kernels as
b-bit integers packed into bytes (two 4-bit values per byte, 8 6-bit values
per 6 bytes, ...) with their scales (and zero points for the asymmetric
scheme); biases and other leaves stay float32. Scheme, granularity and
per-layer rules come from the run's config (workdir/config.json). The file is
an uncompressed .npz: one array per entry plus a JSON index.

    python -m qreg.evaluate --config=<config> --workdir=<dir> --export=<file>

evaluates it; its dequantized weights are bit-identical to the fake-quantized
weights of the sweep, so it gets exactly the sweep's accuracy.
"""
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from qreg import evaluate, quant, report
from qreg.models import BN_EPSILON

FORMAT = "qreg-int-export-v1"
PyTree = Any


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """Packs non-negative integers < 2**bits into a little-endian bit stream of bytes."""
  values = np.asarray(values, np.uint32).ravel()
  if values.size and int(values.max()) >= 2**bits:
    raise ValueError(f"Value {int(values.max())} does not fit in {bits} bits.")
  bit_matrix = (values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
  return np.packbits(bit_matrix.astype(np.uint8).ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of pack_bits for `count` values."""
  bit_matrix = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
  return (bit_matrix.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1)


def export_arrays(folded_params: PyTree, bits: int | None, setup: evaluate.QuantSetup
                  ) -> dict[str, np.ndarray]:
  """The file's entries: packed codes, scales, zero points and float leaves, plus a JSON index."""
  qtree = setup.weight_integers(folded_params, bits)
  arrays, index = {}, {}
  leaves = jax.tree_util.tree_leaves_with_path(
      qtree, is_leaf=lambda leaf: isinstance(leaf, quant.Quantized))
  for path, leaf in leaves:
    name = "/".join(quant.path_names(path))
    if isinstance(leaf, quant.Quantized):
      qmin, _ = quant.integer_range(leaf.bits, leaf.scheme)
      codes = np.asarray(leaf.codes)
      arrays[f"{name}:codes"] = pack_bits(codes - qmin, leaf.bits)
      arrays[f"{name}:scale"] = np.asarray(leaf.scale, np.float32)
      arrays[f"{name}:zero_point"] = np.asarray(leaf.zero_point, np.int32)
      index[name] = {"kind": "quantized", "shape": list(codes.shape), "bits": leaf.bits,
                     "scheme": leaf.scheme}
    else:
      arrays[name] = np.asarray(leaf, np.float32)
      index[name] = {"kind": "float"}
  header = {"format": FORMAT, "weight_bits": bits, "quantization": setup.describe(), "leaves": index}
  arrays["index.json"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  return arrays


def save(path: str, arrays: dict[str, np.ndarray]) -> None:
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def load(path: str) -> tuple[PyTree, dict[str, Any]]:
  """The dequantized (float) params of an export file and its header."""
  try:
    with np.load(path) as npz:
      arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["index.json"].tobytes())
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path} is not a readable qreg export file: {e}") from e
  if header.get("format") != FORMAT:
    raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}.")
  params = {}
  for name, entry in header["leaves"].items():
    if entry["kind"] == "quantized":
      bits, shape = entry["bits"], tuple(entry["shape"])
      qmin, _ = quant.integer_range(bits, entry["scheme"])
      codes = unpack_bits(arrays[f"{name}:codes"], bits, int(np.prod(shape))).astype(np.int32)
      leaf = quant.dequantize(quant.Quantized(
          codes.reshape(shape) + qmin, arrays[f"{name}:scale"], arrays[f"{name}:zero_point"],
          bits, entry["scheme"]))
    else:
      leaf = arrays[name]
    *parents, last = name.split("/")
    node = params
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = jax.numpy.asarray(leaf)
  return params, header


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json), on top of configs/base.py's
  defaults so that workdirs written before a field existed still load."""
  from configs import base  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a qreg workdir?")
  with open(path) as f:
    stored = json.load(f)

  def merge(config, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
        merge(config[key], value)
      else:
        config[key] = value

  config = base.get_base_config()
  with config.unlocked():
    merge(config, stored)
  return config


def export_checkpoint(workdir: str, weight_bits: int, out: str) -> dict[str, int]:
  """Exports the workdir's last checkpoint at weight_bits to `out`; returns sizes in bytes."""
  from qreg import train  # pylint: disable=g-import-not-at-top  (heavy; only the CLI needs it)
  quant.check_bits(weight_bits, "weight_bits")
  config = load_run_config(workdir)
  _, _, _, state = train.load_trained(config, workdir)
  folded = quant.fold_batch_norm(state.params, state.batch_stats, BN_EPSILON)
  save(out, export_arrays(folded, weight_bits, evaluate.build_quant_setup(config.quant)))
  float_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(folded))
  return {"export_bytes": os.path.getsize(out), "float_params_bytes": float_bytes}


def evaluate_export(config: ml_collections.ConfigDict, workdir: str, path: str) -> dict[str, Any]:
  """Accuracy of an export file's weights at each of config's activation settings for its bit-width."""
  from qreg import data, models, parallel  # pylint: disable=g-import-not-at-top
  params, header = load(path)
  weight_bits = header["weight_bits"]
  mesh = parallel.make_mesh()
  pipeline = data.build_input_pipeline(config.data)
  model = models.build_model(config.model, pipeline.info.num_classes)
  evaluator = evaluate.SweepEvaluator(model, pipeline, mesh, evaluate.build_quant_setup(config.quant),
                                      config.eval.batch_size)
  act_settings = [a for w, a in evaluate.parse_bit_settings(config.quant.bit_settings)
                  if w == weight_bits] or [None]
  samples = evaluator.calibration_samples(params) if any(a is not None for a in act_settings) else None
  rows = [{"weight_bits": weight_bits, "act_bits": a, "accuracy": evaluator.accuracy(params, a, samples)}
          for a in act_settings]
  results = {"rows": rows, "export": os.path.abspath(path), "quantization": header["quantization"]}
  table = report.results_table(results)
  print(table)
  name = f"export_w{weight_bits}_results"
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(f"From {path}\n\n{table}")
  return results


def _command_line() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  workdir = flags.DEFINE_string("workdir", None, "Workdir of a trained run.")
  weight_bits = flags.DEFINE_integer("weight_bits", None, "Bit-width of the exported kernels.")
  out = flags.DEFINE_string("out", None, "Output file (.npz).")
  flags.mark_flags_as_required(["workdir", "weight_bits", "out"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sizes = export_checkpoint(workdir.value, weight_bits.value, out.value)
    print(f"Wrote {out.value}: {sizes['export_bytes']:,} bytes; float32 folded params "
          f"{sizes['float_params_bytes']:,} bytes (ratio {sizes['export_bytes'] / sizes['float_params_bytes']:.3f}, "
          f"{weight_bits.value}/32 = {weight_bits.value / 32:.3f}).")

  app.run(main)


if __name__ == "__main__":
  _command_line()
