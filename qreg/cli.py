"""What qreg's command lines share: flags, logging, multi-process start-up, and plain errors.

A user error (a bad config value, bad data, a wrong workdir, a mistyped flag)
prints one line, `error: <what is wrong>`, and exits with status 2; --verbose
shows the traceback too. A run stopped by SIGTERM or SIGINT after saving its
checkpoint exits with 128 + the signal's number (143, 130), as a shell reports
a process killed by it, so that schedulers and `until` loops retry it.
"""
import logging as std_logging
import os
import sys
import traceback
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qreg import checkpoint

USAGE_ERROR_STATUS = 2
# Errors that mean the input is wrong, not the code.
USER_ERRORS = (ValueError, OSError, FloatingPointError, checkpoint.CheckpointError,
               checkpoint.WorkdirBusy, app.UsageError)


def fail(message: str) -> None:
  """Prints `error: message` (its first line carries the gist) and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR_STATUS)


def define_config_flag(required: bool = True):
  """--config=FILE[:ARG], with --config.FIELD=VALUE overrides of any field."""
  config = config_flags.DEFINE_config_file("config", None, "Configuration file.",
                                           lock_config=True)
  if required:
    flags.mark_flag_as_required("config")
  return config


def _innermost_message(error: BaseException) -> str:
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake reported as one `error:` line."""
  config_file = next((arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")),
                     None)
  if config_file and not os.path.isfile(config_file.split(":", 1)[0]):
    fail(f"--config={config_file.split(':', 1)[0]}: no such file.")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}".splitlines()[0])
  except (AttributeError, KeyError) as e:  # a --config.FIELD naming no field
    message = _innermost_message(e)
    field = message.splitlines()[0].strip("'\"")
    culprits = [arg for arg in argv[1:]
                if arg.startswith("--config.") and field in arg.split("=")[0].split(".")]
    hint = " ".join(message.splitlines()[1:])
    fail(f"{' '.join(culprits) or 'a --config override'}: the config has no field {field!r}. "
         f"{hint}".rstrip())
  except (OSError, ValueError, TypeError) as e:  # a config file that does not load
    fail(f"--config: {e}")
  return []


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of checkpointing and backend discovery; warnings still pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = "orbax" in record.pathname or record.pathname.endswith("xla_bridge.py")
    return record.levelno >= std_logging.WARNING or not noisy


def configure_logging() -> None:
  """INFO logs for qreg's progress and metrics, without the per-checkpoint library logs.

  Processes other than 0 log warnings and errors only.
  """
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run(job: Callable[[list[str]], None], positional_args: int = 0) -> None:
  """app.run(job) with plain errors: user errors as one line and status 2, preemption as
  128 + signal. The job calls configure_logging once JAX may start its backend (after
  jax.distributed.initialize, where there is one). The job takes up to positional_args
  arguments besides the flags (argv[1:]). --verbose is defined here, so that importing this
  module defines no flag."""
  verbose = flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")

  def main(argv):
    if len(argv) > 1 + positional_args:
      fail(f"unexpected arguments: {' '.join(argv[1 + positional_args:])}")
    try:
      job(argv)
    except checkpoint.Preempted as e:
      logging.warning("%s", e)
      sys.exit(128 + e.signum)
    except USER_ERRORS as e:
      if verbose.value:
        traceback.print_exc()
      fail(str(e))

  app.run(main, flags_parser=_parse_flags)
