"""How close reg.impl='finite_difference' comes to the exact penalty gradient, per step h.

    python -m experiments.fd_step_error            # ~2 minutes on 2 CPU cores

Trains SmallCNN on Fashion-MNIST (configs/fashion_mnist.py) for a few plain
steps, then on one batch compares, for each penalty term alone and both, the
float32 finite-difference gradient at several fd_step values with the exact
gradient (impl='hvp' in float64, itself checked against 'nested' by the
tests). Prints, per step, the error relative to the penalty's gradient,
||g_fd - g|| / ||g - dL/dtheta||, and the cosine between the two penalty
gradients. The choice of qreg.objectives.FD_STEP rests on this table.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from configs import fashion_mnist
from qreg import cli, data, models, objectives, parallel, train

_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 60, "Plain SGD steps before measuring.")
_FD_STEPS = flags.DEFINE_list("fd_steps", ["1e-1", "1e-2", "3e-3", "1e-3", "3e-4", "1e-4", "1e-5"],
                              "Finite-difference steps to compare.")


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)]).astype(np.float64)


def exact_gradient(params, batch_stats, batch, apply_fn, penalty) -> np.ndarray:
  with jax.enable_x64(True):
    as_float64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    _, grads = objectives.hvp_value_and_grad(
        as_float64(params), as_float64(batch_stats),
        dict(batch, image=as_float64(batch["image"])), apply_fn, penalty._replace(impl="hvp"))
    return flat(grads)


def main(argv):
  del argv
  config = fashion_mnist.get_config()
  mesh = parallel.make_mesh()
  pipeline = data.build_input_pipeline(config.data)
  model = models.build_model(config.model, pipeline.info.num_classes)
  optimizer = train.build_optimizer(config.optim, total_steps=10 * _TRAIN_STEPS.value,
                                    steps_per_epoch=_TRAIN_STEPS.value)
  state = jax.jit(functools.partial(train.create_train_state, model=model, optimizer=optimizer,
                                    image_shape=pipeline.info.image_shape),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))
  plain_step = train.jit_train_step(train.make_train_step(model.apply, optimizer, None), mesh,
                                    state)
  batches = pipeline.train_batches(config.data.batch_size, config.seed, 0)
  for _ in range(_TRAIN_STEPS.value):
    state, metrics = plain_step(state, parallel.global_batch(next(batches), mesh))
  print(f"After {_TRAIN_STEPS.value} plain steps: task loss {float(metrics['loss']):.3f}.\n")

  batch = parallel.global_batch(next(batches), mesh)
  args = (state.params, state.batch_stats, batch, model.apply)
  task_gradient = exact_gradient(*args, objectives.Penalty(0.0, 0.0))
  print("| lambda_w | lambda_a | fd_step | error / ||penalty grad|| | cosine |")
  print("|---|---|---|---|---|")
  lam_w, lam_a = config.reg.lambda_w, config.reg.lambda_a
  for penalty in (objectives.Penalty(lam_w, 0.0), objectives.Penalty(0.0, lam_a),
                  objectives.Penalty(lam_w, lam_a)):
    exact = exact_gradient(*args, penalty)
    penalty_gradient = exact - task_gradient
    for fd_step in map(float, _FD_STEPS.value):
      fd = penalty._replace(impl="finite_difference", fd_step=fd_step)
      _, grads = jax.jit(functools.partial(objectives.penalized_value_and_grad,
                                           apply_fn=model.apply, penalty=fd))(*args[:3])
      fd_penalty_gradient = flat(grads) - task_gradient
      error = np.linalg.norm(fd_penalty_gradient - penalty_gradient) / np.linalg.norm(
          penalty_gradient)
      cosine = fd_penalty_gradient @ penalty_gradient / (
          np.linalg.norm(fd_penalty_gradient) * np.linalg.norm(penalty_gradient))
      print(f"| {penalty.lambda_w} | {penalty.lambda_a} | {fd_step:g} | {error:.2f} | "
            f"{cosine:.2f} |")


if __name__ == "__main__":
  cli.run(main)
