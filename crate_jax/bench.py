"""Benchmark the jitted train step (and forward pass): img/s, step ms, TFLOP/s, MFU, memory.

  python -m crate_jax.bench --models crate_base --batch 256                       # GPU/TPU
  python -m crate_jax.bench --models crate_base --batch 256 --vs-torch --torch-compile
  python -m crate_jax.bench --tiny                                                # CPU smoke

Synthetic data, AdamW, bf16 compute with fp32 params. --vs-torch times the PyTorch reference
(crate_jax.interop.torch_reference, the architecture the parity tests check) in the same process and
prints the ratio.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crate_jax import cli, models
from crate_jax.training import flops, sharding, steps, tasks

# What the benchmarked losses read of a config: no label smoothing (the reference has none).
_BENCH_CONFIG = {"label_smoothing": 0.0}

TINY = dict(image_size=32, patch_size=8, dim=64, depth=2, heads=4, dim_head=16, num_classes=10)


def _timeit(fn, n: int, sync) -> float:
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  sync(out)
  return (time.perf_counter() - t) / n


def peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_jax(name: str, batch: int, *, dtype: str, steps_: int, warmup: int, remat: bool,
              attention: str | None, forward_only: bool, **overrides) -> dict:
  """Time one model's train step (or forward pass) on synthetic data over all devices."""
  fields = {f.name for f in dataclasses.fields(models.get(name))}
  kwargs = dict(dtype=getattr(jnp, dtype), remat=remat, attention_impl=attention, **overrides)
  model = models.get(name, **{k: v for k, v in kwargs.items() if k in fields})
  task = "classification" if "num_classes" in fields else "mae"
  mesh = sharding.make_mesh()
  data_sh, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
  size, classes = model.image_size, getattr(model, "num_classes", 10)
  rng = np.random.default_rng(0)
  batch_data = jax.device_put({
      "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, classes, batch).astype(np.int32),
      "labels": np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)]}, data_sh)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  state = jax.jit(lambda: steps.create_train_state(model, tx, (size, size, 3), 0),
                  out_shardings=repl)()
  if forward_only:
    fn = jax.jit(lambda p, x: model.apply(models.variables(p), x, rngs={"mask": jax.random.key(0)}))
    args = (state.params, batch_data["image"])
  else:
    loss = tasks.get(task).loss_fn(model, _BENCH_CONFIG)
    fn = jax.jit(steps.make_train_step(loss, tx), donate_argnums=0)
    args = (state, batch_data)
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  if forward_only:
    run = lambda: compiled(*args)
  else:
    holder = [state]

    def run():
      holder[0], m = compiled(holder[0], batch_data)
      return m
  sync = lambda out: jax.block_until_ready(out)
  _timeit(run, warmup, sync)
  step_s = _timeit(run, steps_, sync)
  flop_count = flops.train_flops_per_example(model)
  if flop_count and forward_only:
    flop_count /= 3.0
  ips = batch / step_s
  out = {"impl": "jax", "model": name, "batch": batch, "dtype": dtype,
         "mode": "forward" if forward_only else "train", "img_per_sec": ips,
         "step_ms": 1e3 * step_s, "compile_s": compile_s, "devices": jax.device_count(),
         "device": jax.devices()[0].device_kind, "peak_mem_gib": _gib(peak_memory_bytes())}
  if flop_count:
    out["tflops_per_device"] = ips * flop_count / jax.device_count() / 1e12
    peak = flops.peak_flops()
    if peak:
      out["mfu"] = out["tflops_per_device"] * 1e12 / peak
  return out


def bench_torch(name: str, batch: int, *, dtype: str, steps_: int, warmup: int, compile_: bool,
                forward_only: bool, **overrides) -> dict:
  """The PyTorch reference: fused AdamW (on CUDA), autocast to `dtype`, optional torch.compile."""
  import torch
  from crate_jax.interop.torch_reference import CRATE as TorchCRATE
  kw = {**models.variant_kwargs(name), **overrides}
  kw = {k: kw[k] for k in ("image_size", "patch_size", "num_classes", "dim", "depth", "heads",
                           "dim_head") if k in kw}
  kw.setdefault("image_size", 224), kw.setdefault("patch_size", 16)
  kw.setdefault("num_classes", 1000)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = TorchCRATE(**kw).to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                          fused=dev == "cuda")
  x = torch.randn(batch, 3, kw["image_size"], kw["image_size"], device=dev)
  y = torch.randint(0, kw["num_classes"], (batch,), device=dev)
  fwd = torch.compile(model) if compile_ else model
  amp = getattr(torch, dtype)

  def step():
    with torch.autocast(dev, dtype=amp, enabled=dtype != "float32"):
      if forward_only:
        with torch.no_grad():
          return fwd(x)
      loss = torch.nn.functional.cross_entropy(fwd(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  sync = lambda _: torch.cuda.synchronize() if dev == "cuda" else None
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  _timeit(step, max(warmup, 1), sync)
  compile_s = time.perf_counter() - t
  step_s = _timeit(step, steps_, sync)
  mem = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  return {"impl": "torch.compile" if compile_ else "torch", "model": name, "batch": batch,
          "dtype": dtype, "mode": "forward" if forward_only else "train",
          "img_per_sec": batch / step_s, "step_ms": 1e3 * step_s, "compile_s": compile_s,
          "device": dev, "peak_mem_gib": _gib(mem)}


def _gib(b):
  return None if b is None else b / 2 ** 30


def _fmt(r: dict) -> str:
  cols = [f"{r['impl']:>13}", f"{r['model']:>12}", f"{r['mode']:>7}", f"bs={r['batch']:<4}",
          f"{r['img_per_sec']:9.1f} img/s", f"{r['step_ms']:8.2f} ms/step",
          f"compile {r['compile_s']:6.1f}s"]
  if r.get("tflops_per_device") is not None:
    cols.append(f"{r['tflops_per_device']:7.2f} TFLOP/s/dev")
  if r.get("mfu") is not None:
    cols.append(f"MFU {100 * r['mfu']:5.1f}%")
  if r.get("peak_mem_gib") is not None:
    cols.append(f"peak {r['peak_mem_gib']:.2f} GiB")
  return "  ".join(cols)


@cli.command
def main(argv=None) -> list[dict]:
  p = cli.ArgumentParser(description=__doc__)
  p.add_argument("--models", default="crate_tiny,crate_small,crate_base,crate_large")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--attention", default=None, help="None (einsum) | xla | cudnn")
  p.add_argument("--forward-only", action="store_true")
  p.add_argument("--vs-torch", action="store_true")
  p.add_argument("--torch-compile", action="store_true")
  p.add_argument("--tiny", action="store_true", help="tiny shapes that run on a CPU in seconds")
  p.add_argument("--json", default=None, help="also write the results to this file")
  a = p.parse_args(argv)
  overrides = TINY if a.tiny else {}
  common = dict(dtype=a.dtype, steps_=a.steps, warmup=a.warmup, forward_only=a.forward_only)
  results = []
  for name in a.models.split(","):
    r = bench_jax(name, a.batch, remat=a.remat, attention=a.attention, **common, **overrides)
    results.append(r)
    print(_fmt(r), flush=True)
    if a.vs_torch:
      for compile_ in ([False, True] if a.torch_compile else [False]):
        t = bench_torch(name, a.batch, compile_=compile_, **common, **overrides)
        t["jax_speedup"] = r["img_per_sec"] / t["img_per_sec"]
        results.append(t)
        print(_fmt(t) + f"  -> jax is {t['jax_speedup']:.2f}x", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  sys.exit(cli.exit_code(main()))
