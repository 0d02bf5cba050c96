"""What the sweep configs share: big_vision's `file.py:key=value,...` argument, and the networks.

Each sweep config has get_config(arg=None) and sweep(arg=None), or sweep(arg=None, *, choices)
when its runs use hyperparameters chosen by a tuning (experiments.study hands them over;
experiments.run_sweep --choices=<choices.json> does it by hand).
"""
import ml_collections

from configs import (fashion_mnist, fashion_mnist_mobilenetv2, fashion_mnist_resnet18,
                     fashion_mnist_vgg)

# The Fashion-MNIST networks of the CPU-scale tables: the offline default's SmallCNN and the
# paper's networks at the widths sized for 2 CPU cores.
NETWORKS = {
    "small_cnn": fashion_mnist.get_config,
    "vgg": fashion_mnist_vgg.get_config,
    "resnet18": fashion_mnist_resnet18.get_config,
    "mobilenetv2": fashion_mnist_mobilenetv2.get_config,
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'net=vgg,grid=low' on top of defaults; a key that is not a default is an error."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key one of "
                       f"{', '.join(defaults)}.")
    parsed[key] = value
  return parsed


def network(name: str):
  """The get_config of a Fashion-MNIST table network."""
  if name not in NETWORKS:
    raise ValueError(f"net={name!r}: expected one of {', '.join(NETWORKS)}.")
  return NETWORKS[name]
