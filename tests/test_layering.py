"""The package's imports point one way: each qreg module imports only modules below it.

The declared order, bottom to top (README, "Layout"): a module may import any
module listed before it and none after it, at module level or inside a function.
A module's `if __name__ == "__main__":` block is its command line, which no other
module imports: it may import the command-line layer too (`python -m qreg.report`).
"""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [
    # core: pure, no I/O but data
    "quant", "rounding", "parallel", "models", "equalize", "objectives", "bound", "mixed",
    "tfds_data",
    "data",
    # results files, metric logs
    "report", "metrics",
    # config validation, post-training quantization, the export format
    "config", "ptq", "integer_file", "onnx_export",
    # workdir: checkpoints, config.json, lock, Preempted, load_run
    "checkpoint",
    # loop
    "train",
    # command lines; main: train -> sweep -> write
    "cli", "main", "evaluate", "export",
]
COMMAND_LINE_LAYER = "cli"


def _is_main_block(node: ast.AST) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and isinstance(node.test.comparators[0], ast.Constant)
          and node.test.comparators[0].value == "__main__")


def qreg_imports(tree: ast.AST) -> set[str]:
  """The qreg modules (first component below qreg) that a syntax tree imports, anywhere in it."""
  imported = set()
  for node in ast.walk(tree):
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
    command_line_allowed = allowed | set(LAYERS[:LAYERS.index(COMMAND_LINE_LAYER) + 1])
    for path in paths:
      module = ast.parse(open(path).read())
      main_blocks = [node for node in module.body if _is_main_block(node)]
      library = ast.Module([node for node in module.body if node not in main_blocks], [])
      imported = ((qreg_imports(library) - allowed)
                  | (set().union(*map(qreg_imports, main_blocks)) - command_line_allowed))
      upward += [f"{os.path.relpath(path, REPO)} imports qreg.{name}" for name in sorted(imported)]
  assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_preempted_and_load_run_are_in_the_workdir_layer():
  """What cli catches and what evaluate and export load runs with sit below the loop, so that
  neither module imports training."""
  from qreg import checkpoint  # pylint: disable=g-import-not-at-top
  assert checkpoint.Preempted.__module__ == checkpoint.load_run.__module__ == "qreg.checkpoint"
  for layer in ("cli", "evaluate", "export"):
    [path] = module_files()[layer]
    assert "train" not in qreg_imports(ast.parse(open(path).read())), path


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
