"""Cost against the number of tokens N: ToST's TSSA (linear in N) vs softmax attention (CRATE's
MSSA, ViT's MHSA: quadratic), at matched width and depth, N = 196, 784, 3136, 12544 (224, 448,
896 and 1792 px at patch 16).

  python benchmarks/tost_scaling.py --part cpu --out workdirs/tost_scaling.jsonl  # measure here
  python benchmarks/tost_scaling.py --part tpu --out workdirs/tost_scaling.jsonl  # TPU compiler
  python benchmarks/tost_scaling.py --out workdirs/tost_scaling.jsonl --markdown  # the tables

Two parts, rows appended to --out as they finish (one JSON object per line) and skipped when
already there, so an interrupted run continues:
  cpu  on this host, small matched models (width 192, 4 heads of 48, depth 2; ToST keeps its 2
       class-attention blocks and conv stem), batch 1, float32: median wall time of the jitted
       forward and of a train step (value_and_grad of the cross-entropy + an SGD update, params
       donated; ToST's batch-norm statistics carried as the library's train step does), and the
       bytes XLA's memory analysis gives each executable (plan.memory_figures: arguments +
       temporaries + outputs - aliased) and its FLOPs (cost_analysis). A step whose memory
       analysis exceeds --cpu-mem-gib is compiled but not run (recorded as such). Then the same
       at depth 0 (no attention blocks), to separate the blocks' cost from the rest's.
  tpu  compile-only with the real TPU compiler (libtpu) on --topologies (default v5e:2x2 and
       v5p-8), the library's real train step (crate_jax.plan: Lion, bfloat16 compute, donated
       state) of ToST-T (tost_cab_tiny_12_p16: 192 wide, 12 deep, 4 heads) against CRATE and
       ViT built to the same 192 / 12 / 4 heads of 48 (the registered crate_tiny is 384 wide,
       vit_tiny has 3 heads of 64): per-chip HBM and compiled FLOPs at 1 image per chip with
       unrolled layers (XLA counts a scanned loop body once), the largest per-chip batch that
       fits (plan.max_batch, scanned layers), and the fixed-batch figures at depth 0 on the
       first topology.
--markdown prints the tables, the least-squares exponent b of cost ~ N^b per family and metric
(over all measured N, and between the two largest; also for the blocks alone: the model minus
its depth-0 self), and the smallest N at which ToST is cheaper than CRATE (and than ViT).
Times are wall times on a shared host: compare rows of one run. On a 2-core host (shared) the
cpu part took 7 minutes, the tpu part 1 h 55 min (1 h 10 min of it the max-batch searches of
ToST, whose larger-batch compiles take 1-2 minutes each).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = 16
SIZES = (224, 448, 896, 1792)
FAMILIES = ("ToST", "CRATE", "ViT")
# label -> (registry name, overrides making the trio match: width 192, heads 4 x 48)
MATCHED = {"ToST": ("tost_cab_tiny_12_p16", {}),
           "CRATE": ("crate_tiny", {"dim": 192, "heads": 4, "dim_head": 48}),
           "ViT": ("vit_tiny", {"dim": 192, "heads": 4, "dim_head": 48})}
CPU_DEPTH = 2
TPU_DEPTH = 12
TPU_TOPOLOGIES = ("v5e:2x2", "v5p-8")
GIB, MIB = 2 ** 30, 2 ** 20
LINEAR = 1.15     # --markdown: a ToST exponent above this gets a note on where it comes from


def tokens(size: int) -> int:
  return (size // PATCH) ** 2


def key(row) -> str:
  return "|".join(str(row.get(k)) for k in ("part", "kind", "family", "topology", "size"))


# ------------------------------------------------------------------------------------ cpu
def depth_of(kind: str, full: int) -> int:
  """Rows of kind *depth0 build the model without its attention blocks (depth 0: ToST's conv
  stem, positions, class-attention blocks and head; CRATE's and ViT's patch embedding and
  head): cost(full) - cost(depth 0) is the blocks' own."""
  return 0 if kind.endswith("depth0") else full


def cpu_model(family: str, size: int, depth: int):
  import jax.numpy as jnp
  from crate_jax import models
  name, overrides = MATCHED[family]
  return models.get(name, image_size=size, num_classes=1000, depth=depth, dtype=jnp.float32,
                    **overrides)


def cpu_programs(model):
  """(forward, train step) jitted: forward(params, x) -> logits; step(params, x, y) ->
  (params, loss), params donated."""
  import jax
  import jax.numpy as jnp
  from crate_jax import models

  def forward(params, x):
    return model.apply(models.variables(params), x, train=False)

  def loss_fn(params, x, y, rng):
    logits, state = models.apply_train(model, params, x, rngs={"dropout": rng})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1)), state

  def step(params, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, x, y, jax.random.key(1))
    params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    return models.with_state(params, state), loss

  return jax.jit(forward), jax.jit(step, donate_argnums=0)


def _times(call, first_s: float, budget_s: float, max_runs: int = 5) -> list[float]:
  """Seconds of repeated `call()` (already warmed up): as many runs as fit in budget_s given
  the warm-up took first_s, between 2 and max_runs."""
  runs = int(max(2, min(max_runs, budget_s // max(first_s, 1e-3))))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  return times


def cpu_row(kind: str, family: str, size: int, mem_limit: int, budget_s: float) -> dict:
  import jax
  import jax.numpy as jnp
  from crate_jax import models, plan
  depth = depth_of(kind, CPU_DEPTH)
  model = cpu_model(family, size, depth)
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (1, size, size, 3)), jnp.float32)
  y = jnp.zeros((1,), jnp.int32)
  params = jax.jit(lambda k: models.init_params(model, k, x))(jax.random.key(0))
  n_params = sum(a.size for a in jax.tree.leaves(models.variables(params)["params"]))
  forward, step = cpu_programs(model)
  out = {"part": "cpu", "kind": kind, "family": family, "size": size, "tokens": tokens(size),
         "model": MATCHED[family][0], "overrides": dict(MATCHED[family][1], depth=depth),
         "dtype": "float32", "batch": 1, "params": int(n_params),
         "device": jax.devices()[0].device_kind, "cpus": os.cpu_count()}
  for name, fn, args in (("forward", forward, (params, x)), ("train", step, (params, x, y))):
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    fig = {"compile_s": round(time.perf_counter() - t, 2), **plan.memory_figures(compiled),
           "flops": plan.compiled_flops(compiled), "seconds": None, "runs": 0, "skipped": None}
    if fig["hbm_needed_bytes"] > mem_limit:
      fig["skipped"] = (f"memory analysis {fig['hbm_needed_bytes'] / GIB:.1f} GiB > "
                        f"--cpu-mem-gib {mem_limit / GIB:.0f}")
    else:
      if name == "forward":
        call = lambda: compiled(params, x).block_until_ready()
      else:
        state = {"p": jax.tree.map(jnp.copy, params)}   # donated: a copy to step with

        def call():
          state["p"], loss = compiled(state["p"], x, y)
          loss.block_until_ready()
      t = time.perf_counter()
      call()
      first = time.perf_counter() - t
      fig["first_s"] = round(first, 4)
      times = _times(call, first, budget_s)
      fig["seconds"], fig["runs"] = statistics.median(times), len(times)
      fig["times"] = [round(v, 5) for v in times]
      fig["load"] = os.getloadavg()[0]
    out[name] = fig
  return out


def run_cpu(args, have: set) -> None:
  for kind in ("cpu", "cpu_depth0"):
    for size in SIZES:
      for family in FAMILIES:
        row = {"part": "cpu", "kind": kind, "family": family, "topology": None, "size": size}
        if key(row) in have:
          continue
        t = time.perf_counter()
        out = cpu_row(kind, family, size, int(args.cpu_mem_gib * GIB), args.cpu_budget_s)
        out["row_s"] = round(time.perf_counter() - t, 1)
        fw, tr = out["forward"], out["train"]
        print(f"{key(out)}: N={out['tokens']} forward {_ms(fw)} ({_mib(fw)} MiB), train "
              f"{_ms(tr)} ({_mib(tr)} MiB); {out['row_s']} s", flush=True)
        append(args.out, out)


def _ms(fig) -> str:
  return f"skipped ({fig['skipped']})" if fig["skipped"] else f"{fig['seconds'] * 1e3:.1f} ms"


def _mib(fig) -> str:
  return f"{fig['hbm_needed_bytes'] / MIB:.0f}"


# ------------------------------------------------------------------------------------ tpu
def tpu_config(family: str, size: int, per_chip: int, chips: int, scan: bool, depth: int):
  """configs/crate_tiny.py with the matched model at `size` px, batch per_chip x chips."""
  from crate_jax import setups
  spec = importlib.util.spec_from_file_location("tost_scaling_config",
                                                os.path.join(ROOT, "configs/crate_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  name, overrides = MATCHED[family]
  config.model.name = name
  for k, v in dict(overrides, depth=depth).items():
    config.model.kwargs[k] = v
  config.data.image_size = size        # model.kwargs.image_size references it
  config.model.scan_layers = scan
  config.batch_size = per_chip * chips
  setups.validate(config)
  return config


def command(family, size, topology, per_chip, chips, scan, depth, extra="") -> str | None:
  """The `python -m crate_jax.plan` command of a row; None where the model needs kwargs the
  config does not have (the command line sets existing keys only): this script's tpu_config
  builds those (matched CRATE and ViT, depth 0)."""
  name, overrides = MATCHED[family]
  if overrides or depth != TPU_DEPTH:
    return None
  flags = [f"--config.model.name={name}", f"--config.data.image_size={size}",
           f"--config.batch_size={per_chip * chips}"]
  if scan:
    flags.append("--config.model.scan_layers=True")
  return " ".join(["python -m crate_jax.plan --config configs/crate_tiny.py",
                   f"--topology {topology}", *flags, "--noeval", extra]).strip()


def tpu_rows(topologies):
  """Fixed-batch rows first (all sizes, every topology), then the max-batch searches, then
  the depth-0 rows (fixed batch, the first topology only: FLOPs do not depend on it)."""
  for kind in ("fixed", "maxbatch", "depth0"):
    for topo in topologies[:1] if kind == "depth0" else topologies:
      for size in SIZES:
        for family in FAMILIES:
          yield {"part": "tpu", "kind": kind, "family": family, "topology": topo, "size": size}


def tpu_row(row: dict, slices: dict, per_chip: int) -> dict:
  from crate_jax import plan
  topo = row["topology"]
  if topo not in slices:
    slices[topo] = plan.Slice.create(topo)
  slc = slices[topo]
  chips = len(slc.devices)
  scan, depth = row["kind"] == "maxbatch", depth_of(row["kind"], TPU_DEPTH)
  config = tpu_config(row["family"], row["size"], per_chip, chips, scan, depth)
  r = plan.report(config, slc, with_eval=False)
  out = dict(row, tokens=tokens(row["size"]), model=MATCHED[row["family"]][0],
             overrides=dict(MATCHED[row["family"]][1], depth=depth), report=r,
             command=command(row["family"], row["size"], topo, per_chip, chips, scan, depth,
                             "--max-batch" if scan else ""))
  if scan:
    known = {r["per_chip_batch"]: {k: r[k] for k in (*plan.FIGURES, "compile_error")}}
    t = time.perf_counter()
    out["max_batch"] = plan.max_batch(config, slc, known=known)
    out["max_batch"]["search_s"] = round(time.perf_counter() - t, 1)
  return out


def run_tpu(args, have: set) -> None:
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  slices = {}
  for row in tpu_rows(args.topologies.split(",")):
    if row["kind"] not in args.kinds.split(",") or key(row) in have:
      continue
    t = time.perf_counter()
    out = tpu_row(row, slices, args.per_chip)
    out["row_s"] = round(time.perf_counter() - t, 1)
    rep = out["report"]
    hbm = rep["hbm_needed_bytes"]
    print(f"{key(row)}: {'-' if hbm is None else f'{hbm / GIB:.2f}'} GiB fits={rep['fits']} "
          f"flops {rep['flops_per_chip']} compile {rep['compile_s']} s"
          + (f" max {out['max_batch']['per_chip_batch']}" if "max_batch" in out else "")
          + f"; {out['row_s']} s", flush=True)
    append(args.out, out)


# ------------------------------------------------------------------------------- markdown
def slope(points) -> float | None:
  """Least-squares slope of log(cost) against log(N) over (N, cost) points with cost > 0."""
  pts = [(math.log(n), math.log(c)) for n, c in points if c and c > 0]
  if len(pts) < 2:
    return None
  mx = sum(p[0] for p in pts) / len(pts)
  my = sum(p[1] for p in pts) / len(pts)
  sxx = sum((p[0] - mx) ** 2 for p in pts)
  return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def exponents(series: dict) -> str:
  """'all / two largest N' slopes, e.g. '1.02 / 1.00'; '-' without two points."""
  points = sorted((n, c) for n, c in series.items() if c and c > 0)
  fit_all, fit_last = slope(points), slope(points[-2:])
  if fit_all is None:
    return "-"
  n = f" ({len(points)} N)" if len(points) < len(SIZES) else ""
  return f"{fit_all:.2f} / {fit_last:.2f}{n}"


def crossover(cheap: dict, other: dict) -> str:
  """The smallest measured N at which cheap[N] < other[N] (a missing `other` = did not run or
  fit = more expensive), with the N where the log-log line between it and the N before
  crosses (the ratio interpolated)."""
  ns = sorted(n for n, v in cheap.items() if v)
  for i, n in enumerate(ns):
    if other.get(n) is None or cheap[n] < other[n]:
      if i == 0:
        return "already at 196" if n == tokens(SIZES[0]) else f"N = {n} (first measured)"
      m = ns[i - 1]
      if other.get(n) is None or not other.get(m):
        return f"N = {n}"
      r0, r1 = math.log(cheap[m] / other[m]), math.log(cheap[n] / other[n])
      at = math.exp(math.log(m) + (math.log(n) - math.log(m)) * r0 / (r0 - r1))
      return f"N = {n} (~{at:.0f})"
  return f"not by N = {ns[-1]}" if ns else "-"


def _fmt(v, scale=1.0, digits=1) -> str:
  return "-" if v is None else f"{v / scale:.{digits}f}"


def _rows(rows, part, kind, topology=None) -> dict:
  """(family, size) -> row of that part / kind (/ topology)."""
  return {(r["family"], r["size"]): r for r in rows if r["part"] == part and r["kind"] == kind
          and (topology is None or r["topology"] == topology)}


def cpu_value(r, what, metric):
  if r is None:
    return None
  fig = r[what]
  return None if metric == "seconds" and fig.get("skipped") else fig.get(metric)


def tpu_value(r, metric):
  """A fixed-batch TPU figure: bytes as the compiler gives them, FLOPs per image."""
  if r is None or r["report"].get("compile_error"):
    return None
  rep = r["report"]
  value = rep.get(metric)
  if metric == "flops_per_chip" and value is not None:
    value /= rep["per_chip_batch"]
  return value


def blocks_only(full: dict, depth0: dict) -> dict:
  """full - depth 0 where both are known: the attention blocks' own cost."""
  return {n: (full[n] - depth0[n]) if full.get(n) and depth0.get(n) else None for n in full}


def _share(full, part) -> str:
  return "-" if not (full and part is not None) else f"{100 * part / full:.0f}%"


def cpu_markdown(rows: list[dict]) -> list[str]:
  by, by0 = _rows(rows, "cpu", "cpu"), _rows(rows, "cpu", "cpu_depth0")
  if not by:
    return []
  any_row = next(iter(by.values()))
  loads = [r[w]["load"] for r in by.values() for w in ("forward", "train") if "load" in r[w]]
  lines = [f"CPU ({any_row['device']}, {any_row['cpus']} cores, shared: 1-minute load average "
           f"{min(loads):.1f} to {max(loads):.1f} during the timings), batch 1, float32, "
           f"matched models: width 192, 4 heads of 48, depth {CPU_DEPTH} (ToST also has its "
           "conv stem and 2 class-attention blocks; CRATE's ISTA has no MLP). Wall time per "
           "image (ms, median of 2-5 runs after a warm-up) and XLA's memory analysis of the "
           "executable (MiB: arguments + temporaries + outputs - aliased); `skip` = not run, "
           "its memory analysis is over --cpu-mem-gib.", "",
           "| N (px) | " + " | ".join(f"fwd ms {f}" for f in FAMILIES) + " | "
           + " | ".join(f"train ms {f}" for f in FAMILIES) + " | "
           + " | ".join(f"fwd MiB {f}" for f in FAMILIES) + " | "
           + " | ".join(f"train MiB {f}" for f in FAMILIES) + " |",
           "|---|" + "---|" * 4 * len(FAMILIES)]
  for size in SIZES:
    cells = []
    for metric, what in (("seconds", "forward"), ("seconds", "train"),
                         ("hbm_needed_bytes", "forward"), ("hbm_needed_bytes", "train")):
      for f in FAMILIES:
        r = by.get((f, size))
        if r is None:
          cells.append("?")
        elif metric == "seconds":
          cells.append("skip" if r[what]["skipped"] else _fmt(r[what]["seconds"], 1e-3))
        else:
          cells.append(_fmt(r[what][metric], MIB, 0))
    lines.append(f"| {tokens(size)} ({size}) | " + " | ".join(cells) + " |")
  if by0:
    lines += ["", "CPU, the same models at depth 0 (no attention blocks: ToST's conv stem, "
              "Fourier positions, class-attention blocks and head; CRATE's / ViT's patch "
              "embedding and head): their share of the depth-2 model's train time and train "
              "FLOPs, and ToST's depth-0 train time (ms).", "",
              "| N (px) | " + " | ".join(f"time {f}" for f in FAMILIES) + " | "
              + " | ".join(f"FLOPs {f}" for f in FAMILIES) + " | ToST depth 0 train ms |",
              "|---|" + "---|" * (2 * len(FAMILIES) + 1)]
    for size in SIZES:
      cells = []
      for metric in ("seconds", "flops"):
        for f in FAMILIES:
          cells.append(_share(cpu_value(by.get((f, size)), "train", metric),
                              cpu_value(by0.get((f, size)), "train", metric)))
      t0 = cpu_value(by0.get(("ToST", size)), "train", "seconds")
      lines.append(f"| {tokens(size)} ({size}) | " + " | ".join(cells)
                   + f" | {_fmt(t0, 1e-3)} |")
  return lines


def tpu_markdown(rows: list[dict], topologies) -> list[str]:
  lines = []
  for topo in topologies:
    fixed, maxb = _rows(rows, "tpu", "fixed", topo), _rows(rows, "tpu", "maxbatch", topo)
    if not (fixed or maxb):
      continue
    rep0 = next(iter({**maxb, **fixed}.values()))["report"]
    lines += ["", f"TPU compiler, {topo} ({rep0['chips']} x {rep0['chip_kind']}, "
              f"{rep0['hbm_capacity_bytes'] / GIB:.0f} GiB HBM per chip), the library's train "
              f"step (Lion, bfloat16 compute), ToST-T vs CRATE and ViT at 192 wide / {TPU_DEPTH} "
              "deep / 4 heads of 48. Per-chip HBM (GiB) and compiled train FLOPs per image "
              "(GFLOP) at 1 image per chip, unrolled layers; largest per-chip batch that fits "
              "(scanned layers). `x` = does not fit at 1 per chip (HBM: the compiler's figure "
              "where it gives one); 0 = not even 1 image fits with scanned layers, `(1 "
              "unrolled)`: it does with unrolled ones (the compiler then rematerialises across "
              "layers: more FLOPs).", "",
              "| N (px) | " + " | ".join(f"HBM {f}" for f in FAMILIES) + " | "
              + " | ".join(f"GFLOP {f}" for f in FAMILIES) + " | "
              + " | ".join(f"max batch {f}" for f in FAMILIES) + " |",
              "|---|" + "---|" * 3 * len(FAMILIES)]
    for size in SIZES:
      hbm, flops, mb = [], [], []
      for f in FAMILIES:
        r = fixed.get((f, size))
        if r is None:
          hbm.append("?")
          flops.append("?")
        else:
          rep = r["report"]
          hbm.append(_fmt(rep["hbm_needed_bytes"], GIB, 2) + ("" if rep["fits"] else " x"))
          flops.append(_fmt(tpu_value(r, "flops_per_chip"), 1e9, 1))
        r, unrolled = maxb.get((f, size)), fixed.get((f, size))
        if r is None:
          mb.append("?")
        else:
          best = r["max_batch"]["per_chip_batch"]
          # the compiler fits an unrolled stack into less (rematerialising across layers)
          mb.append(f"{best}" + (" (1 unrolled)" if not best and unrolled
                                 and unrolled["report"]["fits"] else ""))
      lines.append(f"| {tokens(size)} ({size}) | " + " | ".join(hbm + flops + mb) + " |")
  topo = topologies[0]
  fixed, depth0 = _rows(rows, "tpu", "fixed", topo), _rows(rows, "tpu", "depth0", topo)
  if depth0:
    lines += ["", f"TPU compiler, {topo}, the same train step at depth 0 (no attention blocks): "
              "its share of the depth-12 model's compiled FLOPs and temporaries (1 per chip).",
              "", "| N (px) | " + " | ".join(f"FLOPs {f}" for f in FAMILIES) + " | "
              + " | ".join(f"temporaries {f}" for f in FAMILIES) + " |",
              "|---|" + "---|" * 2 * len(FAMILIES)]
    for size in SIZES:
      cells = [_share(tpu_value(fixed.get((f, size)), m), tpu_value(depth0.get((f, size)), m))
               for m in ("flops_per_chip", "temp_bytes") for f in FAMILIES]
      lines.append(f"| {tokens(size)} ({size}) | " + " | ".join(cells) + " |")
  return lines


def metric_series(rows, topologies) -> list[tuple[str, dict]]:
  """(label, {family: {N: cost}}) for the exponent table: each measured metric, and the
  blocks' own (full - depth 0) where depth-0 rows exist."""
  out = []
  cpu, cpu0 = _rows(rows, "cpu", "cpu"), _rows(rows, "cpu", "cpu_depth0")

  def cpu_series(table, what, metric):
    return {f: {tokens(s): cpu_value(table.get((f, s)), what, metric) for s in SIZES
                if (f, s) in table} for f in FAMILIES}
  if cpu:
    for label, what, metric in (("CPU forward time", "forward", "seconds"),
                                ("CPU train time", "train", "seconds"),
                                ("CPU forward temporaries", "forward", "temp_bytes"),
                                ("CPU train temporaries", "train", "temp_bytes"),
                                ("CPU train FLOPs", "train", "flops")):
      full = cpu_series(cpu, what, metric)
      out.append((label, full))
      if cpu0 and what == "train":
        zero = cpu_series(cpu0, what, metric)
        out.append((f"{label}, blocks only", {f: blocks_only(full[f], zero.get(f, {}))
                                              for f in FAMILIES}))
  for i, topo in enumerate(topologies):
    fixed, depth0 = _rows(rows, "tpu", "fixed", topo), _rows(rows, "tpu", "depth0", topo)
    if not fixed:
      continue

    def tpu_series(table, metric):
      return {f: {tokens(s): tpu_value(table.get((f, s)), metric) for s in SIZES
                  if (f, s) in table} for f in FAMILIES}
    for label, metric in (("train HBM", "hbm_needed_bytes"), ("train temporaries", "temp_bytes"),
                          ("train FLOPs", "flops_per_chip")):
      full = tpu_series(fixed, metric)
      out.append((f"{topo} {label}", full))
      if depth0 and metric != "hbm_needed_bytes":
        zero = tpu_series(depth0, metric)
        out.append((f"{topo} {label}, blocks only", {f: blocks_only(full[f], zero.get(f, {}))
                                                     for f in FAMILIES}))
    maxb = _rows(rows, "tpu", "maxbatch", topo)
    if maxb:   # cost per image = 1 / images that fit
      out.append((f"{topo} 1 / max batch", {f: {
          tokens(s): (1 / r["max_batch"]["per_chip_batch"]
                      if r["max_batch"]["per_chip_batch"] else None)
          for (g, s), r in maxb.items() if g == f} for f in FAMILIES}))
  return out


def notes(rows, metrics, topologies) -> list[str]:
  """Where ToST is not ~linear (exponent over all N > LINEAR): whether its blocks are (the
  excess then lies in the depth-0 part), and jumps of the depth-0 temporaries between
  neighbouring N (more than twice the token ratio) with, where it matches, their size: an f32
  copy of the image with its 3 channels padded to the TPU's 128 lanes."""
  out, by = [], dict(metrics)
  for label, series in metrics:
    b = slope(sorted((n, c) for n, c in series["ToST"].items() if c and c > 0))
    if label.endswith("blocks only") or b is None or b <= LINEAR:
      continue
    blocks = by.get(f"{label}, blocks only", {}).get("ToST", {})
    bb = slope(sorted((n, c) for n, c in blocks.items() if c and c > 0))
    if bb is not None and bb <= LINEAR:
      out.append(f"ToST's {label}: ~N^{b:.2f}, its blocks' alone ~N^{bb:.2f}: the "
                 "excess is in the depth-0 part (conv stem, positions, class attention), not "
                 "in TSSA.")
    else:
      out.append(f"ToST's {label}: ~N^{b:.2f}" + (f" (its blocks' alone ~N^{bb:.2f})" if bb
                                                  else "") + ": not linear.")
  topo = topologies[0]
  depth0, fixed = _rows(rows, "tpu", "depth0", topo), _rows(rows, "tpu", "fixed", topo)
  for f in FAMILIES:
    pts = sorted((s, tpu_value(r, "temp_bytes")) for (g, s), r in depth0.items() if g == f)
    for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
      step, full = tokens(s1) / tokens(s0), tpu_value(fixed.get((f, s1)), "temp_bytes")
      if t0 and t1 and t1 / t0 > 2 * step and full and t1 > 0.1 * full:
        padded = s1 * s1 * 128 * 4
        what = (f", {t1 / padded:.2f} x the bytes of an f32 {s1}x{s1}x128 array (what the "
                "3-channel image takes with its channels padded to 128 lanes)"
                if 0.8 < t1 / padded < 1.25 else "")
        out.append(f"{topo}: {f}'s depth-0 temporaries jump {t1 / t0:.0f}x from N = "
                   f"{tokens(s0)} to {tokens(s1)} ({step:.0f}x the tokens), to "
                   f"{100 * t1 / full:.0f}% of the full model's{what}.")
  return out


def markdown(rows: list[dict], topologies) -> str:
  lines = cpu_markdown(rows) + tpu_markdown(rows, topologies)
  metrics = metric_series(rows, topologies)
  if metrics:
    lines += ["", "Exponent b of cost ~ N^b per family: least squares on log cost vs log N over "
              "all measured N / between the two largest; and the smallest measured N at which "
              "ToST is cheaper (in brackets: where the log-log line through the two N around it "
              "crosses; a missing figure = did not run or fit = more expensive). `blocks only` = "
              "the model minus the same model at depth 0.", "",
              "| metric | " + " | ".join(FAMILIES) + " | ToST < CRATE from | ToST < ViT from |",
              "|---|" + "---|" * (len(FAMILIES) + 2)]
    for label, series in metrics:
      cells = [exponents(series[f]) for f in FAMILIES]
      lines.append(f"| {label} | " + " | ".join(cells) + " | "
                   f"{crossover(series['ToST'], series['CRATE'])} | "
                   f"{crossover(series['ToST'], series['ViT'])} |")
    found = notes(rows, metrics, topologies)
    if found:
      lines += ["", "Notes (from the figures above):", ""] + [f"- {n}" for n in found]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def append(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--part", choices=("cpu", "tpu"))
  ap.add_argument("--markdown", action="store_true", help="print the tables from --out")
  ap.add_argument("--cpu-mem-gib", type=float, default=12.0,
                  help="cpu: do not run a step whose memory analysis needs more")
  ap.add_argument("--cpu-budget-s", type=float, default=20.0,
                  help="cpu: timed runs per step: as many as fit in this (2 to 5)")
  ap.add_argument("--topologies", default=",".join(TPU_TOPOLOGIES))
  ap.add_argument("--kinds", default="fixed,maxbatch,depth0", help="tpu: which rows")
  ap.add_argument("--per-chip", type=int, default=1, help="tpu: per-chip batch of fixed rows")
  args = ap.parse_args()
  done = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = [json.loads(line) for line in f if line.strip()]
  if args.markdown:
    print(markdown(done, args.topologies.split(",")))
    return
  if args.part is None:
    ap.error("--part cpu or --part tpu (or --markdown)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  have = {key(r) for r in done}
  t = time.perf_counter()
  (run_cpu if args.part == "cpu" else run_tpu)(args, have)
  print(f"part {args.part}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
  main()
