"""The paper's motivation, measured: first-order bound vs actual loss change, and ||grad L||_1 over training.

    python -m experiments.analysis --workdirs=<no_reg>,<l1> --labels=no-reg,l1 --out=<dir>

For each trained workdir (BatchNorm folded, eval mode, `--num_batches` test
batches), at each bit-width b with weights and activations quantized as in
the run's sweep config:
  bound    = sum_l (delta_l / 2) ||dL/dW_l||_1 + sum_p (delta_p / 2) ||dL/da_p||_1
  measured = L(quantized) - L(float)
where delta is each tensor's quantization step. To first order |measured| <=
bound (Alizadeh et al. 2020, eq. 3-4). Writes first_order.png / .json and,
from the metrics log, grad_l1.png (the penalty terms over training).
"""
import json
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from qreg import checkpoint, cli, data, objectives, parallel, ptq, quant, report  # pylint: disable=g-import-not-at-top

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Trained workdirs to analyse.")
_LABELS = flags.DEFINE_list("labels", None, "One label per workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_BITS = flags.DEFINE_list("bits", ["3", "4", "5", "6", "8"], "Bit-widths (weights = activations).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 10, "Test batches for the loss and its gradients.")


def _loss_and_gradients(apply_fn, params, perturbations, batch, variables_extra):
  def loss(params, perturbations):
    variables = {"params": params, "perturbations": perturbations, **variables_extra}
    logits = apply_fn(variables, batch["image"], train=False)
    return objectives.cross_entropy(logits, batch["label"])
  return jax.value_and_grad(loss, argnums=(0, 1))(params, perturbations)


def first_order_check(workdir: str, bits_list: list[int], num_batches: int) -> list[dict]:
  """Bound and measured loss change at each bit-width for one workdir's last checkpoint."""
  config, _, variables, model = checkpoint.load_run(workdir)
  mesh = parallel.make_mesh()
  pipeline = data.build_input_pipeline(config.data)
  setup = ptq.build_quant_setup(config.quant)
  evaluator = ptq.SweepEvaluator(model, pipeline, mesh, setup, config.eval.batch_size)
  folded = ptq.fold(variables["params"], variables["batch_stats"])
  float_model = model.clone(folded=True)
  batches = [parallel.global_batch(b, mesh) for b in
             pipeline.eval_batches(config.eval.batch_size, num_batches=num_batches)]
  batches = [b for b in batches if float(b["mask"].min()) == 1.0]  # full batches only
  step = jax.jit(_loss_and_gradients, static_argnums=0)

  def mean_loss_and_grads(apply_fn, params, extra):
    totals = None
    for batch in batches:
      perturbations = objectives.zero_perturbations(float_model.apply, params, {}, batch["image"])
      out = step(apply_fn, params, perturbations, batch, extra)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return jax.tree.map(lambda x: x / len(batches), totals)

  loss0, (grad_w, grad_a) = mean_loss_and_grads(float_model.apply, folded, {})
  rows = []
  for bits in bits_list:
    integers = setup.weight_integers(folded, bits)
    qparams = quant.dequantize_params(integers)
    ranges = evaluator.activation_ranges(qparams, bits)
    qmodel = model.clone(folded=True, act_bits=bits, act_scheme=setup.act_scheme)
    loss_q, _ = mean_loss_and_grads(qmodel.apply, qparams, {"activation_ranges": ranges})
    # Each quantized kernel's step delta (per tensor or per channel, rules applied).
    is_quantized = lambda leaf: isinstance(leaf, quant.Quantized)
    weight_bound = sum(float(jnp.sum(q.scale / 2 * jnp.abs(g)))
                       for q, g in zip(jax.tree.leaves(integers, is_leaf=is_quantized),
                                       jax.tree.leaves(grad_w))
                       if is_quantized(q))
    act_bound = 0.0
    for point, g in grad_a.items():
      low, high = ranges[point]["min"], ranges[point]["max"]
      q = quant.quantize_with_range(jnp.zeros(()), low, high, bits, setup.act_scheme)
      act_bound += float(q.scale / 2 * jnp.sum(jnp.abs(g["activation"])))
    rows.append({"bits": bits, "loss_float": float(loss0), "loss_quantized": float(loss_q),
                 "measured": float(loss_q - loss0), "bound_weights": weight_bound,
                 "bound_activations": act_bound, "bound": weight_bound + act_bound})
    print(f"  {workdir}: {bits} bits: measured {rows[-1]['measured']:+.4f}, "
          f"bound {rows[-1]['bound']:.4f} (weights {weight_bound:.4f}, activations {act_bound:.4f})",
          flush=True)
  return rows


def read_scalars(workdir: str, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
  """Scalars from a workdir's metrics.jsonl (qreg.metrics writes one JSON object per write)."""
  scalars = {tag: [] for tag in tags}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      for tag in tags:
        if tag in record:
          scalars[tag].append((record["step"], record[tag]))
  return {tag: points for tag, points in scalars.items() if points}


def main(argv):
  del argv
  cli.configure_logging()
  workdirs, out = _WORKDIRS.value, _OUT.value
  labels = _LABELS.value or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  bits_list = [int(b) for b in _BITS.value]
  os.makedirs(out, exist_ok=True)
  results = {label: first_order_check(w, bits_list, _NUM_BATCHES.value)
             for label, w in zip(labels, workdirs)}
  report.write_json_atomic(os.path.join(out, "first_order.json"), results)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, rows) in enumerate(results.items()):
    color = f"C{i}"
    x = [r["bits"] for r in rows]
    ax.plot(x, [r["bound"] for r in rows], "--o", color=color,
            label=f"{label}: bound Σ δ/2·‖∇L‖₁")
    ax.plot(x, [r["measured"] for r in rows], "-s", color=color,
            label=f"{label}: measured L(q) − L")
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set_xlabel("bits (weights = activations)")
  ax.set_ylabel("loss change")
  ax.set_title("First-order prediction vs measured loss change (test batches)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "first_order.png"), dpi=120)
  plt.close(fig)

  tags = ("train/grad_l1_weights", "train/grad_l1_activations")
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for i, (label, workdir) in enumerate(zip(labels, workdirs)):
    scalars = read_scalars(workdir, tags)
    for ax, tag in zip(axes, tags):
      if tag in scalars:
        ax.plot(*zip(*scalars[tag]), color=f"C{i}", label=label)
  for ax, tag in zip(axes, tags):
    ax.set_title(tag.split("/")[-1].replace("_", " "))
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "grad_l1.png"), dpi=120)
  plt.close(fig)
  print(f"Wrote {out}/first_order.png, first_order.json, grad_l1.png")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdirs", "out"])
  cli.run(main)
