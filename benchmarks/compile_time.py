"""Compile time and memory of the real train step, unrolled vs scanned layers, per remat policy.

  python benchmarks/compile_time.py --models crate_large crate_alpha_l14 --batch 8
  python benchmarks/compile_time.py --models crate_base --remat none full dots_saveable

For each model x layout (unrolled / scan) x remat policy, builds the train step exactly as
crate_jax.train does (training.program.build: Lion, bf16 compute, donation) for this host's
devices, lowers it on abstract inputs and compiles it, and prints the lowering and compile
seconds and XLA's memory analysis per device (arguments, temporaries = activations + workspace).
CPU figures by default; on an accelerator host the same script measures that backend. Compile
times depend on the machine: compare rows measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from crate_jax import config_lib, models, setups  # noqa: E402
from crate_jax.training import program, sharding  # noqa: E402


def measure(name: str, scan: bool, remat: str, batch: int, image_size: int) -> dict:
  config = config_lib.base_config(model=name)
  config.data.image_size = image_size
  config.model.scan_layers = scan
  config.remat = remat
  config.batch_size = batch
  setups.validate(config)
  model = models.from_config(config)
  mesh = sharding.make_mesh(config.mesh)
  prog = program.build(config, model, mesh, total_steps=1000, steps_per_epoch=100)
  batch_spec = prog.abstract_batch(config, batch, train=True)
  t0 = time.perf_counter()
  lowered = prog.train_step.lower(prog.abstract_state, batch_spec)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  gib = lambda b: round(b / 2 ** 30, 3)
  return {"model": name, "layers": "scan" if scan else "unrolled", "remat": remat,
          "batch": batch, "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
          "argument_gib": gib(mem.argument_size_in_bytes), "temp_gib": gib(mem.temp_size_in_bytes),
          "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["crate_large", "crate_alpha_l14"])
  parser.add_argument("--layouts", nargs="+", default=["unrolled", "scan"],
                      choices=["unrolled", "scan"])
  parser.add_argument("--remat", nargs="+", default=["none"])
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  args = parser.parse_args(argv)
  rows = []
  print(f"{'model':18s} {'layers':8s} {'remat':32s} {'lower s':>8s} {'compile s':>10s} "
        f"{'args GiB':>9s} {'temp GiB':>9s}")
  for name in args.models:
    for layout in args.layouts:
      for remat in args.remat:
        r = measure(name, layout == "scan", remat, args.batch, args.image_size)
        rows.append(r)
        print(f"{name:18s} {r['layers']:8s} {remat:32s} {r['lower_s']:8.1f} {r['compile_s']:10.1f} "
              f"{r['argument_gib']:9.3f} {r['temp_gib']:9.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
