"""Results files: written whole or not at all, a truncated one read as unfinished, and the
environment they were made in."""
import json
import logging
import os
import platform

import jax
import pytest

from qreg import report

RESULTS = {"rows": [{"weight_bits": None, "act_bits": None, "accuracy": 0.9},
                    {"weight_bits": 4, "act_bits": 4, "accuracy": 0.8}], "quantization": "q"}


def test_a_truncated_results_file_is_unfinished(tmp_path, caplog):
  path = tmp_path / "results.json"
  path.write_text(json.dumps(RESULTS, indent=2)[:40])  # a write cut short
  with caplog.at_level(logging.WARNING):
    assert report.read_finished_results(str(path)) is None
  assert str(path) in caplog.text
  with pytest.raises(ValueError, match=r"results.json is truncated or not JSON") as error:
    report.load_results(str(tmp_path))
  assert "\n" not in str(error.value)


def test_missing_and_finished_results(tmp_path):
  path = str(tmp_path / "results.json")
  assert report.read_finished_results(path) is None
  report.write_json_atomic(path, RESULTS)
  assert report.read_finished_results(path) == RESULTS == report.load_results(str(tmp_path))


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  report.write_json_atomic(str(path), RESULTS)
  old = path.read_bytes()

  def dump_half_then_fail(obj, f, **kwargs):
    f.write(json.dumps(obj, **kwargs)[:20])
    raise OSError("No space left on device")

  monkeypatch.setattr(json, "dump", dump_half_then_fail)
  with pytest.raises(OSError, match="No space left"):
    report.write_json_atomic(str(path), {"rows": []})
  assert path.read_bytes() == old
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_environment_says_where_results_were_made():
  environment = report.environment()
  assert {"jax", "jaxlib", "flax", "backend", "device_kind", "process_count"} <= set(environment)
  assert environment["jax"] == jax.__version__
  assert environment["backend"] == jax.default_backend()
  if jax.default_backend() == "cpu":
    assert environment["device_kind"] not in ("", "cpu")  # the CPU's model name


def test_cpu_model_names_the_family_model_and_stepping_of_the_first_processor(tmp_path):
  block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
           "model name\t: AMD EPYC\nstepping\t: 2\nflags\t\t: fpu sse\n\n")
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(block.format(n=0) + block.format(n=1).replace("model\t\t: 1", "model\t\t: 49"))
  assert report.cpu_model(str(cpuinfo)) == "AMD EPYC (family 23, model 1, stepping 2)"
  cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\n")  # aarch64
  assert report.cpu_model(str(cpuinfo)) == (platform.processor() or platform.machine())
