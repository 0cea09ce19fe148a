"""Device mesh and shardings: data parallelism over a ("data", "fsdp") mesh with Auto axes."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the batch is split over both axes; params are replicated today


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """A 2-D ("data", "fsdp") mesh over all devices; data = -1 takes what fsdp leaves.

  Built with AxisType.Auto: jax.make_mesh's default Explicit axes reject the class-token concat
  on a batch-sharded array.
  """
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(getattr(mesh_cfg, "fsdp", 1) or 1) if mesh_cfg is not None else 1
  data = int(getattr(mesh_cfg, "data", -1)) if mesh_cfg is not None else -1
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"config.mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
