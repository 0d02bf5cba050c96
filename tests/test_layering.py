"""The package's imports point one way: each qreg module imports only modules below it.

The declared order, bottom to top (README, "Layout"): a module may import any
module listed before it and none after it, at module level or inside a function.
"""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [
    # core: pure, no I/O but data
    "quant", "rounding", "parallel", "models", "objectives", "tfds_data", "data",
    # results files, metric logs
    "report", "metrics",
    # config validation, post-training quantization, the export format
    "config", "ptq", "integer_file",
    # workdir: checkpoints, config.json, lock
    "checkpoint",
    # loop
    "train",
    # command lines
    "cli", "main", "evaluate", "export",
]


def qreg_imports(path: str) -> set[str]:
  """The qreg modules (first component below qreg) that a file imports, anywhere in it."""
  imported = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = ([f"{node.module}.{alias.name}" for alias in node.names] if node.module == "qreg"
               else [node.module])
    else:
      continue
    imported |= {name.split(".")[1] for name in names if name.startswith("qreg.")}
  return imported


def module_files() -> dict[str, list[str]]:
  """{layer: its files}; a package (models/) is one layer."""
  files = {}
  package = os.path.join(REPO, "qreg")
  for name in sorted(os.listdir(package)):
    path = os.path.join(package, name)
    if name.endswith(".py") and name != "__init__.py":
      files[name[:-3]] = [path]
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
      files[name] = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
  return files


def test_every_module_has_a_layer():
  assert sorted(module_files()) == sorted(LAYERS)


def test_imports_point_down():
  upward = []
  for layer, paths in module_files().items():
    allowed = set(LAYERS[:LAYERS.index(layer)]) | {layer}
    for path in paths:
      upward += [f"{os.path.relpath(path, REPO)} imports qreg.{module}"
                 for module in sorted(qreg_imports(path) - allowed)]
  assert not upward, "imports against the layer order:\n" + "\n".join(upward)


BLOCK_TENSORFLOW = """
import sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
"""


def test_models_step_sweep_export_and_benchmark_import_without_tensorflow():
  """What an accelerator machine without TensorFlow runs: import and, for the step, run."""
  code = BLOCK_TENSORFLOW + """
import jax, jax.numpy as jnp, numpy as np, optax
from qreg import data, evaluate, export, integer_file, main, models, objectives, ptq, train
import benchmarks.step_cost
model = models.SmallCNN(widths=(4, 4, 4), hidden=8)
optimizer = optax.sgd(0.1)
state = train.create_train_state(jax.random.key(0), model, optimizer, (28, 28, 1))
step = jax.jit(train.make_train_step(model.apply, optimizer, objectives.Penalty(0.01, 0.01)))
batch = {"image": jnp.ones((2, 28, 28, 1)), "label": jnp.array([0, 1])}
state, metrics = step(state, batch)
assert np.isfinite(float(metrics["loss"]))
assert "tensorflow" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
