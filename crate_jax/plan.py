"""Plan a Cloud TPU run on a CPU-only machine: compile the exact train and eval steps of a config
for a TPU slice (libtpu's compile-only path) and report, per chip, the HBM they need, their FLOPs
and collectives.

  python -m crate_jax.plan --config configs/crate_base.py --topology v5e:2x2
  python -m crate_jax.plan --config configs/crate_base_pod.py --topology v4-128 --json
  python -m crate_jax.plan --config configs/crate_large.py --topology v5p-8 --max-batch --noeval

The steps are the ones `crate_jax.train` runs (train.plan with the slice's devices and hosts, then
training.program.build); the figures are the compiler's, not a measured TPU speed. It also says what
the hosts' CPUs must feed: the images/s the chips consume at --mfu (default 0.4) of their bf16 peak,
per host and per host vCPU; with --input-rate (images/s one vCPU decodes and augments, as
benchmarks/input_pipeline.py measures it) whether the input pipeline keeps up:

  python -m crate_jax.plan --config configs/crate_base.py --topology v5litepod-8 --input-rate 150

Exit status:
0 fits, 1 does not fit (one `error:` line naming the chip, bytes needed and capacity), 2 bad
input (unknown topology, libtpu missing, a batch that does not divide over the slice, ...).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
import time

from crate_jax import cli, plan_input, tpu_topology

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# An instruction's opcode, e.g. "= f32[8]{0} all-reduce(" or "all-gather-start(": the async
# pair counts once (its -start; -done is not matched).
_OPCODE = re.compile(r"(?<![\w.%-])(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([^\s(]+) ", re.M)
_OOM_BYTES = re.compile(r"\(([\d.]+)([KMGT])\)")
FIGURES = ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "generated_code_bytes",
           "hbm_needed_bytes", "flops_per_chip", "collectives", "compile_s")
EXIT_DOES_NOT_FIT = 1
MAX_PER_CHIP = 2 ** 20   # --max-batch gives up beyond this per-chip batch


@dataclasses.dataclass
class Slice:
  """A TPU slice to plan for: its devices (one per chip) and what they are."""
  topology: tpu_topology.Topology
  devices: list
  hosts: int
  chip_kind: str
  hbm_capacity: int | None

  @classmethod
  def create(cls, name: str, quiet: bool = True) -> "Slice":
    topology = tpu_topology.resolve(name)
    devs = tpu_topology.devices(topology, quiet=quiet)
    kind = devs[0].device_kind
    return cls(topology, devs, tpu_topology.hosts(devs), kind, tpu_topology.hbm_bytes(kind))


# ------------------------------------------------------------------------------- figures
def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops in compiled HLO text, by kind: each op once (an async -start/-done pair
  once, an op in a loop body once). The TPU compiler writes a reduce-scatter as an all-reduce
  inside an `all-reduce-scatter` fusion: counted as the reduce-scatter it is."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for name, body in _computations(hlo_text):
    for m in _OPCODE.finditer(body):
      kind = m.group(1)
      if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"
      counts[kind] += 1
  return counts


def _computations(hlo_text: str):
  """(name, text) of each computation: they start at column 0, `[ENTRY ]%name (`."""
  starts = [(m.start(), m.group(1)) for m in _COMPUTATION.finditer(hlo_text)]
  if not starts:
    yield "", hlo_text
  for i, (pos, name) in enumerate(starts):
    end = starts[i + 1][0] if i + 1 < len(starts) else len(hlo_text)
    yield name, hlo_text[pos:end]


def memory_figures(compiled) -> dict[str, int]:
  """Per-chip bytes from compiled.memory_analysis() (SPMD: the per-device program).

  hbm_needed = arguments + temporaries + outputs - aliased: arguments (the train state and the
  chip's batch shard) are live on entry, temporaries at the peak, outputs are new buffers except
  those aliased to a donated argument (the state, donated by the train step), which are counted
  once among the arguments. The program's code (generated_code_bytes) is reported apart.
  """
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
         "generated_code_bytes": int(m.generated_code_size_in_bytes)}
  out["hbm_needed_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"]
                             - out["alias_bytes"])
  return out


def compiled_flops(compiled) -> float | None:
  """cost_analysis()'s flops: of the partitioned (per-device) module, i.e. per chip."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return None if flops is None else float(flops)


def oom_bytes(message: str) -> int | None:
  """The bytes a RESOURCE_EXHAUSTED compile error says are required, e.g. '(117.18G)'."""
  m = _OOM_BYTES.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1))


def compile_step(jitted, *args) -> dict:
  """Lower and compile for the slice; the figures, or compile_error for a compiler OOM."""
  import jax
  t = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    first = str(e).strip().splitlines()[0]
    return dict(dict.fromkeys(FIGURES), compile_error=first, hbm_needed_bytes=oom_bytes(first),
                compile_s=round(time.perf_counter() - t, 1))
  out = dict(memory_figures(compiled), compile_error=None)
  out["flops_per_chip"] = compiled_flops(compiled)
  out["collectives"] = count_collectives(compiled.as_text())
  out["compile_s"] = round(time.perf_counter() - t, 1)
  return out


def fits(figures: dict, capacity: int | None) -> bool:
  """Compiled, and (when the chip's HBM is known) needs no more than it."""
  if figures["compile_error"]:
    return False
  return capacity is None or figures["hbm_needed_bytes"] <= capacity


# -------------------------------------------------------------------------------- program
def with_batch(config, per_chip: int, chips: int):
  """A copy of the config with the global batch per_chip x chips."""
  config = copy.deepcopy(config)
  config.batch_size = per_chip * chips
  return config


def build(config, slc: Slice):
  """train.plan + program.build for the slice's devices and hosts, as the loop does it."""
  from crate_jax import train
  from crate_jax.data import sources
  from crate_jax.training import program
  examples = sources.source(config.data.name).train_examples or config.batch_size
  p = train.plan(config, devices=slc.devices, process_count=slc.hosts,
                 num_train_examples=examples)
  prog = program.build(config, p.model, p.mesh, total_steps=p.total_steps,
                       steps_per_epoch=p.steps_per_epoch)
  return p, prog


def train_figures(config, slc: Slice) -> tuple[dict, object]:
  p, prog = build(config, slc)
  batch = prog.abstract_batch(config, config.batch_size, train=True)
  return compile_step(prog.train_step, prog.abstract_state, batch), (p, prog)


def eval_figures(config, p, prog) -> dict:
  from crate_jax.training import program
  batch = prog.abstract_batch(config, config.eval_batch_size, train=False)
  out = compile_step(prog.eval_step, program.eval_params(prog, config, prog.abstract_state),
                     batch)
  out["per_chip_batch"] = config.eval_batch_size // len(p.mesh.devices.flat)
  return out


def report(config, slc: Slice, with_eval: bool = True, mfu: float = 0.4,
           input_rate: float | None = None) -> dict:
  """Everything the planner prints for the config's batch on the slice (JSON-ready); "input":
  input_report at `mfu` (and `input_rate` images/s per host vCPU, if given)."""
  from crate_jax.models import layers
  chips = len(slc.devices)
  train, (p, prog) = train_figures(config, slc)
  per_chip = config.batch_size // chips
  per_example = prog.task.train_flops_per_example(p.model, config)
  analytic = None if per_example is None else per_example * per_chip
  out = {"topology": slc.topology.name, "jax_topology": slc.topology.jax_name, "chips": chips,
         "hosts": slc.hosts, "chip_kind": slc.chip_kind, "model": config.model.name,
         "mesh": dict(p.mesh.shape), "remat": layers.remat_name(config.remat),
         "scan_layers": bool(config.model.scan_layers), "global_batch": config.batch_size,
         "per_host_batch": config.batch_size // slc.hosts, "per_chip_batch": per_chip,
         "hbm_capacity_bytes": slc.hbm_capacity, **train,
         "fits": fits(train, slc.hbm_capacity), "analytic_flops_per_chip": analytic}
  flops = train.get("flops_per_chip")
  # XLA's cost analysis counts a loop body once: a scanned stack's compiled FLOPs are one
  # layer's, not comparable with the analytic count of all of them.
  comparable = flops and analytic and not config.model.scan_layers
  out["flops_ratio"] = round(flops / analytic, 4) if comparable else None
  out["input"] = plan_input.input_report(out, slc, bool(config.model.scan_layers), mfu, input_rate)
  out["eval"] = None   # not compiled: --noeval, or the train step does not fit
  if with_eval and out["fits"]:
    ev = eval_figures(config, p, prog)
    ev["fits"] = fits(ev, slc.hbm_capacity)
    out["eval"] = ev
    out["fits"] = ev["fits"]
  return out


# ------------------------------------------------------------------------------ max batch
def max_batch(config, slc: Slice, progress=None, known: dict | None = None) -> dict:
  """The largest per-chip batch whose train step fits, in few compiles.

  From the config's batch, each next guess is where HBM reaches the capacity on the straight
  line through the nearest compiled points (HBM grows about linearly with the batch), clamped
  to the bracket found so far; it stops once the largest batch that
  fits and the smallest that does not are within lo / 16 (and a multiple of 8 and of
  grad_accum_steps) of each other: a handful of compiles. `known`: figures already compiled.
  """
  chips, cap = len(slc.devices), slc.hbm_capacity
  if cap is None:
    raise ValueError(f"the HBM of {slc.chip_kind} is not known: cannot search a batch")
  q = int(config.grad_accum_steps)
  start = max(q, config.batch_size // chips // q * q)
  g = math.lcm(q, 8) if start >= 8 else q   # TPU-friendly multiples of 8 when large enough
  seen: dict[int, dict] = dict(known or {})   # per-chip batch -> train figures

  def measure(b):
    if b not in seen:
      seen[b] = train_figures(with_batch(config, b, chips), slc)[0]
    if progress:
      progress(b, seen[b], fits(seen[b], cap))
    return fits(seen[b], cap)

  lo, hi = (start, None) if measure(start) else (0, start)
  creeping = False
  while (hi is None or hi - lo > _resolution(lo, g)) and lo < MAX_PER_CHIP:
    b = _next_guess(lo, hi, seen, cap, g, bisect=creeping)
    creeping = measure(b) and b == lo + _resolution(lo, g)
    if fits(seen[b], cap):
      lo = b
    else:
      hi = b
  return {"per_chip_batch": lo, "does_not_fit_at": hi, "compiles": len(seen),
          "hbm_needed_bytes": seen[lo]["hbm_needed_bytes"] if lo else None}


def _resolution(lo: int, g: int) -> int:
  return max(g, lo // 16 // g * g)


def _next_guess(lo: int, hi: int | None, seen: dict, cap: int, g: int, bisect: bool) -> int:
  """A little below where the HBM line crosses the capacity (so that it most likely fits and
  the next guess closes the bracket); doubling or bisecting when there is no line or the last
  guess crept up by the smallest step (the compiler squeezes memory near the capacity, so the
  line flattens there); always a multiple of g strictly inside the bracket."""
  step = _resolution(lo, g)
  low = lo + step if lo else g
  high = 8 * lo if hi is None else hi - step
  guess = None if bisect else _linear_guess(lo, hi, seen, cap)
  if guess is None:
    guess = 2 * lo if hi is None else (lo + hi) / 2
  else:
    guess *= 0.97
  guess = int(guess) // g * g
  return min(max(guess, low), max(high, low), MAX_PER_CHIP)


def _linear_guess(lo: int, hi: int | None, seen: dict, cap: int) -> float | None:
  """Per-chip batch at which HBM reaches `cap`: on the line through the bracket's compiled
  points, or from one: its temporaries scale with the batch, the rest (the state) does not. A
  compiler OOM is used only without a compiled point (its figure counts temporaries alone)."""
  compiled = [(b, seen[b]) for b in (lo, hi) if b in seen and seen[b]["temp_bytes"]]
  if len(compiled) == 2:
    (b0, f0), (b1, f1) = compiled
    m0, m1 = f0["hbm_needed_bytes"], f1["hbm_needed_bytes"]
    if m1 != m0:
      return b0 + (cap - m0) * (b1 - b0) / (m1 - m0)
  points = compiled or [(b, seen[b]) for b in (lo, hi) if b in seen and
                        seen[b]["hbm_needed_bytes"]]
  if not points:
    return None
  b, f = points[0]
  temp = f["temp_bytes"] or f["hbm_needed_bytes"]
  return b * (cap - (f["hbm_needed_bytes"] - temp)) / temp


# ---------------------------------------------------------------------------------- print
def gib(n) -> str:
  """Bytes for people: GiB from 1 GiB on, MiB below."""
  if n is None:
    return "?"
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def format_step(name: str, f: dict, capacity: int | None) -> list[str]:
  if f["compile_error"]:
    return [f"{name}: the compiler refuses it ({f['compile_error']})"]
  share = f" ({100 * f['hbm_needed_bytes'] / capacity:.0f}%)" if capacity else ""
  lines = [f"{name}: compiled in {f['compile_s']:.1f} s",
           f"  HBM per chip    {gib(f['hbm_needed_bytes'])} of {gib(capacity)}{share} = "
           f"arguments {gib(f['argument_bytes'])} + temporaries {gib(f['temp_bytes'])} + "
           f"outputs {gib(f['output_bytes'])} - aliased {gib(f['alias_bytes'])}",
           f"  FLOPs per chip  {f['flops_per_chip']:.4g} compiled"]
  coll = ", ".join(f"{k} {v}" for k, v in f["collectives"].items() if v) or "none"
  lines.append(f"  collectives     {coll}")
  return lines


def format_report(r: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  lines = [f"{r['model']} on {r['topology']} ({r['jax_topology']}: {r['chips']} chips "
           f"{r['chip_kind']}, {r['hosts']} host{'s' * (r['hosts'] > 1)}); mesh {mesh}; batch "
           f"{r['global_batch']} = {r['per_host_batch']} per host = {r['per_chip_batch']} "
           f"per chip; remat {r['remat']}{'; scanned layers' if r.get('scan_layers') else ''}"]
  lines += format_step("train step", r, r["hbm_capacity_bytes"])
  if r.get("flops_ratio"):
    lines[-2] += (f", {r['analytic_flops_per_chip']:.4g} analytic (compiled / analytic "
                  f"{r['flops_ratio']:.3f})")
  elif r.get("scan_layers") and r.get("flops_per_chip"):
    lines[-2] += " (one layer of the scanned stack: XLA counts a loop body once)"
  if r.get("eval"):
    lines += format_step(f"eval step (batch {r['eval']['per_chip_batch']} per chip)", r["eval"],
                         r["hbm_capacity_bytes"])
  if r.get("input"):
    lines += plan_input.format_input(r["input"], r["hosts"])
  if "max_batch" in r:
    m = r["max_batch"]
    lines.append(f"largest per-chip batch that fits: {m['per_chip_batch']} "
                 f"({gib(m['hbm_needed_bytes'])}; {m['does_not_fit_at']} does not; "
                 f"{m['compiles']} compiles)")
  lines.append(f"verdict: {'fits' if r['fits'] else 'does NOT fit'} "
               "(compiler figures, not a measured TPU speed)")
  return "\n".join(lines)


def does_not_fit_message(r: dict) -> str:
  """One line: which step, at what batch, the bytes it needs and the chip's capacity."""
  where = f"{r['chip_kind']} ({r['topology']})"
  if r["compile_error"] is None and r.get("eval") and not r["eval"]["fits"]:
    r = dict(r["eval"], chip_kind=r["chip_kind"], topology=r["topology"],
             hbm_capacity_bytes=r["hbm_capacity_bytes"], step="eval")
  if r["compile_error"]:
    return (f"the {r.get('step', 'train')} step at {r['per_chip_batch']} per chip does not fit "
            f"on {where}: {r['compile_error']}")
  return (f"the {r.get('step', 'train')} step at {r['per_chip_batch']} per chip needs "
          f"{r['hbm_needed_bytes']:,} "
          f"bytes ({gib(r['hbm_needed_bytes'])}) of HBM per chip; {where} has "
          f"{r['hbm_capacity_bytes']:,} ({gib(r['hbm_capacity_bytes'])})")


# ----------------------------------------------------------------------------------- main
@cli.command
def main(argv=None) -> int:
  import jax
  parser = cli.ArgumentParser(description=__doc__)
  cli.add_config_argument(parser)
  parser.add_argument("--topology", required=True, help=f"TPU slice: {tpu_topology.ACCEPTED}")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object instead of the report")
  parser.add_argument("--noeval", dest="eval", action="store_false",
                      help="compile the train step only (default: the eval step too)")
  parser.add_argument("--max-batch", "--max_batch", dest="max_batch", action="store_true",
                      help="also search the largest per-chip batch that fits (a few more "
                           "compiles)")
  parser.add_argument("--mfu", type=float, default=0.4,
                      help="model FLOPs utilisation at which the input figures assume the chips "
                           "run (of their bf16 peak; default 0.4)")
  parser.add_argument("--input-rate", "--input_rate", dest="input_rate", type=float,
                      default=None, metavar="IMG_PER_S_PER_VCPU",
                      help="images/s one host vCPU decodes and augments (e.g. from "
                           "benchmarks/input_pipeline.py): say whether the hosts keep up")
  f = cli.parse_args(parser, argv)
  if not 0 < f.mfu <= 1:
    parser.error(f"--mfu {f.mfu:g} must be in (0, 1]")
  if f.input_rate is not None and f.input_rate <= 0:
    parser.error(f"--input-rate {f.input_rate:g} must be > 0")
  jax.config.update("jax_platforms", "cpu")      # the TPU is only a compile target here
  jax.config.update("jax_enable_compilation_cache", False)  # compile times are the report
  slc = Slice.create(f.topology, quiet=not cli.debug_requested(sys.argv[1:] if argv is None
                                                               else argv))
  r = report(f.config, slc, with_eval=f.eval, mfu=f.mfu, input_rate=f.input_rate)
  if f.max_batch:
    known = {r["per_chip_batch"]: {k: r[k] for k in (*FIGURES, "compile_error")}}
    r["max_batch"] = max_batch(f.config, slc, progress=_progress, known=known)
  print(json.dumps(r, indent=2) if f.json else format_report(r), flush=True)
  if not r["fits"]:
    cli.fail(does_not_fit_message(r))
    return EXIT_DOES_NOT_FIT
  return 0


def _progress(b: int, figures: dict, ok: bool) -> None:
  print(f"  max batch: {b} per chip -> {gib(figures.get('hbm_needed_bytes'))}, "
        f"{'fits' if ok else 'does not fit'} ({figures['compile_s']:.0f} s)", file=sys.stderr,
        flush=True)


if __name__ == "__main__":
  sys.exit(main())
