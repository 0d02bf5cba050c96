"""How closely onnxruntime on an exported ONNX graph reproduces the sweep's quantized model.

    python -m experiments.onnx_agreement --workdir=<trained run> --weight_bits=4 --act_bits=4 \
        --out=experiments/results/onnx_agreement

Exports the run's last checkpoint (qreg.export --format=onnx), runs it on the test split in
onnxruntime twice, as written (no graph optimization) and with its default optimizations (QDQ
pairs fused into integer kernels), and compares each with qreg's own fake-quantized model, the
sweep's: accuracy, and how many predictions differ. Writes agreement.json and agreement.md.
"""
import os

import numpy as np
import onnxruntime as ort
from absl import flags

from qreg import checkpoint, cli, data, export, parallel, ptq, report


def _test_split(config) -> tuple[np.ndarray, np.ndarray]:
  pipeline = data.build_input_pipeline(config.data)
  images, labels = [], []
  for batch in pipeline.eval_batches(config.eval.batch_size, split="test"):
    real = batch["mask"] > 0
    images.append(batch["image"][real])
    labels.append(batch["label"][real])
  return np.concatenate(images).astype(np.float32), np.concatenate(labels)


def _onnx_predictions(path: str, images: np.ndarray, optimize: bool) -> np.ndarray:
  options = ort.SessionOptions()
  if not optimize:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  return np.concatenate([session.run(None, {"images": images[i:i + 1000]})[0].argmax(-1)
                         for i in range(0, len(images), 1000)])


def agreement(workdir: str, weight_bits: int, act_bits: int, out: str) -> str:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"model_w{weight_bits}a{act_bits}.onnx")
  export.export_workdir(workdir, weight_bits, path, act_bits, file_format="onnx")
  run = checkpoint.load_run(workdir)
  config = run.config
  images, labels = _test_split(config)
  pipeline = data.build_input_pipeline(config.data)
  setup = ptq.sweep_setup(config, run.model, pipeline.info.image_shape)
  model, folded = ptq.prepare_folded(setup, run.model, run.variables["params"],
                                     run.variables["batch_stats"])
  evaluator = ptq.SweepEvaluator(model, pipeline, parallel.make_mesh(), setup,
                                 config.eval.batch_size)
  qparams = setup.quantize_weights(folded, weight_bits)
  ranges = evaluator.activation_ranges(qparams, act_bits)
  apply = model.clone(folded=True, act_bits=act_bits, act_scheme=setup.act_scheme).apply
  qreg_predictions = np.concatenate([
      np.asarray(apply({"params": qparams, "activation_ranges": ranges}, images[i:i + 1000],
                       train=False)).argmax(-1) for i in range(0, len(images), 1000)])
  rows = [{"runtime": "qreg (the sweep's model)", "accuracy": float(np.mean(qreg_predictions == labels)),
           "differing_predictions": 0}]
  for optimize, name in ((False, "onnxruntime, graph as written"),
                         (True, "onnxruntime, default optimizations")):
    predictions = _onnx_predictions(path, images, optimize)
    rows.append({"runtime": name, "accuracy": float(np.mean(predictions == labels)),
                 "differing_predictions": int(np.sum(predictions != qreg_predictions))})
  result = {"workdir": workdir, "weight_bits": weight_bits, "act_bits": act_bits,
            "examples": int(len(labels)), "onnx_bytes": os.path.getsize(path), "rows": rows,
            "environment": report.environment(), "onnxruntime": ort.__version__}
  report.write_json_atomic(os.path.join(out, "agreement.json"), result)
  lines = [f"W{weight_bits}A{act_bits}, {len(labels):,} test examples, onnxruntime "
           f"{ort.__version__} (CPU):", "",
           "| runtime | accuracy (%) | predictions differing from qreg's |", "|---|---|---|"]
  lines += [f"| {r['runtime']} | {100 * r['accuracy']:.2f} | {r['differing_predictions']} |"
            for r in rows]
  text = "\n".join(lines) + "\n"
  report.write_text_atomic(os.path.join(out, "agreement.md"), text)
  os.remove(path)  # the graph is rebuilt by the command; only the measurements are kept
  return text


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained run.", required=True)
  _WEIGHT_BITS = flags.DEFINE_integer("weight_bits", 4, "Weight bits.")
  _ACT_BITS = flags.DEFINE_integer("act_bits", 4, "Activation bits.")
  _OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
  cli.run(lambda argv: print(agreement(_WORKDIR.value, _WEIGHT_BITS.value, _ACT_BITS.value,
                                       _OUT.value)))
