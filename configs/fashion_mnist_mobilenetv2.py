"""MobileNetV2 on Fashion-MNIST at width 0.35 with the stride-16 stem: the CPU-scale Table 1 row.

    python -m qreg.main --config=configs/fashion_mnist_mobilenetv2.py --workdir=workdirs/fmnist_mnv2

Same blocks as configs/cifar10_mobilenetv2.py (17 inverted residual blocks, depthwise 3x3,
ReLU6, linear bottlenecks, the 1280-channel last conv), at model.width = 0.35 (one of the
paper's published multipliers: stem 16, then 8-8-16-24-32-56-112 block channels) with
model.stem = 'stride16' (stride-2 stem conv, the 24-channel stage at stride 1: 28x28 inputs
end in 2x2 maps), and the offline default's data, optimizer, schedule and epochs (3 plain,
the regularizer in the last), as the VGG-like and ResNet-18 rows.

Why this size (benchmarks/results/table1_networks_cpu/mobilenet_stems.md, from python -m
benchmarks.mobilenet_stems): a bare batch-128 step,
as a multiple of VGG-like's at width 1/8 in one process on the 2-core development CPU: cifar
stem (stride 8) at width 0.25 5.8x, stride-16 stem at 0.25 1.9x, at 0.35 2.1x, at 0.5 2.9x, the
ImageNet stem (stride 32) at 0.5 1.05x. The ImageNet stem is the cheapest but ends in 1x1 maps
two stages early, where the depthwise kernels see only padding off their centre tap. The
stride-16 stem at 0.35 is the cheapest clean choice.
"""
from configs import fashion_mnist

WIDTH = 0.35
STEM = "stride16"


def get_config():
  config = fashion_mnist.get_config()
  config.model.name = "mobilenetv2"
  config.model.stem = STEM
  config.model.width = WIDTH
  return config
