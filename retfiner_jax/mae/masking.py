"""MAE's random patch masking, kept apart from the reconstruction loss (models/mae.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_patch_masks(rng, batch: int, patches: int, mask_ratio: float):
  """MAE's random masking: each row keeps `patches * (1 - mask_ratio)` (rounded down) patches, chosen uniformly
  without replacement (the lowest of uniform noise values). Returns (visible (B, K) patch indices in the order
  of their noise, restore (B, N): where each patch sits in [visible, masked] order, mask (B, N): 1 = masked)."""
  keep = int(patches * (1 - mask_ratio))
  if keep < 1:
    raise ValueError(f"mask ratio {mask_ratio} leaves no visible patch of {patches}")
  shuffle = jnp.argsort(jax.random.uniform(rng, (batch, patches)), axis=-1)
  restore = jnp.argsort(shuffle, axis=-1)
  mask = (restore >= keep).astype(jnp.float32)
  return shuffle[:, :keep], restore, mask
