"""README's "Add your own model": a model defined only here trains with the penalty, folds,
sweeps and exports through qreg's own entry points."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from qreg import export, integer_file, main, models, quant
from qreg.models import BN_EPSILON
from qreg.models.layers import ConvBN, DenseBN, activation_tap
from tests.fakes import tiny_config


class TwoLayerNet(nn.Module):
  """The contract: act_* and folded fields, ConvBN/DenseBN blocks, taps after the ReLUs."""
  num_classes: int = 10
  act_bits: int | None = None
  act_scheme: str = "asymmetric"
  act_straight_through: bool = False
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvBN(8, strides=(2, 2), folded=self.folded, name="conv")(x, train)
    x = activation_tap(self, "act_conv")(nn.relu(x))
    x = DenseBN(16, folded=self.folded, name="fc")(x.reshape((x.shape[0], -1)), train)
    x = activation_tap(self, "act_fc")(nn.relu(x))
    return nn.Dense(self.num_classes, name="head")(x)


@pytest.fixture
def registered():
  models.register_model("two_layer_net", lambda model_config, num_classes: TwoLayerNet(num_classes))
  yield
  models.unregister_model("two_layer_net")


def test_a_model_defined_outside_qreg_trains_folds_sweeps_and_exports(registered, idx_dir,
                                                                      tmp_path):
  config = tiny_config(idx_dir)
  config.model.name = "two_layer_net"
  config.train.num_epochs, config.reg.start_epoch = 1, 0  # every step penalized
  config.quant.weight_rules = ("head/.*=8",)
  workdir = str(tmp_path / "run")
  results = main.train_and_evaluate(config, workdir)
  assert [(r["weight_bits"], r["act_bits"]) for r in results["rows"]] == [
      (None, None), (4, 4), (3, None)]
  path = str(tmp_path / "w4a4.npz")
  export.export_workdir(workdir, 4, path, act_bits=4)
  params, ranges, header = integer_file.load(path)
  assert sorted(ranges) == ["act_conv", "act_fc"]
  assert header["leaves"]["head/kernel"]["bits"] == 8
  assert header["leaves"]["conv/conv/kernel"]["bits"] == 4
  # Folding kept the function: the folded float model's logits equal the BatchNorm model's.
  model = TwoLayerNet()
  variables = model.init(jax.random.key(1), np.zeros((2, 28, 28, 1), np.float32))
  stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
  images = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
  folded = quant.fold_batch_norm(variables["params"], stats, BN_EPSILON)
  np.testing.assert_allclose(
      model.clone(folded=True).apply({"params": folded}, images),
      model.apply({"params": variables["params"], "batch_stats": stats}, images), atol=1e-5)


def test_bfloat16_needs_a_dtype_field(registered, idx_dir, tmp_path):
  config = tiny_config(idx_dir)
  config.model.name = "two_layer_net"
  config.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="model.dtype='bfloat16' needs a model with a `dtype` "
                                       "field passed to its layers; TwoLayerNet has none"):
    main.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
