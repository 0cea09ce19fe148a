"""Host batches -> global jax.Arrays (make_array_from_process_local_data), prefetch, batch checks.

No TensorFlow here, so the train loop can validate batch sizes without importing it.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Iterable, Iterator

import jax
import numpy as np


def host_cpus() -> int:
  """The logical CPUs (vCPUs) this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_position(process_index=None, process_count=None) -> tuple[int, int]:
  """(index, count) of this process among the job's, or the ones given (tests, planning)."""
  pc = jax.process_count() if process_count is None else int(process_count)
  pi = jax.process_index() if process_index is None else int(process_index)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index {pi} outside [0, {pc})")
  return pi, pc


def check_batch_size(global_batch_size: int, num_devices: int,
                     process_count: int | None = None) -> int:
  """Per-process batch global_batch_size // process_count; ValueError unless it splits evenly."""
  process_count = jax.process_count() if process_count is None else process_count
  if int(global_batch_size) != global_batch_size or global_batch_size < 1:
    raise ValueError(f"global batch size must be a positive integer, got {global_batch_size!r}")
  if global_batch_size % num_devices:
    lower = global_batch_size // num_devices * num_devices
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the {num_devices} devices "
        f"(each device needs the same number of examples); use a multiple of {num_devices}, "
        f"e.g. {lower or num_devices} or {lower + num_devices}")
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes; use a multiple of {process_count}")
  return global_batch_size // process_count


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Each host's slice of the batch -> global arrays laid out by `sharding` (leading axis split)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch_to_device(iterator: Iterable[dict[str, np.ndarray]], sharding,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """to_global on a background thread, keeping up to `size` global batches in flight."""
  iterator = iter(iterator)
  if size <= 0:
    return (to_global(batch, sharding) for batch in iterator)
  return _Prefetcher(iterator, sharding, size)


_END = object()


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      pass
  return False


def _produce(iterator, sharding, q: queue.Queue, stop: threading.Event):
  """Thread body; holds no reference to the consumer, so a dropped _Prefetcher stops it."""
  try:
    for batch in iterator:
      if stop.is_set() or not _put(q, stop, to_global(batch, sharding)):
        return
    _put(q, stop, _END)
  except BaseException as e:  # re-raised in the consumer
    _put(q, stop, e)
  finally:  # release the input pipeline (tf.data) from this thread, before interpreter exit
    close = getattr(iterator, "close", None)
    if close is not None:
      try:
        close()
      except Exception:  # noqa: BLE001 - best effort while shutting down
        pass


class _Prefetcher:
  """Iterator over global batches transferred by a daemon thread; errors re-raised in order."""

  def __init__(self, iterator, sharding, size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=_produce,
                                    args=(iterator, sharding, self._queue, self._stop),
                                    daemon=True, name="prefetch_to_device")
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END or isinstance(item, BaseException):
      self.close()
      if isinstance(item, BaseException):
        raise item
      raise StopIteration
    return item

  def close(self, timeout: float = 30.0):
    """Stop the background thread and wait (bounded) until it has released the pipeline: a
    daemon thread still inside tf.data at interpreter exit can abort the process."""
    self._stop.set()
    self._done = True
    if self._thread is not threading.current_thread():
      self._thread.join(timeout)

  def __del__(self):
    self._stop.set()
