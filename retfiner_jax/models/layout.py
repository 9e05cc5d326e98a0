"""Where the models' activations lie on a mesh: the one layout rule the layers state themselves."""
from __future__ import annotations

import jax


def rows_over_devices(x):
  """`x` laid out as a run lays out its batches: its first axis split over every device of the ambient mesh (a
  run's jitted functions trace with the run's mesh as the ambient one: runs/sharding.py traced_on); unchanged
  outside a mesh. Placed where rows meet (each layer's input, the cross-attention's per-image regrouping), it
  keeps XLA's sharding propagation from choosing another split: on 8 TPU chips it ran the ViT on 2-way split
  images, each chip computing four chips' share (the AOT tool's v5e:2x4 program, batch 32), and on 8 GPUs it
  handed cuDNN attention's partitioner a layout the mesh cannot express."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
