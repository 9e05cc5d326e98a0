"""Frozen-encoder features: extracted once, batched and sharded over the devices, cached on disk.

The cache key covers the encoder's weights (file identity), the dataset's files and the preprocessing
(image size, normalisation, representation), so changing any of them recomputes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.vit import VisionTransformer
from retfiner_jax.runs import sharding, whole_files

REPRESENTATIONS = ("concat", "cls", "mean")


def representation(tokens, kind: str = "concat"):
  """Last block output before any final norm (B, 1+N, D) -> (B, F).

  concat (the paper's): [mean of patch tokens, class token] -> LayerNorm without affine; cls; mean.
  RETFound's `proj` is not involved (features come before it)."""
  tokens = tokens.astype(jnp.float32)
  if kind == "cls":
    return tokens[:, 0]
  if kind == "mean":
    return tokens[:, 1:].mean(axis=1)
  if kind != "concat":
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")
  x = jnp.concatenate([tokens[:, 1:].mean(axis=1), tokens[:, 0]], axis=-1)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6)


def make_feature_fn(cfg: ModelConfig, kind: str = "concat", mesh=None):
  vit = VisionTransformer(cfg.replace(dtype="float32"))
  fn = lambda params, images: representation(vit.apply({"params": params}, images,
                                                        method=VisionTransformer.features), kind)
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def extract_features(cfg: ModelConfig, vision_params, images: np.ndarray, kind="concat", batch=64,
                     mesh=None) -> np.ndarray:
  """Features of every image; batches are padded to one compiled shape (a multiple of the device count)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  batch = -(-batch // mesh.size) * mesh.size
  fn = make_feature_fn(cfg, kind, mesh)
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    real = len(chunk)
    if real < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(vision_params, chunk))[:real])
  return np.concatenate(out)


def cache_key(encoder_id: str, files, cfg: ModelConfig, kind: str) -> str:
  h = hashlib.sha256()
  h.update(encoder_id.encode())
  h.update(json.dumps({"image_size": cfg.image_size, "backbone": cfg.backbone, "representation": kind,
                       "vision": [cfg.vision_dim, cfg.vision_depth, cfg.vision_heads], "version": 1}).encode())
  for path in files:
    if hasattr(path, "identity"):  # An image of a built dataset (data/tfds_builders.py).
      h.update(path.identity().encode())
      continue
    stat = os.stat(path)
    h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return h.hexdigest()[:24]


def file_identity(path) -> str:
  """Path, size and modification time of a weights file or of every file in a weights folder."""
  path = Path(path)
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  return "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cached_features(cache_dir, key: str, compute):
  """Loads features saved under `key`, or computes and saves them (atomically)."""
  cache_dir = Path(cache_dir)
  path = cache_dir / f"{key}.npz"
  if path.exists():
    with np.load(path) as z:
      return {k: z[k] for k in z.files}, True
  out = compute()
  cache_dir.mkdir(parents=True, exist_ok=True)

  def write(partial):  # Through a file: np.savez would add ".npz" to the partial name.
    with partial.open("wb") as f:
      np.savez(f, **out)
  whole_files.make_whole(path, write)
  return out, False
