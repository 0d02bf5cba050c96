"""config.with_overrides: dotted fields set on a copy, unknown fields refused in one line."""
import pytest

from qreg import config as config_lib


def test_with_overrides_sets_dotted_fields_on_a_copy():
  base = config_lib.base_config()
  overrides = {"seed": 1, "quant.per_channel": True, "reg.lambda_w": 0.05,
               "quant.bit_settings": [[4, 4], [None, 8]], "qat.weight_bits": 4}
  expected = config_lib.base_config()
  expected.seed = 1
  expected.quant.per_channel = True
  expected.reg.lambda_w = 0.05
  expected.quant.bit_settings = ((4, 4), (None, 8))
  expected.qat.weight_bits = 4

  config = config_lib.with_overrides(base, overrides)

  assert config.to_dict() == expected.to_dict()
  assert config.quant.bit_settings == ((4, 4), (None, 8))  # tuples, as the command line gives
  assert base.to_dict() == config_lib.base_config().to_dict()  # the base is left as it was


@pytest.mark.parametrize("name", ["reg.lambda", "nosection.seed", "seed.x", "quant"])
def test_with_overrides_refuses_an_unknown_field(name):
  with pytest.raises(ValueError, match=rf"^unknown config field '{name}'\.$"):
    config_lib.with_overrides(config_lib.base_config(), {name: 1})


def test_with_overrides_refuses_a_value_of_another_type_in_one_line():
  with pytest.raises(ValueError, match=r"^config field 'train.num_epochs': .*str") as error:
    config_lib.with_overrides(config_lib.base_config(), {"train.num_epochs": "ten"})
  assert "\n" not in str(error.value)
