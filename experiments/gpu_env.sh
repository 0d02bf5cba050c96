# Sourced by the prepared GPU scripts (experiments/gpu_*.sh), from the repository root: the lent
# GPU machine has JAX, Flax, optax and orbax but no ml_collections and no package registry, so
# the carried wheels (.whl/) go to /tmp/site, which joins PYTHONPATH with the repository.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
