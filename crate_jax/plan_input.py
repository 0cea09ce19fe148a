"""What the hosts must feed the chips: the planner's input figures (`python -m crate_jax.plan
--mfu M --input-rate R`). Pure arithmetic on the compiled (or analytic) FLOPs of the train step,
the chips' bf16 peaks (crate_jax/training/flops.py) and the vCPUs of a host
(crate_jax/tpu_topology.py HOST_VCPUS); nothing here compiles.
"""
from __future__ import annotations

from crate_jax import tpu_topology


def input_figures(flops_per_chip: float, global_batch: int, hosts: int, chips: int,
                  peak_flops: float, mfu: float, vcpus_per_host: int | None,
                  input_rate: float | None = None) -> dict:
  """What the hosts must feed the chips, from the FLOPs of one train step on one chip.

  At `mfu` of the chip's peak a step takes flops_per_chip / (mfu x peak_flops) seconds (every
  chip runs its share of the global batch at the same time), so the slice consumes global_batch
  images per step time: that over the hosts per host, that over vcpus_per_host per vCPU. With
  input_rate (images/s one vCPU supplies) a host supplies input_rate x vcpus_per_host: input-bound
  when that is less than it must feed; then `input_ratio` (needed / supplied) > 1, the chips wait
  and reach at most mfu / input_ratio, or the host would need `vcpus_needed` vCPUs. Assumes every
  vCPU runs the input pipeline (the training loop itself needs a few: leave headroom).
  """
  step_s = flops_per_chip / (mfu * peak_flops)
  per_s = global_batch / step_s
  per_host = per_s / hosts
  out = {"mfu": mfu, "peak_flops_per_chip": peak_flops, "flops_per_chip": flops_per_chip,
         "step_s": step_s, "images_per_s": per_s, "images_per_s_per_chip": per_s / chips,
         "images_per_s_per_host": per_host, "vcpus_per_host": vcpus_per_host,
         "images_per_s_per_vcpu": per_host / vcpus_per_host if vcpus_per_host else None,
         "input_rate_per_vcpu": input_rate, "host_supply_images_per_s": None,
         "input_bound": None, "input_ratio": None, "mfu_input_allows": None,
         "vcpus_needed": None}
  if input_rate:
    out["vcpus_needed"] = per_host / input_rate
    if vcpus_per_host:
      supply = input_rate * vcpus_per_host
      out.update(host_supply_images_per_s=supply, input_bound=per_host > supply,
                 input_ratio=per_host / supply, mfu_input_allows=mfu * min(1.0, supply / per_host))
  return out


def input_report(r: dict, slc, scanned: bool, mfu: float,
                 input_rate: float | None) -> dict | None:
  """input_figures for a report: the compiled train FLOPs per chip (the analytic count for a
  scanned stack, whose compiled FLOPs are one layer's); None without either, or without the
  chip's peak (training/flops.py PEAK_FLOPS)."""
  flops, source = r.get("flops_per_chip"), "compiled"
  if scanned or not flops:
    flops, source = r.get("analytic_flops_per_chip"), "analytic"
  if not flops:
    return None
  gen, chips = slc.topology.generation, len(slc.devices)
  vcpus = tpu_topology.host_vcpus(gen, chips // slc.hosts)
  from crate_jax.training import flops as flops_lib
  peak = flops_lib.peak_flops_of_kind(slc.chip_kind)
  if not peak:
    return None
  out = input_figures(flops, r["global_batch"], slc.hosts, chips, peak, mfu, vcpus, input_rate)
  out["flops_source"] = source
  return out


def format_input(f: dict, hosts: int) -> list[str]:
  """The input lines of the report: what the chips consume, what a vCPU must supply, verdict."""
  per = "host" if hosts == 1 else f"host (of {hosts})"
  vcpu = (f"{f['images_per_s_per_vcpu']:,.0f} img/s per vCPU of the host's "
          f"{f['vcpus_per_host']}" if f["vcpus_per_host"] else
          "vCPUs per host not known for this host shape")
  lines = [f"input at {100 * f['mfu']:.0f}% MFU ({f['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s "
           f"bf16 peak, {f['flops_source']} FLOPs): a step takes {1e3 * f['step_s']:.3g} ms, "
           f"the chips consume {f['images_per_s']:,.0f} img/s = {f['images_per_s_per_host']:,.0f} "
           f"per {per} = {vcpu}"]
  rate = f["input_rate_per_vcpu"]
  if rate and f["input_bound"] is None:
    lines.append(f"  at {rate:,.0f} img/s per vCPU a host needs {f['vcpus_needed']:,.0f} vCPUs")
  elif rate and f["input_bound"]:
    lines.append(f"  INPUT-BOUND at {rate:,.0f} img/s per vCPU: a host supplies "
                 f"{f['host_supply_images_per_s']:,.0f} img/s, {f['input_ratio']:.3g}x short "
                 f"(the chips reach at most {100 * f['mfu_input_allows']:.2g}% MFU; it would need "
                 f"{f['vcpus_needed']:,.0f} vCPUs)")
  elif rate:
    lines.append(f"  keeps up at {rate:,.0f} img/s per vCPU: a host supplies "
                 f"{f['host_supply_images_per_s']:,.0f} img/s, {1 / f['input_ratio']:.3g}x what "
                 f"the chips consume ({f['vcpus_needed']:,.0f} of {f['vcpus_per_host']} vCPUs "
                 "busy)")
  return lines
