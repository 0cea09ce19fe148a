"""Cloud TPU slices as compile-only jax devices: libtpu's topology API, no TPU needed.

  resolve("v4-128")      -> Topology("v4", (4, 4, 4)): Cloud TPU name, N = TensorCores
  resolve("v5litepod-8") -> Topology("v5e", (2, 4)):   v5e / v6e names count chips
  resolve("v5e:2x2")     -> jax's own GEN:SHAPE form, as given
  devices(topology)      -> the slice's devices (one per chip), to lower and compile against
  host_layout(topology)  -> (hosts, chips per host), without libtpu
  host_vcpus("v5e", 8)   -> a host's vCPUs (HOST_VCPUS; a chip's peak: training/flops.py)
  gke("v4-32")           -> what a GKE TPU workload needs (node labels, hosts, chips per host);
                            `python crate_jax/tpu_topology.py gke v4-32` prints it for
                            launch/gke/jobset.sh (stdlib only, so any python3 runs it)

The host layout follows Cloud TPU VMs: v5e / v6e slices of up to 8 chips are one host, larger
ones (and every v4 / v5p slice from 4 chips on) have 4 chips (2x2x1) per host, libtpu's default.
v4 runs in megacore mode (one device = one chip = two TensorCores), as on Cloud TPU; v5p is
megacore by default. Needs the libtpu wheel (`pip install -e ".[tpu]"`); JAX_PLATFORMS=cpu.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys

GIB = 2 ** 30
# HBM per chip (one jax device), keyed by jax.Device.device_kind.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB,
             "TPU v6 lite": 32 * GIB}
# Generation: (spellings accepted, TensorCores per chip in Cloud names, dims, chips on one host)
GENERATIONS = {
    "v4": (("v4",), 2, 3, 4),
    "v5p": (("v5p",), 2, 3, 4),
    "v5e": (("v5e", "v5litepod", "v5lite"), 1, 2, 8),
    "v6e": (("v6e",), 1, 2, 8),
}
# Per generation, for the planner's input figures: the vCPUs of one host (TPU VM / GKE TPU node)
# by the chips it holds (the chips' bf16 peaks: crate_jax/training/flops.py PEAK_FLOPS). Sources:
# the machine types on the Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e) and GKE's "Plan TPUs in GKE"
# (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus):
#   v4   ct4p-hightpu-4t: 4 chips, 240 vCPUs, 407 GB RAM
#   v5e  ct5lp-hightpu-1t / -4t / -8t: 1 / 4 / 8 chips, 24 / 112 / 224 vCPUs (48 / 192 / 384 GB);
#        slices of 16+ chips are 4-chip hosts
#   v5p  ct5p-hightpu-4t: 4 chips, 208 vCPUs, 448 GB RAM
#   v6e  ct6e-standard-1t / -4t / -8t: 1 / 4 / 8 chips, 44 / 180 / 180 vCPUs (448 / 720 / 1440 GB);
#        slices of 16+ chips are 4-chip hosts
# The v5e and v6e host figures were checked against those pages when this table was written; the
# v4 (240) and v5p (208) vCPU counts are quoted from the same docs from memory, not re-checked.
# A host shape not listed (e.g. a 2-chip v5e:1x2) has no vCPU figure (None).
HOST_VCPUS = {"v4": {4: 240}, "v5p": {4: 208}, "v5e": {1: 24, 4: 112, 8: 224},
              "v6e": {1: 44, 4: 180, 8: 180}}
# Chips of the Cloud TPU slice sizes (per generation family: 3-D tori, 2-D meshes).
CLOUD_CHIPS_3D = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CLOUD_CHIPS_2D = (1, 4, 8, 16, 32, 64, 128, 256)
ACCEPTED = ("Cloud TPU names v4-N and v5p-N (N counts TensorCores: v4-8 = 4 chips, v4-128 = 64 "
            "chips), v5litepod-N (or v5e-N) and v6e-N (N counts chips: v5litepod-16 = 16 chips); "
            "or jax's GEN:SHAPE (v5e:2x2, v6e:2x4, v4:2x2x1, v4:4x4x4, v5p:2x2x1)")
# GKE's node label cloud.google.com/gke-tpu-accelerator of each generation's TPU slice node pools,
# and the Cloud TPU name prefix that xpk's --tpu-type takes.
GKE_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                    "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}
CLOUD_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
GKE_ACCEPTED = ("v4-N and v5p-N (N counts TensorCores: v4-32 = 16 chips), v5litepod-N (or v5e-N) "
                "and v6e-N (N counts chips: v5litepod-16 = 16 chips)")
INSTALL = 'the TPU compiler (libtpu) is not installed; install it with: pip install -e ".[tpu]"'


class TopologyError(ValueError):
  """An unknown or invalid TPU topology name."""


class LibtpuMissingError(ImportError):
  """The libtpu wheel is not installed."""


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str       # "v4" | "v5p" | "v5e" | "v6e"
  shape: tuple          # chips along each axis
  name: str = ""        # as the user wrote it

  @property
  def chips(self) -> int:
    return _prod(self.shape)

  @property
  def jax_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"


def _generation(word: str) -> str | None:
  for gen, (spellings, *_) in GENERATIONS.items():
    if word.lower() in spellings:
      return gen
  return None


def cloud_shape(generation: str, chips: int) -> tuple:
  """The slice shape of a Cloud TPU size: start from the smallest slice and double the
  smallest axis (the last of equal ones): v4 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...;
  v5e 1x1, (1x2), 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
  dims = GENERATIONS[generation][2]
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while _prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def _prod(shape) -> int:
  n = 1
  for s in shape:
    n *= s
  return n


def resolve(name: str) -> Topology:
  """A topology name in either accepted form (see ACCEPTED) -> Topology; TopologyError if not."""
  text = name.strip()
  m = re.fullmatch(r"([a-zA-Z0-9]+)-(\d+)", text)
  if m:
    return _cloud(name, m.group(1), int(m.group(2)))
  m = re.fullmatch(r"([a-zA-Z0-9]+):(\d+(?:x\d+)*)", text)
  gen = m and _generation(m.group(1))
  if gen:
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != GENERATIONS[gen][2] or min(shape) < 1:
      raise TopologyError(f"TPU topology {name!r}: {gen} needs {GENERATIONS[gen][2]} "
                          f"dimensions; accepted: {ACCEPTED}")
    return Topology(gen, shape, name)
  raise TopologyError(f"unknown TPU topology {name!r}; accepted: {ACCEPTED}")


def _cloud(name: str, word: str, count: int) -> Topology:
  gen = _generation(word)
  if gen is None:
    raise TopologyError(f"unknown TPU topology {name!r}; accepted: {ACCEPTED}")
  cores = GENERATIONS[gen][1]
  sizes = CLOUD_CHIPS_3D if GENERATIONS[gen][2] == 3 else CLOUD_CHIPS_2D
  if count % cores or count // cores not in sizes:
    valid = ", ".join(f"{word}-{c * cores}" for c in sizes)
    raise TopologyError(f"TPU topology {name!r} is not a Cloud TPU slice size ({valid}); "
                        f"other shapes in jax's form, e.g. {gen}:"
                        f"{'x'.join(map(str, cloud_shape(gen, 8)))}")
  return Topology(gen, cloud_shape(gen, count // cores), name)


def create_options(topology: Topology) -> dict:
  """libtpu's topology options: megacore for v4; one host for the small single-host slices."""
  options = {}
  if topology.generation == "v4":
    options["chip_config_name"] = "megacore"
  if topology.chips <= GENERATIONS[topology.generation][3]:
    options["chips_per_host_bounds"] = list(topology.shape) + [1] * (3 - len(topology.shape))
  return options


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def devices(topology: Topology, quiet: bool = True) -> list:
  """Compile-only devices of the slice (one per chip); libtpu's start-up chatter hidden."""
  if not libtpu_installed():
    raise LibtpuMissingError(INSTALL)
  # Compile only: do not take /tmp/libtpu_lockfile, which a process using a real TPU holds.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax
  from jax.experimental import topologies
  try:
    with _stderr_hidden(quiet):
      desc = topologies.get_topology_desc(topology_name=topology.jax_name, platform="tpu",
                                          **create_options(topology))
  except jax.errors.JaxRuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"libtpu rejects TPU topology {topology.name or topology.jax_name!r} "
                        f"({first}); accepted: {ACCEPTED}") from None
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise LibtpuMissingError(INSTALL) from None
    raise
  return list(desc.devices)


def host_layout(topology: Topology) -> tuple:
  """(hosts, chips per host), as Cloud TPU VMs and GKE TPU nodes have them: a slice of up to
  GENERATIONS' one-host chip count is one host, a larger one has 4 chips per host."""
  if topology.chips <= GENERATIONS[topology.generation][3]:
    return 1, topology.chips
  return topology.chips // 4, 4


def gke(name: str) -> dict:
  """A Cloud TPU slice name (v4-32, v5litepod-16, ...) -> what a GKE TPU workload needs:
  the node labels gke-tpu-accelerator and gke-tpu-topology, the host count (pods) and the chips
  per host (google.com/tpu per pod); TopologyError for anything else."""
  if not re.fullmatch(r"[a-zA-Z0-9]+-\d+", name.strip()):
    raise TopologyError(f"GKE needs a Cloud TPU slice name, not {name!r}; accepted: {GKE_ACCEPTED}")
  try:
    t = resolve(name)
  except TopologyError as e:  # resolve's message without its jax GEN:SHAPE advice
    first = str(e).split("; other shapes")[0].split("; accepted")[0]
    raise TopologyError(f"{first}; accepted on GKE: {GKE_ACCEPTED}") from None
  hosts_, per_host = host_layout(t)
  cores = t.chips * GENERATIONS[t.generation][1]
  return {"accelerator_type": f"{CLOUD_PREFIX[t.generation]}-{cores}",
          "gke_accelerator": GKE_ACCELERATORS[t.generation],
          "gke_topology": "x".join(map(str, t.shape)),
          "chips": t.chips, "hosts": hosts_, "chips_per_host": per_host}


def host_vcpus(generation: str, chips_per_host: int) -> int | None:
  """vCPUs of a TPU host holding `chips_per_host` chips of the generation (HOST_VCPUS); None if
  not known."""
  return HOST_VCPUS[generation].get(chips_per_host)


def hosts(devs) -> int:
  return len({d.process_index for d in devs})


def hbm_bytes(device_kind: str) -> int | None:
  return HBM_BYTES.get(device_kind)


@contextlib.contextmanager
def _stderr_hidden(quiet: bool):
  """File descriptor 2 -> /dev/null for the block (libtpu's C++ logging); Python errors raise."""
  if not quiet:
    yield
    return
  import sys
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def main(argv=None) -> int:
  """`gke NAME`: gke(NAME) as KEY=VALUE lines; bad input: one `error:` line, exit status 2."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2 or argv[0] != "gke":
    print("usage: python crate_jax/tpu_topology.py gke ACCELERATOR_TYPE", file=sys.stderr)
    return 2
  try:
    info = gke(argv[1])
  except TopologyError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for key, value in info.items():
    print(f"{key}={value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
