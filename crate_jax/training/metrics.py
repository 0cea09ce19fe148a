"""Metric writing (clu writers + a metrics.jsonl) and throughput / MFU."""
from __future__ import annotations

import json
import os
import time

import jax
from clu import metric_writers

from crate_jax.training.flops import peak_flops

class JsonlWriter(metric_writers.interface.MetricWriter):
  """One JSON object per write_scalars call, appended to <workdir>/metrics.jsonl."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step, scalars):
    record = {"step": int(step), **{k: _to_py(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drop records after `last_step` (written by a run that died after its last checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def create_writer(workdir: str):
  """TensorBoard + console on process 0 (plus metrics.jsonl); console-only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=True),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


class Throughput:
  """Images/s, images/s/device, TFLOP/s/device and MFU between two `measure` calls."""

  def __init__(self, global_batch: int, flops_per_example: float | None):
    self.global_batch = global_batch
    self.flops = flops_per_example
    self.peak = peak_flops()
    self.devices = jax.device_count()
    self.reset(0)

  def reset(self, step: int):
    self.t0, self.step0 = time.perf_counter(), step

  def pause(self, seconds: float):
    self.t0 += seconds

  def measure(self, step: int) -> dict[str, float]:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    ips = (step - self.step0) * self.global_batch / dt
    out = {"perf/img_per_sec": ips, "perf/img_per_sec_per_device": ips / self.devices,
           "perf/step_time_ms": 1e3 * dt / max(step - self.step0, 1)}
    if self.flops:
      tflops = ips * self.flops / self.devices / 1e12
      out["perf/tflops_per_device"] = tflops
      if self.peak:
        out["perf/mfu"] = tflops * 1e12 / self.peak
    self.reset(step)
    return out


def _to_py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return str(v)
