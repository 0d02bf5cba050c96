"""The paper's table on a base config: no-reg / l2 / l1 / STE-QAT@4 / KURE at the config's own
lambdas, 3 seeds, test set, the paper protocol.

    --config=configs/tables/paper.py:net=fashion_mnist     (the offline default)
    --config=configs/tables/paper.py:net=cifar10_vgg       (TFDS data: docs/scaling.md)

net is a config under configs/: fashion_mnist, cifar10_vgg, cifar10_resnet18,
cifar10_mobilenetv2, imagenet_resnet18, imagenet_mobilenetv2. Methods act from the config's
reg.start_epoch on (fine-tuning after 3 plain epochs on the offline default). Add
--only=no-reg/seed0,l1/seed0 (run names) to run a subset.
"""
import importlib

from configs.tables import common, methods

CONFIGS = ("fashion_mnist", "cifar10_vgg", "cifar10_resnet18", "cifar10_mobilenetv2",
           "imagenet_resnet18", "imagenet_mobilenetv2")


def _base(arg):
  name = common.parse_arg(arg, net="fashion_mnist").net
  if name not in CONFIGS:
    raise ValueError(f"net={name!r}: expected one of {', '.join(CONFIGS)}.")
  return importlib.import_module(f"configs.{name}").get_config


def get_config(arg=None):
  return methods.paper_table(_base(arg))[0]()


def sweep(arg=None):
  return methods.paper_table(_base(arg))[1]()
