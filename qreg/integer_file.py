"""The integer export file: b-bit weight codes packed into bytes, their scales, and the
calibrated range of every quantized activation. docs/export.md specifies it.

An uncompressed .npz (numpy's zip of .npy arrays) with one entry per array and an
`index.json` entry (UTF-8 JSON bytes as uint8) describing them.
"""
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from qreg import quant, report

FORMAT = "qreg-int-export-v2"
# v1 files (weights only) still load.
READABLE_FORMATS = ("qreg-int-export-v1", FORMAT)
PyTree = Any


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """Packs non-negative integers < 2**bits into a little-endian bit stream of bytes: value i
  occupies bits [i*bits, (i+1)*bits) of the stream, least significant bit first, and bit j
  of the stream is bit (j % 8) of byte j // 8."""
  values = np.asarray(values, np.uint32).ravel()
  if values.size and int(values.max()) >= 2**bits:
    raise ValueError(f"Value {int(values.max())} does not fit in {bits} bits.")
  bit_matrix = (values[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
  return np.packbits(bit_matrix.astype(np.uint8).ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of pack_bits for `count` values."""
  bit_matrix = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
  return (bit_matrix.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1)


def _flat(tree: PyTree, is_leaf=None) -> dict[str, Any]:
  return {"/".join(quant.path_names(path)): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def _nest(flat: dict[str, Any]) -> PyTree:
  tree = {}
  for name, leaf in flat.items():
    *parents, last = name.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def _is_range(node) -> bool:
  return isinstance(node, dict) and set(node) == {"min", "max"}


def export_arrays(weight_integers: PyTree, *, quantization: str, weight_bits: int,
                  act_bits: int | None = None, act_schemes: Mapping[str, str] | None = None,
                  activation_ranges: PyTree | None = None,
                  bit_budget: float | None = None) -> dict[str, np.ndarray]:
  """The file's entries from folded params whose kernels are `quant.Quantized` (QuantSetup.
  weight_integers) and, when act_bits is set, the calibrated `activation_ranges` collection
  with each tap's own scheme (act_schemes, 'tap/path' -> scheme: ptq.tap_schemes)."""
  arrays, leaves = {}, {}
  for name, leaf in _flat(weight_integers, lambda x: isinstance(x, quant.Quantized)).items():
    if isinstance(leaf, quant.Quantized):
      qmin, _ = quant.integer_range(leaf.bits, leaf.scheme)
      codes = np.asarray(leaf.codes)
      arrays[f"{name}:codes"] = pack_bits(codes - qmin, leaf.bits)
      arrays[f"{name}:scale"] = np.asarray(leaf.scale, np.float32)
      arrays[f"{name}:zero_point"] = np.asarray(leaf.zero_point, np.int32)
      leaves[name] = {"kind": "quantized", "shape": list(codes.shape), "bits": leaf.bits,
                      "scheme": leaf.scheme, "offset": qmin}
    else:
      arrays[name] = np.asarray(leaf, np.float32)
      leaves[name] = {"kind": "float"}
  activations = {}
  if act_bits is not None:
    for name, point in _flat(activation_ranges, _is_range).items():
      act_scheme = act_schemes[name]
      low, high = float(point["min"]), float(point["max"])
      q = quant.quantize_with_range(np.zeros((), np.float32), np.float32(low), np.float32(high), act_bits,
                                    act_scheme)
      arrays[f"{name}:range"] = np.asarray([low, high], np.float32)
      arrays[f"{name}:scale"] = np.asarray(q.scale, np.float32)
      arrays[f"{name}:zero_point"] = np.asarray(q.zero_point, np.int32)
      activations[name] = {"bits": act_bits, "scheme": act_scheme}
  header = {"format": FORMAT, "weight_bits": weight_bits, "act_bits": act_bits,
            "quantization": quantization, "leaves": leaves, "activations": activations}
  if bit_budget is not None:  # mixed precision: each leaf's own bits are in `leaves`
    header["bit_budget"] = bit_budget
  arrays["index.json"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  return arrays


def save(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes the file whole or not at all; through a file object, as np.savez would append
  .npz to a name."""
  with report.atomic_file(path, "wb") as f:
    np.savez(f, **arrays)


def load(path: str) -> tuple[PyTree, PyTree | None, dict[str, Any]]:
  """(dequantized float params, the `activation_ranges` collection or None, header)."""
  try:
    with np.load(path) as npz:
      arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["index.json"].tobytes())
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path} is not a readable qreg export file: {e}") from e
  if header.get("format") not in READABLE_FORMATS:
    raise ValueError(f"{path}: format {header.get('format')!r}, expected one of {READABLE_FORMATS}.")
  params = {}
  for name, entry in header["leaves"].items():
    if entry["kind"] == "quantized":
      bits, shape = entry["bits"], tuple(entry["shape"])
      qmin, _ = quant.integer_range(bits, entry["scheme"])
      codes = unpack_bits(arrays[f"{name}:codes"], bits, int(np.prod(shape))).astype(np.int32)
      params[name] = quant.dequantize(quant.Quantized(
          codes.reshape(shape) + qmin, arrays[f"{name}:scale"], arrays[f"{name}:zero_point"],
          bits, entry["scheme"]))
    else:
      params[name] = jax.numpy.asarray(arrays[name])
  ranges = {name: {"min": jax.numpy.float32(arrays[f"{name}:range"][0]),
                   "max": jax.numpy.float32(arrays[f"{name}:range"][1])}
            for name in header.get("activations", {})}
  return _nest(params), (_nest(ranges) if ranges else None), header
