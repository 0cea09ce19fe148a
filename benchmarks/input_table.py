"""README's input table: the images/s per host vCPU that each model's train step needs on one
host of each TPU generation, against what one core of this machine's input pipeline supplies.

  python benchmarks/input_table.py --rates workdirs/input.json   # rates from input_pipeline.py
  python benchmarks/input_table.py --rate plain=300 --rate randaug_mix=180 --mfu 0.4

The chip side is arithmetic, as in `python -m crate_jax.plan` (crate_jax/plan_input.py
input_figures): a step at --mfu of the chip's bf16 peak (training/flops.py) over the task's
analytic train FLOPs per image (3x the forward; the planner's compiled count agrees to a few %
for unscanned stacks); vCPUs per host from crate_jax/tpu_topology.py. Nothing compiles and no
TPU is involved: a compile-time estimate, not a measurement. A cell reads "needed (verdict)":
"ok" when the measured per-core rate of every recipe given covers it, else the recipes short.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crate_jax import models, tpu_topology  # noqa: E402
from crate_jax.plan_input import input_figures  # noqa: E402
from crate_jax.training import flops  # noqa: E402

MODELS = ("crate_tiny", "crate_small", "crate_base", "crate_large", "crate_alpha_b16")
# (name, generation, chips on the host, device kind for the peak): one-host slices.
SLICES = (("v4-8", "v4", 4, "TPU v4"), ("v5e-8", "v5e", 8, "TPU v5 lite"),
          ("v5p-8", "v5p", 4, "TPU v5p"), ("v6e-8", "v6e", 8, "TPU v6 lite"))


def needed_per_vcpu(per_image: float, generation: str, chips: int, kind: str,
                    mfu: float) -> float:
  """Images/s one host vCPU must supply for the chips to run at `mfu`, each chip training on
  images of `per_image` train FLOPs."""
  f = input_figures(per_image, chips, 1, chips, flops.peak_flops_of_kind(kind), mfu,
                    tpu_topology.host_vcpus(generation, chips))
  return f["images_per_s_per_vcpu"]


def table(rates: dict[str, float], mfu: float) -> str:
  head = ["model", "train GFLOP/img"] + [s[0] for s in SLICES]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in MODELS:
    per_image = flops.train_flops_per_example(models.get(name, num_classes=1000))
    cells = [name, f"{per_image / 1e9:.1f}"]
    for _, gen, chips, kind in SLICES:
      need = needed_per_vcpu(per_image, gen, chips, kind, mfu)
      short = [r for r, v in rates.items() if v < need]
      verdict = "" if not rates else (" ok" if not short else " short: " + ", ".join(short))
      cells.append(f"{need:,.0f}{verdict}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def rates_from(path: str) -> dict[str, float]:
  """{case: crate_jax img/s per core} from an input_pipeline.py --out file."""
  with open(path) as f:
    rows = json.load(f)["rows"]
  return {r["case"]: r["crate_jax"]["img_s_per_core"] for r in rows
          if r["case"] in ("plain", "randaug_mix")}   # the classification recipes


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--rates", default=None, help="input_pipeline.py --out JSON")
  parser.add_argument("--rate", action="append", default=[], metavar="RECIPE=IMG_S",
                      help="a per-core rate by hand (repeatable)")
  args = parser.parse_args(argv)
  try:
    rates = rates_from(args.rates) if args.rates else {}
  except (OSError, ValueError, KeyError) as e:
    parser.error(f"--rates {args.rates}: not an input_pipeline.py --out file ({e})")
  for item in args.rate:
    recipe, _, value = item.partition("=")
    try:
      rates[recipe] = float(value)
    except ValueError:
      parser.error(f"--rate {item!r}: give RECIPE=IMG_S, e.g. plain=300")
  note = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
  out = (f"img/s per host vCPU needed at {100 * args.mfu:.0f}% MFU (one-host slices)"
         + (f"; measured per core: {note}" if note else "") + "\n" + table(rates, args.mfu))
  print(out)
  return out


if __name__ == "__main__":
  main()
