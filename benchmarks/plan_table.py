"""The TPU table of docs/tpu-pods.md: compile plans of the CRATE recipes for Cloud TPU slices,
on a CPU host.

  python benchmarks/plan_table.py --out workdirs/plan_table.jsonl            # compile every row
  python benchmarks/plan_table.py --out workdirs/plan_table.jsonl --markdown # print the tables

Every figure is the TPU compiler's (libtpu, compile-only), not a measured TPU speed. Rows are
appended to --out as they finish (one JSON object per line) and skipped when already there, so an
interrupted run continues. Three parts:
  recipe    each model's recipe config (global batch as the recipe has it) with scanned layers on
            v4-8, v5litepod-8, v5p-8 and v6e-8: per-chip HBM and fits
  unrolled  the same with unrolled layers on --max-batch-topology: HBM, compile time, and the
            compiled / analytic FLOPs (XLA counts a scanned loop body once, so only here)
  maxbatch  on --max-batch-topology: the largest per-chip batch that fits with plain, remat
            (full) and FSDP (mesh.fsdp = chips) train steps, scanned layers (compile one layer)
  remat     CRATE-L and CRATE-alpha-L/14 on --max-batch-topology at the recipe batch, scanned,
            per remat policy: per-chip HBM
  pod       configs/crate_base_pod.py on its 64-chip v4-128 slice, train and eval steps
Each row has the `python -m crate_jax.plan` command that reproduces it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from crate_jax import plan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, config file, model override or None)
MODELS = [("CRATE-T", "configs/crate_tiny.py", None),
          ("CRATE-S", "configs/crate_small.py", None),
          ("CRATE-B", "configs/crate_base.py", None),
          ("CRATE-L", "configs/crate_large.py", None),
          ("CRATE-alpha-B/16", "configs/crate_alpha.py:in1k", "crate_alpha_b16"),
          ("CRATE-alpha-L/14", "configs/crate_alpha.py:in1k", "crate_alpha_l14")]
TOPOLOGIES = ("v4-8", "v5litepod-8", "v5p-8", "v6e-8")
VARIANTS = {"plain": {}, "remat": {"remat": "full"}, "fsdp": {"mesh.fsdp": "CHIPS"}}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def load(config_arg: str, model: str | None, overrides: dict):
  path, _, arg = config_arg.partition(":")
  import importlib.util
  spec = importlib.util.spec_from_file_location("plan_table_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  if model:
    config.model.name = model
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def command(config_arg, model, topology, overrides, extra=""):
  flags = [f"--config.model.name={model}"] if model else []
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  return " ".join(["python -m crate_jax.plan", f"--config {config_arg}", f"--topology {topology}",
                   *flags, "--noeval", extra]).strip()


def rows_to_run(max_topology: str):
  """The rows, the most telling first (an interrupted run has those)."""
  for label, cfg, model in MODELS:
    for topo in TOPOLOGIES:
      yield {"part": "recipe", "label": label, "config": cfg, "model": model, "topology": topo,
             "overrides": {"model.scan_layers": True}}
  yield {"part": "pod", "label": "crate_base_pod", "config": "configs/crate_base_pod.py",
         "model": None, "topology": "v4-128", "overrides": {}}
  by_size = [MODELS[i] for i in (3, 5, 2, 4, 1, 0)]   # L, alpha-L/14, B, alpha-B/16, S, T
  for label, cfg, model in by_size[:3]:
    for variant, overrides in VARIANTS.items():
      yield {"part": "maxbatch", "label": label, "config": cfg, "model": model,
             "topology": max_topology, "variant": variant,
             "overrides": {"model.scan_layers": True, **overrides}}
  for label, cfg, model in by_size:
    yield {"part": "unrolled", "label": label, "config": cfg, "model": model,
           "topology": max_topology, "overrides": {}}
  for label, cfg, model in (MODELS[3], MODELS[5]):
    for policy in REMAT_POLICIES:
      yield {"part": "remat", "label": label, "config": cfg, "model": model,
             "topology": max_topology, "variant": policy,
             "overrides": {"model.scan_layers": True, "remat": policy}}
  for label, cfg, model in by_size[3:]:
    for variant, overrides in VARIANTS.items():
      yield {"part": "maxbatch", "label": label, "config": cfg, "model": model,
             "topology": max_topology, "variant": variant,
             "overrides": {"model.scan_layers": True, **overrides}}


def key(row) -> str:
  return "|".join(str(row.get(k)) for k in ("part", "label", "topology", "variant"))


def run_row(row, slices: dict) -> dict:
  topo = row["topology"]
  if topo not in slices:
    slices[topo] = plan.Slice.create(topo)
  slc = slices[topo]
  chips = len(slc.devices)
  overrides = {k: (chips if v == "CHIPS" else v) for k, v in row["overrides"].items()}
  config = load(row["config"], row["model"], overrides)
  r = plan.report(config, slc, with_eval=row["part"] == "pod")
  out = dict(row, overrides=overrides, report=r,
             command=command(row["config"], row["model"], topo, overrides,
                             "--max-batch" if row["part"] == "maxbatch" else ""))
  if row["part"] == "pod":
    out["command"] = out["command"].replace(" --noeval", "")
  if row["part"] == "maxbatch":
    known = {r["per_chip_batch"]: {k: r[k] for k in (*plan.FIGURES, "compile_error")}}
    out["max_batch"] = plan.max_batch(config, slc, known=known)
  return out


def gib(n):
  return "-" if n is None else f"{n / 2 ** 30:.1f}"


def markdown(rows: list[dict]) -> str:
  by = {key(r): r for r in rows}
  lines = ["Per-chip HBM (GiB) of the train step at the recipe's global batch (per-chip batch in "
           "brackets), scanned layers; `x` = does not fit. Last columns: v5litepod-8 with "
           "unrolled layers, and its compiled / analytic FLOPs.", "",
           "| model (recipe batch) | " + " | ".join(TOPOLOGIES)
           + " | v5litepod-8 unrolled | compiled / analytic FLOPs |",
           "|---|" + "---|" * (len(TOPOLOGIES) + 2)]
  for label, cfg, model in MODELS:
    cells, ratio, batch = [], "-", "?"
    for topo in TOPOLOGIES:
      r = by.get(key({"part": "recipe", "label": label, "topology": topo}))
      if r is None:
        cells.append("?")
        continue
      rep = r["report"]
      batch = rep["global_batch"]
      mark = "" if rep["fits"] else " x"
      cells.append(f"{gib(rep['hbm_needed_bytes'])}{mark} ({rep['per_chip_batch']})")
    r = by.get(key({"part": "unrolled", "label": label, "topology": "v5litepod-8"}))
    if r is None:
      cells.append("?")
    else:
      rep = r["report"]
      cells.append(f"{gib(rep['hbm_needed_bytes'])}{'' if rep['fits'] else ' x'}")
      ratio = f"{rep['flops_ratio']:.3f}" if rep.get("flops_ratio") else "-"
    lines.append(f"| {label} ({batch}) | " + " | ".join(cells) + f" | {ratio} |")
  lines += ["", "Largest per-chip batch that fits on v5litepod-8 (16 GiB per chip), scanned "
            "layers; per-chip argument bytes (params, optimizer state and the batch) at the recipe "
            "batch; "
            "compile time (s) of the train step at the recipe batch, unrolled vs scanned (oom: "
            "refused by the HBM check, `-`: no figure for a refused compile).", "",
            "| model | plain | remat (full) | FSDP (fsdp=8) | arguments plain / FSDP (GiB) | "
            "compile unrolled / scanned (s) |", "|---|---|---|---|---|---|"]
  for label, _, _ in MODELS:
    cells, args = [], []
    for variant in VARIANTS:
      r = by.get(key({"part": "maxbatch", "label": label, "topology": "v5litepod-8",
                      "variant": variant}))
      if r is None:
        cells.append("?")
        continue
      cells.append(str(r["max_batch"]["per_chip_batch"]))
      if variant in ("plain", "fsdp"):
        args.append(r["report"]["argument_bytes"])
    unrolled = by.get(key({"part": "unrolled", "label": label, "topology": "v5litepod-8"}))
    scanned = by.get(key({"part": "recipe", "label": label, "topology": "v5litepod-8"}))
    if set(cells) == {"?"}:
      continue   # not compiled (yet)
    def seconds(r):   # a compile the HBM check refuses stops early: its time says nothing
      return "?" if r is None else ("oom" if not r["report"]["fits"]
                                    else f"{r['report']['compile_s']:.0f}")
    times = f"{seconds(unrolled)} / {seconds(scanned)}"
    arg = " / ".join("-" if a is None else f"{a / 2 ** 30:.2f}" for a in args) or "?"
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {arg} | {times} |")
  remat = [r for r in rows if r["part"] == "remat"]
  if remat:
    lines += ["", "Per-chip HBM (GiB) of the train step at the recipe batch on v5litepod-8 per "
              "remat policy (scanned layers; `x` = does not fit):", "",
              "| model (per-chip batch) | " + " | ".join(REMAT_POLICIES) + " |",
              "|---|" + "---|" * len(REMAT_POLICIES)]
    for label in dict.fromkeys(r["label"] for r in remat):
      cells = []
      for policy in REMAT_POLICIES:
        r = by.get(key({"part": "remat", "label": label, "topology": "v5litepod-8",
                        "variant": policy}))
        rep = r and r["report"]
        cells.append("?" if not rep else gib(rep["hbm_needed_bytes"]) + ("" if rep["fits"]
                                                                          else " x"))
      batch = next(r["report"]["per_chip_batch"] for r in remat if r["label"] == label)
      lines.append(f"| {label} ({batch}) | " + " | ".join(cells) + " |")
  pod = by.get(key({"part": "pod", "label": "crate_base_pod", "topology": "v4-128"}))
  if pod:
    rep = pod["report"]
    ev = rep.get("eval") or {}
    lines += ["", f"`configs/crate_base_pod.py` on v4-128 ({rep['chips']} chips, {rep['hosts']} "
              f"hosts): global batch {rep['global_batch']} = {rep['per_chip_batch']} per chip; "
              f"train step {gib(rep['hbm_needed_bytes'])} GiB of 32 GiB per chip, compiled / "
              f"analytic FLOPs {rep.get('flops_ratio')}, collectives "
              + ", ".join(f"{k} {v}" for k, v in rep["collectives"].items() if v)
              + f"; eval step {gib(ev.get('hbm_needed_bytes'))} GiB; compiled in "
              f"{rep['compile_s']:.0f} s + {ev.get('compile_s', 0):.0f} s."]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--markdown", action="store_true", help="print the tables from --out")
  ap.add_argument("--parts", default="recipe,unrolled,maxbatch,pod,remat")
  ap.add_argument("--max-batch-topology", default="v5litepod-8")
  args = ap.parse_args()
  done = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = [json.loads(line) for line in f if line.strip()]
  if args.markdown:
    print(markdown(done))
    return
  have, slices = {key(r) for r in done}, {}
  for row in rows_to_run(args.max_batch_topology):
    if row["part"] not in args.parts.split(",") or key(row) in have:
      continue
    out = run_row(row, slices)
    rep = out["report"]
    print(f"{key(row)}: {gib(rep['hbm_needed_bytes'])} GiB fits={rep['fits']} "
          f"compile {rep['compile_s']} s" + (f" max {out['max_batch']['per_chip_batch']}"
                                            if "max_batch" in out else ""), flush=True)
    with open(args.out, "a") as f:
      f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main()
