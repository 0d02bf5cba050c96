"""Does the uniform penalty fall by growing kernels? (issue 23, point 1)

    python -m experiments.drift --reference=<no-reg run>,... --runs=<regularized run>,... \
        --labels=l1,... --out=<dir>

In training mode BatchNorm makes the loss invariant to the scale of the kernel before it:
scaling W_l by s leaves the function alone and divides ||dL/dW_l||_1 by s, so
F_l = ||dL/dW_l||_1 * ||W_l||_2 does not move. The uniform weight term T = sum_l ||dL/dW_l||_1
can therefore fall by kernel growth alone. For each regularized run against the no-reg run of
the same seed (same initialization and batches), from their last checkpoints:

- T, each run's weight term: the mean over training batches (the config's batch size) of
  sum_l ||dL/dW_l||_1, train mode, as the penalty sees it;
- T*, the regularized run's term had its BN-followed kernels kept no-reg's norms (the same
  function): sum over those of F_l / ||W_l^no-reg||, plus the other kernels' terms as they are;
- explained = (T* - T) / (T_no-reg - T), the share of the decrease that kernel growth accounts
  for (1: all of it; 0: none);
- per layer, the kernel and BatchNorm-scale norm ratios to no-reg;
- the same for the activation term A = sum_t ||dL/da_t||_1: scaling a BatchNorm's (gamma, beta)
  by s scales the tap after it by s and, where the next layer's BatchNorm removes the scale,
  divides that tap's term by s. Which tap each BatchNorm frees is found numerically (doubling its
  (gamma, beta) must leave the logits and halve exactly one tap's term), and A* puts each such
  tap's term at no-reg's ||(gamma, beta)||: the term of a rescaled copy of the run with the same
  function.

What this needs of each run (its terms and norms) is kept beside it as drift_terms.json and
archived with its records: drift is computed again from them where the checkpoints are gone.
"""
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import archive, run_sweep
from qreg import cli, data, objectives, quant, report

NUM_BATCHES = 10


def _bn_followed(params, path: str) -> bool:
  """Whether the kernel at path ('conv1/conv/kernel') has a BatchNorm sibling ('conv1/bn')."""
  parent = quant.subtree(params, path.split("/")[:-2])
  return isinstance(parent, dict) and "bn" in parent


def _terms_fn(batch_stats, apply_fn):
  """(params, images, labels) -> (logits, {kernel: ||dL/dW||_1}, {tap: ||dL/da_t||_1}), train mode."""
  @jax.jit
  def terms(params, images, labels):
    batch = {"image": images, "label": labels}
    perturbations = objectives.zero_perturbations(apply_fn, params, batch_stats, images)
    (grad_w, grad_a), (_, (_, logits)) = objectives.task_gradients(
        params, perturbations, batch_stats, batch, apply_fn)
    named = lambda tree: {"/".join(quant.path_names(p)): jnp.sum(jnp.abs(g))
                          for p, g in jax.tree_util.tree_leaves_with_path(tree)}
    kernels = {k: v for k, v in named(grad_w).items() if k.endswith("/kernel")}
    return logits, kernels, named(grad_a)
  return terms


def _batch_norms(params) -> list[str]:
  """Paths of every BatchNorm's params ('conv1/bn')."""
  return ["/".join(quant.path_names(p)[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(params)
          if quant.path_names(p)[-2:] == ("bn", "scale")]


def _scaled_batch_norm(params, bn: str, factor: float):
  node = quant.subtree(params, bn.split("/"))
  return quant.replace_leaf(params, bn.split("/"), {k: v * factor for k, v in node.items()})


def freed_taps(terms, params, images, labels) -> dict[str, str]:
  """{BatchNorm path: the tap whose term doubling its (gamma, beta) halves, the logits kept};
  terms: _terms_fn's function of the run."""
  logits, _, taps = jax.device_get(terms(params, images, labels))
  freed = {}
  for bn in _batch_norms(params):
    logits2, _, taps2 = jax.device_get(terms(_scaled_batch_norm(params, bn, 2.0), images, labels))
    if not np.allclose(logits2, logits, rtol=1e-4, atol=1e-4):
      continue
    halved = [t for t in taps if abs(taps2[t] / taps[t] - 0.5) < 1e-3]
    changed = [t for t in taps if abs(taps2[t] / taps[t] - 1.0) > 1e-3]
    if len(halved) == 1 and changed == halved:
      freed[bn] = halved[0]
  return freed


def gradient_terms(params, batch_stats, apply_fn, batches) -> dict:
  """{'kernels': {path: mean ||dL/dW||_1}, 'taps': {tap: mean ||dL/da_t||_1}, 'activations':
  their sum, 'freed_taps': freed_taps on the first batch}, train mode."""
  terms = _terms_fn(batch_stats, apply_fn)
  per_batch = [jax.device_get(terms(params, images, labels))[1:] for images, labels in batches]
  taps = {k: float(np.mean([b[1][k] for b in per_batch])) for k in per_batch[0][1]}
  return {"kernels": {k: float(np.mean([b[0][k] for b in per_batch])) for k in per_batch[0][0]},
          "taps": taps, "activations": sum(taps.values()),
          "freed_taps": freed_taps(terms, params, *batches[0])}


def _affine_norm(params, bn: str) -> float:
  """||(gamma, beta)|| of the BatchNorm at bn."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(v)))
                           for v in quant.subtree(params, bn.split("/")).values())))


def record(params, terms: dict) -> dict:
  """What compare needs of a run, as plain JSON: its gradient terms (gradient_terms), every
  parameter's norm, the kernels a BatchNorm follows, and each BatchNorm's ||(gamma, beta)||."""
  norms = jax.device_get(objectives.parameter_norms(params))
  return {"terms": terms, "norms": {k: float(v) for k, v in norms.items()},
          "bn_followed": [k for k in terms["kernels"] if _bn_followed(params, k)],
          "affine_norms": {bn: _affine_norm(params, bn) for bn in _batch_norms(params)}}


def compare(reference: dict, regularized: dict) -> dict:
  """The decomposition of the module docstring, from two runs' records (record)."""
  norms_ref, norms = reference["norms"], regularized["norms"]
  g_ref, g = reference["terms"]["kernels"], regularized["terms"]["kernels"]
  counterfactual = sum(g[path] * norms[path] / norms_ref[path]
                       if path in regularized["bn_followed"] else g[path] for path in g)
  total_ref, total = sum(g_ref.values()), sum(g.values())
  decrease = total_ref - total
  taps, a_ref, a = regularized["terms"]["taps"], reference["terms"]["activations"], regularized[
      "terms"]["activations"]
  a_counterfactual = a - sum(taps[t] for t in regularized["terms"]["freed_taps"].values()) + sum(
      taps[t] * regularized["affine_norms"][bn] / reference["affine_norms"][bn]
      for bn, t in regularized["terms"]["freed_taps"].items())
  return {
      "activation_term_at_reference_affine": a_counterfactual,
      "activation_explained_by_affine_growth": ((a_counterfactual - a) / (a_ref - a)
                                                if a_ref > a else None),
      "freed_taps": regularized["terms"]["freed_taps"],
      "weight_term_reference": total_ref, "weight_term": total,
      "weight_term_at_reference_norms": counterfactual,
      "explained_by_kernel_growth": (counterfactual - total) / decrease if decrease > 0 else None,
      "activation_term_reference": reference["terms"]["activations"],
      "activation_term": regularized["terms"]["activations"],
      "norm_ratios": {k: norms[k] / norms_ref[k] for k in norms}}


# Each run's record, kept beside its results (and archived with them, experiments.archive):
# drift is then computed again without the run's checkpoint, e.g. in a fresh clone.
RECORD = "drift_terms.json"


def load(workdir: str, num_batches: int = NUM_BATCHES, rebuild: bool = False) -> dict:
  """A run's record from its last checkpoint, its gradient terms on the first training batches;
  kept as workdir/RECORD (archive.kept). With rebuild, a run restored without its trained model
  is read from its twin (run_sweep.rebuild_twin), whose record the drift's "twin" keeps."""

  def compute():
    model_dir = run_sweep.trained_model_dir(workdir, rebuild)
    run = run_sweep.load_finished_run(model_dir)
    pipeline = data.build_input_pipeline(run.config.data)
    batches = [(b["image"], b["label"]) for b in pipeline.eval_batches(
        run.config.data.batch_size, split="train", num_batches=num_batches)]
    params, batch_stats = run.variables["params"], run.variables["batch_stats"]
    twin = {"twin": run_sweep.read_twin_record(model_dir)} if model_dir != workdir else {}
    return {**record(params, gradient_terms(params, batch_stats, run.model.apply, batches)),
            "batches": num_batches, **twin}

  return archive.kept(workdir, RECORD, num_batches, compute)


def drift(references: Sequence[str], runs: Sequence[str], labels: Sequence[str], out: str,
          rebuild: bool = False) -> str:
  """drift.json and drift.md in out: each run against its reference (same seed). With rebuild,
  runs restored without their trained model are read from their twins (load), the workers of a
  study sharing them (run_sweep.for_each_claimed)."""
  if rebuild:
    run_sweep.for_each_claimed(list(dict.fromkeys([*references, *runs])), lambda d: d,
                               lambda d: load(d, rebuild=True))
  rows = []
  for reference, run, label in zip(references, runs, labels):
    rows.append({"label": label, "run": run, "reference": reference,
                 **compare(load(reference), load(run))})
  os.makedirs(out, exist_ok=True)
  report.write_json_atomic(os.path.join(out, "drift.json"), rows)
  layers = list(rows[0]["norm_ratios"])
  share = lambda x: "" if x is None else f"{x:.3f}"
  lines = ["| run | weight term: no-reg → run | at no-reg's kernel norms | share of the decrease "
           "explained by kernel growth | activation term: no-reg → run | at no-reg's (γ, β) "
           "norms | share explained by (γ, β) growth | "
           + " | ".join(f"{k} norm ratio" for k in layers) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(layers)]
  for r in rows:
    lines.append(
        f"| {r['label']} | {r['weight_term_reference']:.4g} → {r['weight_term']:.4g} | "
        f"{r['weight_term_at_reference_norms']:.4g} | {share(r['explained_by_kernel_growth'])} | "
        f"{r['activation_term_reference']:.4g} → {r['activation_term']:.4g} | "
        f"{r['activation_term_at_reference_affine']:.4g} | "
        f"{share(r['activation_explained_by_affine_growth'])} | "
        + " | ".join(f"{r['norm_ratios'][k]:.3f}" for k in layers) + " |")
  lines.append(f"\nTaps each BatchNorm frees (found numerically): {rows[0]['freed_taps']}")
  table = "\n".join(lines) + "\n"
  report.write_text_atomic(os.path.join(out, "drift.md"), table)
  return table


if __name__ == "__main__":
  _REFERENCE = flags.DEFINE_list("reference", None, "No-reg workdirs, one per run.", required=True)
  _RUNS = flags.DEFINE_list("runs", None, "Regularized workdirs.", required=True)
  _LABELS = flags.DEFINE_list("labels", None, "A label per run.", required=True)
  _OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
  cli.run(lambda argv: print(drift(_REFERENCE.value, _RUNS.value, _LABELS.value, _OUT.value)))
