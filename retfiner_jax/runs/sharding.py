"""The device mesh and how arrays are laid out on it (the one place that touches `jax.sharding`).

Mesh axes: `data` (batch) and `fsdp` (batch too, and parameters/optimizer state split along their largest
divisible dimension). Batches are sharded over both axes on their first dimension.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from retfiner_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None):
  devices = devices if devices is not None else jax.devices()
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"config.mesh.fsdp={fsdp} must divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} must be the {n} devices (data=-1: all "
                      f"that fsdp leaves)")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh) -> int:
  """How many blocks of rows a batch is split into (batch_sharding): one per device."""
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def traced_on(mesh, fn):
  """`fn`, traced with `mesh` as the ambient (abstract) mesh, so that code inside it which has no mesh of its own
  can lay out what it computes as the run lays out its batches (models/attention.py fused_attention)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def replicated(mesh):
  return NamedSharding(mesh, P())


def param_sharding(mesh, shape, layer_axis: bool = False) -> NamedSharding:
  """FSDP: split the largest dimension divisible by the fsdp axis; small or indivisible arrays replicate.
  `layer_axis`: dimension 0 stacks scanned layers and is never split (the scan walks along it)."""
  size = mesh.shape["fsdp"]
  if size == 1 or not shape or int(np.prod(shape)) < 1024:
    return replicated(mesh)
  for dim in sorted(range(int(layer_axis), len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(mesh, abstract_tree, layer_stacks: tuple[str, ...] = ()):
  """Per-leaf FSDP shardings; leaves under a key named in `layer_stacks` (the model's scanned layer stacks, e.g.
  models/retfiner.py's SCANNED_STACKS) keep their leading layer axis whole."""
  def leaf(path, x):
    stacked = any(getattr(k, "key", None) in layer_stacks for k in path)
    return param_sharding(mesh, x.shape, layer_axis=stacked)
  return jax.tree.map_with_path(leaf, abstract_tree)


def global_batch(mesh, local_batch: dict) -> dict:
  """This process's rows -> global arrays sharded over the batch axes (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree):
  """Device arrays -> numpy with their global values on every host (an all-gather across processes when there
  are several; a plain transfer otherwise)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
