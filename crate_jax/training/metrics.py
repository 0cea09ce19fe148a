"""Metric writing: TensorBoard + metrics.jsonl + a one-line console, and the loop's throughput.

The console shows one line per log step and one per eval (ConsoleWriter); everything else (gradient
norms, white-box statistics, ...) goes to TensorBoard and metrics.jsonl only. clu (and with it
TensorFlow) is imported when a writer is created, not with this module.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import jax

from crate_jax.training.flops import peak_flops


def _is_local(path) -> bool:
  return "://" not in os.fspath(path)


class JsonlWriter:
  """One JSON object per write_scalars call, appended to <workdir>/metrics.jsonl. Object stores
  (gs://...) cannot append: there the file is rewritten whole (it stays small)."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step, scalars):
    record = {"step": int(step), **{k: _to_py(v) for k, v in scalars.items()}}
    line = json.dumps(record) + "\n"
    if _is_local(self.path):
      with open(self.path, "a") as f:
        f.write(line)
    else:
      from etils import epath
      p = epath.Path(self.path)
      p.write_text((p.read_text() if p.exists() else "") + line)

  def flush(self):
    pass

  def close(self):
    pass


class ConsoleWriter:
  """One readable line per write on stdout: a train row (it has train/loss) as

    step 125/248  loss 0.4123  top1 0.871  lr 1.6e-03  1234 img/s  ETA 0:00:31

  (plus `MFU 41.2%` where the device's peak is known), an eval row as

    eval at step 248/248  top1 0.8910  top5 0.9940  loss 0.3456

  and nothing for other rows. The ETA is the remaining steps at the last interval's step time
  (eval time not included).
  """

  def __init__(self, total_steps: int | None = None, stream=None):
    self.total = total_steps
    self.stream = stream

  def write_scalars(self, step, scalars):
    line = self.format(int(step), {k: _to_py(v) for k, v in scalars.items()})
    if line:
      stream = self.stream or sys.stdout
      stream.write(line + "\n")
      stream.flush()

  def format(self, step: int, s: dict) -> str | None:
    if "train/loss" in s:
      return self._train_line(step, s)
    evals = {k[len("eval/"):]: v for k, v in s.items() if k.startswith("eval/")}
    if evals:
      return f"eval at {self._step(step)}  {format_eval(evals)}"
    return None

  def _train_line(self, step, s):
    cols = [self._step(step), f"loss {s['train/loss']:.4f}"]
    if "train/top1" in s:
      cols.append(f"top1 {s['train/top1']:.3f}")
    if "train/lr" in s:
      cols.append(f"lr {s['train/lr']:.1e}")
    if "perf/tokens_per_sec" in s:  # the text tasks
      cols.append(f"{s['perf/tokens_per_sec']:.0f} tok/s")
    elif "perf/img_per_sec" in s:
      cols.append(f"{s['perf/img_per_sec']:.0f} img/s")
    if "perf/mfu" in s:
      cols.append(f"MFU {100 * s['perf/mfu']:.1f}%")
    if self.total and "perf/step_time_ms" in s:
      eta = max(self.total - step, 0) * s["perf/step_time_ms"] / 1e3
      cols.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
    return "  ".join(cols)

  def _step(self, step):
    if not self.total:
      return f"step {step}"
    return f"step {step:>{len(str(self.total))}}/{self.total}"

  def flush(self):
    pass

  def close(self):
    pass


def format_eval(metrics: dict) -> str:
  """'top1 0.8910  top5 0.9940  loss 0.3456': accuracies first, then the rest by name."""
  order = sorted(metrics, key=lambda k: (k not in ("top1", "top5"), k))
  return "  ".join(f"{k} {float(metrics[k]):.4f}" for k in order)


class Writers:
  """Fan-out to several writers (write_scalars, flush, close)."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def truncate_jsonl(path: str, last_step: int) -> None:
  """Drop records after `last_step` (written by a run that died after its last checkpoint)."""
  from etils import epath
  p = epath.Path(path)
  if not p.exists():
    return
  keep = [line + "\n" for line in p.read_text().splitlines()
          if line.strip() and json.loads(line)["step"] <= last_step]
  if not _is_local(path):  # object stores replace a whole object atomically anyway
    p.write_text("".join(keep))
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  from etils import epath
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def create_writer(workdir: str, total_steps: int | None = None) -> Writers:
  """Process 0: TensorBoard (asynchronous) + metrics.jsonl + the one-line console; other
  processes of a multi-host job write nothing (process 0 speaks for the job)."""
  if jax.process_index() > 0:
    return Writers([])
  from clu import metric_writers
  return Writers([metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)),
                  JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
                  ConsoleWriter(total_steps)])


class Throughput:
  """The loop's one speed measurement: images/s, images/s/device, step time, TFLOP/s/device and
  MFU over the steps between two `measure` calls (the console's ETA derives from it).

  Call it after every step (it is a loop hook): the first call, once the first step has compiled,
  starts the clock, so compile time never counts; `pause(seconds)` takes eval time out. A row with
  no timed step yet (the first step) gets no perf/* keys.
  """

  def __init__(self, global_batch: int, flops_per_example: float | None,
               tokens_per_example: int | None = None):
    self.global_batch = global_batch
    self.tokens = tokens_per_example  # text: perf/seq_per_sec and perf/tokens_per_sec
    self.flops = flops_per_example
    self.peak = peak_flops()
    self.devices = jax.device_count()
    self.t0 = self.step0 = None

  def __call__(self, step: int):
    if self.t0 is None:
      self.reset(step)

  def reset(self, step: int):
    self.t0, self.step0 = time.perf_counter(), step

  def pause(self, seconds: float):
    if self.t0 is not None:
      self.t0 += seconds

  def measure(self, step: int) -> dict[str, float]:
    if self.t0 is None or step <= self.step0:
      self(step)
      return {}
    now = time.perf_counter()
    dt = max(now - self.t0, 1e-9)
    ips = (step - self.step0) * self.global_batch / dt
    unit = "seq" if self.tokens else "img"  # examples are sequences for the text tasks
    out = {f"perf/{unit}_per_sec": ips, f"perf/{unit}_per_sec_per_device": ips / self.devices,
           "perf/step_time_ms": 1e3 * dt / (step - self.step0)}
    if self.tokens:
      out["perf/tokens_per_sec"] = ips * self.tokens
    if self.flops:
      tflops = ips * self.flops / self.devices / 1e12
      out["perf/tflops_per_device"] = tflops
      if self.peak:
        out["perf/mfu"] = tflops * 1e12 / self.peak
    self.t0, self.step0 = now, step  # the next interval starts where this one ended
    return out


def _to_py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return str(v)
