"""Device mesh and shardings: data parallelism with jax.jit over a 1-D `data` mesh.

Parameters are replicated, batches are split along their leading axis. Under
jit the step is written for the global batch, so the loss, its gradient and
the gradient-l1 penalty mean the same on 1 or 64 devices.
"""
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over the given devices (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, num_devices: int, what: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over num_devices devices."""
  if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) \
      or global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"{what}={global_batch_size} must be a positive multiple of the number of devices "
        f"({num_devices}) so that every device gets an equal share of the global batch.")


def check_batch_fraction(fraction, global_batch_size: int, num_devices: int,
                         what: str = "fraction") -> int:
  """Raises ValueError unless 0 < fraction <= 1 and fraction * global_batch_size examples split
  evenly over num_devices devices; returns that sub-batch's size per device."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
      or not 0 < fraction <= 1:
    raise ValueError(f"{what}={fraction!r} must be in (0, 1].")
  per_device = fraction * global_batch_size / num_devices
  if per_device != round(per_device):
    raise ValueError(
        f"{what}={fraction} of the global batch ({global_batch_size}) is "
        f"{fraction * global_batch_size:g} examples, which do not split into whole examples over "
        f"{num_devices} devices; choose a fraction that makes it a multiple of {num_devices}.")
  return int(round(per_device))


def leading_per_device(batch: dict[str, jax.Array], per_device: int,
                       num_devices: int) -> dict[str, jax.Array]:
  """The first per_device examples of each device's shard of a global batch, as a global batch.

  Written for the global batch under jit (whose leading axis is split over
  num_devices devices in order), so no example moves between devices.
  """
  def head(x):
    shards = x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
    return shards[:, :per_device].reshape(num_devices * per_device, *x.shape[1:])

  return jax.tree.map(head, batch)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def prefetch_to_mesh(local_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """global_batch of each local batch, `size` batches ahead, assembled in a background thread.

  While the step on batch k runs, the host reads and transfers batch k+1, as
  Flax's prefetch_to_device and big_vision's start_global do. The thread stops
  when the consumer does (the generator is closed or garbage-collected), and
  closing waits for it: a thread still inside a JAX call while the interpreter
  exits aborts the process.
  """
  ready = queue.Queue(maxsize=size)
  stop = threading.Event()
  end = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for batch in local_batches:
        if not put(global_batch(batch, mesh)):
          return
      put(end)
    except BaseException as e:  # re-raised in the consumer, where it can be reported
      put(e)

  thread = threading.Thread(target=produce, daemon=True, name="qreg-prefetch")
  thread.start()
  try:
    while (item := ready.get()) is not end:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
