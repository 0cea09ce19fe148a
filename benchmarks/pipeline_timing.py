"""What both sides of the input benchmark share (benchmarks/input_pipeline.py and
benchmarks/torchvision_pipeline.py): the timer, the case's setup, the CPU's name. Imports nothing
beyond the standard library, so the torchvision side runs in an interpreter of its own.
"""
from __future__ import annotations

import dataclasses
import time


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown CPU"


class Timer:
  """Times --batches batches (or --seconds) after the warm-up, one by one.

  next_batch() -> (images, first of an epoch?). A batch that starts an epoch (a pass, for eval)
  includes the pipeline's restart: crate_jax builds a new tf.data pipeline per epoch, a DataLoader
  starts a new pass of its workers. On a set of a few thousand images that happens every few
  batches, on ImageNet once in ~10^4 batches per host: so the rate reported is the steady one,
  over the other batches, and the restart is reported apart (extra seconds per epoch).
  """

  def __init__(self, batches: int, seconds: float | None):
    self.batches, self.seconds = batches, seconds

  def run(self, next_batch, warmup: int) -> dict:
    start = time.perf_counter()
    next_batch()
    out = {"first_s": time.perf_counter() - start}
    for _ in range(warmup):
      next_batch()
    steady, restarts = [], []   # (images, seconds)
    begin = time.perf_counter()
    while True:
      t = time.perf_counter()
      images, new_epoch = next_batch()
      (restarts if new_epoch else steady).append((images, time.perf_counter() - t))
      elapsed = time.perf_counter() - begin
      done = len(steady) + len(restarts)
      if (elapsed >= self.seconds) if self.seconds else (done >= self.batches):
        break
    total = steady + restarts
    out["img_s_overall"] = sum(n for n, _ in total) / elapsed
    out["img_s"] = (sum(n for n, _ in steady) / sum(t for _, t in steady) if steady
                    else out["img_s_overall"])
    out["batches"], out["epoch_starts"] = len(total), len(restarts)
    out["restart_s"] = None
    if steady and restarts:   # the time a first batch takes beyond a steady one
      per_batch = sum(t for _, t in steady) / len(steady)
      out["restart_s"] = max(0.0, sum(t for _, t in restarts) / len(restarts) - per_batch)
    return out


@dataclasses.dataclass
class Setup:
  """What every JPEG case runs with."""
  root: str            # the image folder
  images: int          # in its train split
  classes: int
  batch_size: int
  timer: Timer
  warmup: int
  workers: int = 0     # torchvision DataLoader workers
  num_local: int | None = None   # DINO's local crops (None: the recipe's)
  threads: int = 0     # crate_jax's config.data.threads
