"""The original probe's training augmentation, on device: jitted, batched, drawn from a JAX key.

It acts where the original's transforms act (`linear_probing/src/utils/dataset.py`): on the resized one-channel
image as a float in [0, 1] (after `ToTensor`), before it is repeated to three channels and normalised:
  1. horizontal flip with probability 0.5;
  2. intensity: a non-black image is multiplied by U(0.8, 1.2) and clamped to [0, 1];
  3. with probability 0.9, torchvision's RandomAffine(degrees 10, translate 0.1, scale 0.9-1.1, shear 5, bilinear,
     fill 0): rotation U(-10, 10) degrees, translation round(U(-0.1 W, 0.1 W)) (and H) pixels, scale U(0.9, 1.1),
     x-shear U(-5, 5) degrees; the image is resampled as torchvision's `F.affine` does on tensors (inverse
     matrix about the image centre, `grid_sample` bilinear with zero padding, blended with the fill by the
     resampled coverage mask).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FLIP_P = 0.5
INTENSITY = (0.8, 1.2)
AFFINE_P = 0.9
DEGREES = 10.0
TRANSLATE = 0.1
SCALE = (0.9, 1.1)
SHEAR = 5.0


def sample_params(key, batch: int, height: int, width: int) -> dict:
  """Per-image augmentation parameters (each (batch,))."""
  keys = jax.random.split(key, 8)
  u = lambda k, lo, hi: jax.random.uniform(k, (batch,), jnp.float32, lo, hi)
  return {"flip": jax.random.bernoulli(keys[0], FLIP_P, (batch,)),
          "intensity": u(keys[1], *INTENSITY),
          "affine": jax.random.bernoulli(keys[2], AFFINE_P, (batch,)),
          "angle": u(keys[3], -DEGREES, DEGREES),
          "tx": jnp.round(u(keys[4], -TRANSLATE * width, TRANSLATE * width)),
          "ty": jnp.round(u(keys[5], -TRANSLATE * height, TRANSLATE * height)),
          "scale": u(keys[6], *SCALE),
          "shear": u(keys[7], -SHEAR, SHEAR)}


def inverse_affine(angle, tx, ty, scale, shear):
  """torchvision's `_get_inverse_affine_matrix` about the centre (x-shear only): the 2x3 matrix taking an
  output pixel's centred coordinates to the input's. Angles in degrees."""
  rot, sx = jnp.deg2rad(angle), jnp.deg2rad(shear)
  a, c = jnp.cos(rot), jnp.sin(rot)
  b = -jnp.cos(rot) * jnp.tan(sx) - jnp.sin(rot)
  d = -jnp.sin(rot) * jnp.tan(sx) + jnp.cos(rot)
  m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
  return jnp.stack([m0, m1, m0 * -tx + m1 * -ty, m3, m4, m3 * -tx + m4 * -ty])


def _coverage(coord, size):
  """The weight bilinear sampling with zero padding gives to in-image pixels along one axis: 1 inside, falling
  linearly to 0 over the pixel beyond each edge (what sampling an all-ones image returns)."""
  return jnp.clip(jnp.minimum(coord + 1.0, size - coord), 0.0, 1.0)


def affine(image, matrix, fill: float = 0.0):
  """One (H, W) image through the inverse matrix, as torchvision's tensor `affine` with a fill value: bilinear
  `grid_sample` (align_corners=False, zero padding), blended with the fill by the resampled coverage."""
  height, width = image.shape
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - height / 2 + 0.5,
                        jnp.arange(width, dtype=jnp.float32) - width / 2 + 0.5, indexing="ij")
  x_in = matrix[0] * xs + matrix[1] * ys + matrix[2] + width / 2 - 0.5
  y_in = matrix[3] * xs + matrix[4] * ys + matrix[5] + height / 2 - 0.5
  sampled = jax.scipy.ndimage.map_coordinates(image, [y_in, x_in], order=1, mode="constant", cval=0.0)
  coverage = _coverage(x_in, width) * _coverage(y_in, height)
  return sampled * coverage + (1.0 - coverage) * fill


def augment_one(image, p: dict, fill: float = 0.0):
  image = jnp.where(p["flip"], image[:, ::-1], image)
  ceiling = jnp.where(image.max() <= 1, 1.0, jnp.where(image.max() <= 255, 255.0, 65535.0))
  image = jnp.where(image.max() > 0, jnp.clip(image * p["intensity"], 0.0, ceiling), image)
  moved = affine(image, inverse_affine(p["angle"], p["tx"], p["ty"], p["scale"], p["shear"]), fill)
  return jnp.where(p["affine"], moved, image)


def augment(key, images, fill: float = 0.0):
  """(B, H, W) floats in [0, 1] -> the same, each image augmented with its own parameters."""
  params = sample_params(key, images.shape[0], images.shape[1], images.shape[2])
  return jax.vmap(lambda im, p: augment_one(im, p, fill))(images, params)
