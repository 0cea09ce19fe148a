"""Device mesh and shardings: the batch over a ("data", "fsdp") mesh with Auto axes, parameters
and optimizer state over "fsdp" (fully sharded data parallelism).

FSDP rule (as big_vision's `fsdp` and MaxText's logical axes do it): a tensor with at least
`fsdp_min_size` elements is split over the "fsdp" axis along its largest dimension that the
axis size divides; smaller tensors (LayerNorm scales, biases, the class token) and tensors with
no such dimension are replicated. Optimizer moments have their parameters' shapes, hence the
same placement. With fsdp = 1 everything is replicated (plain data parallelism).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the batch is split over both axes
FSDP_AXIS = "fsdp"
FSDP_MIN_SIZE = 2 ** 14        # elements; smaller tensors are replicated


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """A 2-D ("data", "fsdp") mesh over all devices; data = -1 takes what fsdp leaves.

  Built with AxisType.Auto: jax.make_mesh's default Explicit axes reject the class-token concat
  on a batch-sharded array.
  """
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(mesh_cfg.fsdp) if mesh_cfg is not None else 1
  data = int(mesh_cfg.data) if mesh_cfg is not None else -1
  if fsdp < 1:
    raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1")
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


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one tensor under the FSDP rule (see the module docstring)."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim), FSDP_AXIS)
  return P()


def state_shardings(abstract_state, mesh: Mesh, mesh_cfg=None):
  """NamedShardings for a train state (or any pytree of arrays) under the FSDP rule."""
  fsdp = mesh.shape[FSDP_AXIS]
  min_size = FSDP_MIN_SIZE if mesh_cfg is None else int(mesh_cfg.fsdp_min_size)
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), fsdp, min_size)),
                      abstract_state)
