"""Architectures: the depthwise conv against XLA's grouped convolution, MobileNetV2 (folding,
the penalty's gradient, its signed taps) and the width multiplier."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from qreg import config as config_lib
from qreg import objectives, quant
from qreg.models import BN_EPSILON, MobileNetV2, build_model
from qreg.models.layers import DepthwiseConv, QuantizedActivation

SHAPE = (2, 28, 28, 1)
TINY_MOBILENET = MobileNetV2(stem="cifar", width_multiplier=0.25)
# The first three stages, shortened: a block without expansion, expanding blocks with and
# without a residual, at strides 1 and 2; a sixth of the layers, for a quick float64 double backprop.
SHALLOW_MOBILENET = TINY_MOBILENET.clone(stages=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2)))


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 5)])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("spatial", [(7, 7), (8, 6)])
def test_depthwise_conv_equals_grouped_conv(kernel_size, strides, spatial):
  channels = 5
  x = jax.random.normal(jax.random.key(0), (3, *spatial, channels))
  ours = DepthwiseConv(kernel_size, strides, use_bias=True)
  reference = nn.Conv(channels, kernel_size, strides, padding="SAME",
                      feature_group_count=channels, use_bias=True)
  # Compiled, not eager: each eager op compiles on its own, which takes longer.
  params = jax.jit(ours.init)(jax.random.key(1), x)
  chex.assert_trees_all_equal(params, jax.jit(reference.init)(jax.random.key(1), x))  # layout, init
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
  cotangent = jax.random.normal(jax.random.key(3),
                                jax.eval_shape(reference.apply, params, x).shape)

  def output_and_gradients(module):
    @jax.jit
    def compute(params, x, cotangent):
      y, vjp = jax.vjp(module.apply, params, x)
      return y, vjp(cotangent)
    return compute(params, x, cotangent)

  chex.assert_trees_all_close(output_and_gradients(ours), output_and_gradients(reference),
                              rtol=1e-5, atol=1e-5)


def random_variables(model, shape, seed=0):
  """Params and BatchNorm statistics drawn at random, far from init (and without compiling
  model.init, which takes tens of seconds for MobileNetV2 on 2 cores)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = quant.path_names(path)[-1]
    if name == "kernel":
      values = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      values = rng.uniform(0.5, 2.0, leaf.shape)
    else:  # bias, mean
      values = rng.normal(scale=0.5, size=leaf.shape)
    return jnp.asarray(values, jnp.float32)

  return {collection: jax.tree_util.tree_map_with_path(draw, shapes[collection])
          for collection in ("params", "batch_stats")}


@pytest.mark.parametrize("stem,shape", [("cifar", SHAPE), ("stride16", (2, 28, 28, 1)),
                                        ("imagenet", (2, 32, 32, 3))])
def test_fold_batch_norm_preserves_mobilenet_outputs(stem, shape):
  model = MobileNetV2(stem=stem, width_multiplier=0.25)
  variables = random_variables(model, shape)
  x = jax.random.normal(jax.random.key(1), shape)
  expected = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  folded = jax.jit(quant.fold_batch_norm, static_argnums=2)(  # eager: each layer's ops compile
      variables["params"], variables["batch_stats"], BN_EPSILON)
  assert "bn" not in str(jax.tree_util.tree_structure(folded))
  assert folded["stage2_block1"]["depthwise"]["conv"]["bias"].shape == (8 * 6,)
  folded_apply = jax.jit(functools.partial(model.clone(folded=True).apply, train=False))
  got = folded_apply({"params": folded}, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


def test_penalty_gradient_on_mobilenet_hvp_equals_nested():
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                             random_variables(SHALLOW_MOBILENET, SHAPE))
    batch = {"image": jax.random.normal(jax.random.key(1), SHAPE, jnp.float64),
             "label": jnp.array([3, 7])}
    penalty = objectives.Penalty(0.2, 0.5)

    def value_and_grad(impl):
      value_and_grad_fn = jax.jit(functools.partial(
          objectives.penalized_value_and_grad, apply_fn=SHALLOW_MOBILENET.apply,
          penalty=penalty._replace(impl=impl)))
      return value_and_grad_fn(variables["params"], variables["batch_stats"], batch)

    (total, aux), grads = value_and_grad("hvp")
    (ref_total, ref_aux), ref_grads = value_and_grad("nested")
    np.testing.assert_allclose(total, ref_total, rtol=1e-12)
    chex.assert_trees_all_close(aux, ref_aux, rtol=1e-12)
    # Some gradients are 0 up to rounding (a bias whose shift the next BatchNorm removes).
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-9, atol=1e-10 * largest)


def test_mobilenet_bottlenecks_are_tapped_and_quantized_symmetric():
  model = SHALLOW_MOBILENET.clone(folded=True)
  variables = random_variables(SHALLOW_MOBILENET, SHAPE)
  params = quant.fold_batch_norm(variables["params"], variables["batch_stats"], BN_EPSILON)
  x = jax.random.normal(jax.random.key(1), SHAPE)
  _, state = jax.jit(functools.partial(model.apply, mutable=["activation_stats"]))(
      {"params": params}, x)
  ranges = jax.tree.map(lambda point: {"min": jnp.min(point["samples"][0]),
                                       "max": jnp.max(point["samples"][0])},
                        state["activation_stats"],
                        is_leaf=lambda node: isinstance(node, dict) and "samples" in node)
  schemes = {}

  def record_scheme(next_fun, args, kwargs, context):
    if isinstance(context.module, QuantizedActivation):
      schemes["/".join(context.module.path)] = context.module.scheme
    return next_fun(*args, **kwargs)

  bits = 3
  quantized_apply = jax.jit(functools.partial(
      model.clone(act_bits=bits).apply, mutable=["intermediates"],
      capture_intermediates=lambda module, _: isinstance(module, QuantizedActivation)))
  with nn.intercept_methods(record_scheme):  # records while jit traces
    _, state = quantized_apply({"params": params, "activation_ranges": ranges}, x)
  signed = {path for path in schemes if path.endswith(("/project_act", "/residual_act"))}
  # Width 0.25 keeps 8 channels from the stem to stage 2, whose cifar stride is 1: residuals there.
  blocks = ("stage1_block1", "stage2_block1", "stage2_block2", "stage3_block1")
  assert signed == {f"{block}/project_act" for block in blocks} | {
      f"{block}/residual_act" for block in blocks if block != "stage3_block1"}
  assert {schemes[path] for path in signed} == {"symmetric"}
  assert {scheme for path, scheme in schemes.items() if path not in signed} == {"asymmetric"}
  # The symmetric grid: integer multiples of absmax / (2^(b-1) - 1), negative values kept.
  low, high = (ranges["stage2_block1"]["project_act"][k] for k in ("min", "max"))
  step = max(abs(float(low)), float(high)) / (2 ** (bits - 1) - 1)
  codes = np.asarray(state["intermediates"]["stage2_block1"]["project_act"]["__call__"][0]) / step
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
  assert codes.min() < -0.5 and np.abs(codes).max() <= 2 ** (bits - 1) - 1 + 1e-4


def model_config(name, width, stem="cifar"):
  config = base.get_base_config()
  config.model.name, config.model.width, config.model.stem = name, width, stem
  return config.model


def param_shapes(model, image_shape):
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, *image_shape)))
  return {"/".join(quant.path_names(path)): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])}


# Parameter counts of the models before the width multiplier existed (commit f262d9d), and
# torchvision's mobilenet_v2 (3,504,872 for 1000 classes).
@pytest.mark.parametrize("name,stem,image_shape,num_classes,count", [
    ("small_cnn", "cifar", (28, 28, 1), 10, 426_362),
    ("vgg_like", "cifar", (32, 32, 3), 10, 12_979_082),
    ("resnet18", "cifar", (32, 32, 3), 10, 11_173_962),
    ("resnet18", "imagenet", (64, 64, 3), 10, 11_181_642),
    ("mobilenetv2", "imagenet", (224, 224, 3), 1000, 3_504_872),
])
def test_width_one_is_the_published_architecture(name, stem, image_shape, num_classes, count):
  shapes = param_shapes(build_model(model_config(name, 1.0, stem), num_classes), image_shape)
  assert sum(int(np.prod(shape)) for shape in shapes.values()) == count


@pytest.mark.parametrize("name,image_shape", [("vgg_like", (32, 32, 3)), ("resnet18", (32, 32, 3))])
def test_width_half_halves_channels(name, image_shape):
  full = param_shapes(build_model(model_config(name, 1.0), 10), image_shape)
  half = param_shapes(build_model(model_config(name, 0.5), 10), image_shape)
  assert full.keys() == half.keys()
  for path, shape in full.items():
    if path.endswith("kernel") and not path.startswith("head/"):
      assert half[path][-1] * 2 == shape[-1], path


def test_mobilenet_width_rounds_channels_to_multiples_of_8():
  def channels(width):
    shapes = param_shapes(build_model(model_config("mobilenetv2", width), 10), (32, 32, 3))
    stages = [shapes[f"stage{i}_block1/project/conv/kernel"][-1] for i in range(1, 8)]
    return shapes["stem/conv/kernel"][-1], stages, shapes["last/conv/kernel"][-1]

  assert channels(1.0) == (32, [16, 24, 32, 64, 96, 160, 320], 1280)
  # 24 * 0.5 = 12 rounds up to 16; the last conv narrows only for widths above 1.
  assert channels(0.5) == (16, [8, 16, 16, 32, 48, 80, 160], 1280)
  assert channels(1.4) == (48, [24, 32, 48, 88, 136, 224, 448], 1792)


def test_nonpositive_width_rejected(tmp_path):
  config = config_lib.base_config()
  config.data.data_dir, config.data.source = str(tmp_path), "idx"
  config.model.name, config.model.width = "vgg_like", 0.0
  with pytest.raises(ValueError, match=r"model.width=0.0 must be a finite number > 0"):
    config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize("stem,final_map", [("cifar", 4), ("stride16", 2), ("imagenet", 1)])
def test_mobilenet_stems_total_strides_on_28x28(stem, final_map):
  # 8, 16 and 32: the stride-2 layers each stem keeps, counted from the map the last conv sees.
  model = MobileNetV2(stem=stem, width_multiplier=0.25)
  x = jax.ShapeDtypeStruct(SHAPE, jnp.float32)  # shapes only: nothing is computed or compiled
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, state = jax.eval_shape(functools.partial(
      model.apply, capture_intermediates=lambda m, _: m.name == "last"), variables, x)
  assert state["intermediates"]["last"]["__call__"][0].shape[1:3] == (final_map, final_map)
