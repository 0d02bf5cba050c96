"""The offline default: small BatchNorm CNN on Fashion-MNIST from the original IDX files.

Sized for 2 CPU cores: plain epochs first, then the regularized last epoch(s)
(a regularized step costs about two plain steps).

    python -m qreg.main --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
    python -m qreg.main --config=configs/fashion_mnist.py --config.reg.lambda_w=0 \
        --config.reg.lambda_a=0 --workdir=workdirs/fmnist_noreg
"""
from configs import base


def get_config():
  config = base.get_base_config()
  config.data.name = "fashion_mnist"
  config.data.source = "idx"
  config.model.name = "small_cnn"
  config.train.num_epochs = 4
  # Chosen on the validation split among 4 values with lambda_w = lambda_a / 10
  # (experiments/results/fashion_mnist_tuning, configs/tables/tuning.py). An
  # earlier search had picked the same pair on the test set (experiments/results/lambda_search).
  config.reg.lambda_w = 0.001
  config.reg.lambda_a = 0.01
  config.reg.start_epoch = 3
  return config
