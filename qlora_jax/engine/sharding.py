"""Device mesh and shardings: batch over (data, fsdp), weights over fsdp.

The mesh has two axes: `data` (replicas of the weights) and `fsdp` (shards
of the weights). Every leaf of the frozen base (packed codes and scales
included), of the trainable tree and of the optimizer state is split over
`fsdp` along its largest axis that the axis size divides, and replicated
otherwise; the batch is split over both axes (each device sees its own
rows). One device is the 1 x 1 mesh.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence | None = None):
  """A (data, fsdp) mesh over `devices` (default: all); -1 fills the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp == -1 and data == -1:
    raise ValueError("mesh: only one of mesh.data and mesh.fsdp may be -1")
  if fsdp == -1:
    fsdp = n // max(1, data)
  if data == -1:
    data = n // max(1, fsdp)
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ValueError(
      f"mesh: data={data} x fsdp={fsdp} does not cover the {n} devices"
    )
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, (DATA, FSDP))


def leaf_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
  """Shard the largest axis divisible by the fsdp size; else replicate."""
  if fsdp_size == 1 or not shape:
    return PartitionSpec()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for axis in order:
    if shape[axis] % fsdp_size == 0 and shape[axis] >= fsdp_size:
      spec = [None] * len(shape)
      spec[axis] = FSDP
      return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(mesh: Mesh, tree):
  """A NamedSharding for every array leaf of `tree` (abstract or concrete)."""
  fsdp_size = mesh.shape[FSDP]
  return jax.tree.map(
    lambda leaf: NamedSharding(mesh, leaf_spec(np.shape(leaf), fsdp_size)),
    tree,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every device."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def put_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Global arrays from this process's rows of a batch (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def put_tree(mesh: Mesh, tree):
  """Places a host tree onto the mesh with `tree_shardings`."""
  return jax.device_put(tree, tree_shardings(mesh, tree))
