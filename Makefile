# One-command entry points; README.md quotes these targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/fashion_mnist
CONFIG ?= configs/fashion_mnist.py
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data train evaluate test benchmark clean

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(PY)

setup: $(PY)

# The offline default data set: Debian's package of the original Fashion-MNIST IDX files.
data:
	@test -d $(FASHION_MNIST_DIR) || { $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

# Train the default config (regularized), then print and write the bit-width sweep.
train: setup data
	$(PY) -m qreg.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Rerun only the quantization sweep from WORKDIR's last checkpoint.
evaluate: setup data
	$(PY) -m qreg.evaluate --config=$(CONFIG) --workdir=$(WORKDIR)

# The test suite on 2 processes (pytest-xdist); the test on the real Fashion-MNIST files is
# skipped if they are absent.
test: setup
	-@$(MAKE) --no-print-directory data
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=25 tests

# Step cost of each reg.impl relative to a plain step (docs/cost.md);
# e.g. make benchmark BENCHMARK_FLAGS="--models=vgg_like,resnet18 --batch_sizes=32 --steps=10".
BENCHMARK_FLAGS ?=
benchmark: setup
	$(PY) -m benchmarks.step_cost $(BENCHMARK_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache
