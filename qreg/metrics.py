"""Training metrics into the workdir, and progress lines with an ETA.

Scalars go to TensorBoard event files, through tensorboard's own event
writer (no TensorFlow needed), to workdir/metrics.jsonl (one JSON object per
write: step, wall time, values), and to the log.
"""
import json
import os
import time
from collections.abc import Mapping

from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Writes scalars to workdir's TensorBoard events, metrics.jsonl and the log."""

  def __init__(self, workdir: str):
    self._events = EventFileWriter(workdir)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    now = time.time()
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    self._events.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary))
    self._jsonl.write(json.dumps({"step": step, "time": now, **scalars}) + "\n")
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

  def flush(self) -> None:
    self._events.flush()
    self._jsonl.flush()

  def close(self) -> None:
    self._events.close()
    self._jsonl.close()


class NullWriter:
  """What processes other than 0 write: nothing."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class Progress:
  """Steps/s and an ETA that knows that some steps cost more than others.

  The rate of each kind of step ('plain', 'regularized', ...) is measured
  separately (excluding its first step, which compiles), and the ETA adds up
  the remaining steps of each kind at its own rate; a kind not yet run is
  assumed to cost `cost_guess` times a plain step.
  """

  def __init__(self, remaining_by_kind: Mapping[str, int], cost_guess: Mapping[str, float],
               every_secs: float = 30.0):
    self._remaining = dict(remaining_by_kind)
    self._cost_guess = dict(cost_guess)
    self._every_secs = every_secs
    self._seconds = {kind: 0.0 for kind in self._remaining}
    self._timed = {kind: 0 for kind in self._remaining}
    self._last_time = None
    self._last_report = time.time()

  def seconds_per_step(self, kind: str) -> float | None:
    if self._timed[kind]:
      return self._seconds[kind] / self._timed[kind]
    plain = self._seconds.get("plain", 0.0) / max(self._timed.get("plain", 0), 1)
    return plain * self._cost_guess.get(kind, 1.0) if plain else None

  def eta_seconds(self) -> float | None:
    total = 0.0
    for kind, remaining in self._remaining.items():
      if remaining:
        rate = self.seconds_per_step(kind)
        if rate is None:
          return None
        total += remaining * rate
    return total

  def exclude_pause(self) -> None:
    """Leaves the time since the last step (an evaluation, a checkpoint) out of the rates."""
    self._last_time = None

  def step_done(self, kind: str, step: int, compiled_now: bool) -> str | None:
    """Counts a finished step of `kind`; returns a progress line every `every_secs`."""
    now = time.time()
    if self._last_time is not None and not compiled_now:
      self._seconds[kind] += now - self._last_time
      self._timed[kind] += 1
    self._last_time = now
    self._remaining[kind] -= 1
    if now - self._last_report < self._every_secs:
      return None
    self._last_report = now
    rates = ", ".join(f"{kind} {1 / self._seconds[kind] * self._timed[kind]:.2f} steps/s"
                      for kind in self._seconds if self._timed[kind])
    eta = self.eta_seconds()
    left = sum(self._remaining.values())
    eta_text = "unknown" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
    return f"step {step}: {rates}; {left} steps left, ETA {eta_text}"
