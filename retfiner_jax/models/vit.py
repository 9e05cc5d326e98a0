"""Vision Transformer with the timm/MAE structure used by RETFound, VisionFM and UrFound.

Parameter names follow the PyTorch checkpoints (`patch_embed`, `blocks_N/{norm1,attn/qkv,attn/proj,norm2,
mlp/fc1,mlp/fc2}`, `norm`, `proj`) so conversion is a mechanical rename. Images are NHWC float.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retfiner_jax.models.attention import attention
from retfiner_jax.models.config import ModelConfig

VIT_LN_EPS = 1e-6


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def layer_norm(eps, name=None):
  """LayerNorm kept in float32 in every precision mode."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


def maybe_remat(module_cls, policy: str):
  """The module class, rematerialised in the backward pass by the named policy."""
  if policy == "none":
    return module_cls
  policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}
  return nn.remat(module_cls, policy=policies[policy])


def gelu(x):
  """Exact GELU written as PyTorch writes it, x/2 (1 + erf(x/sqrt 2)): XLA's erf is one polynomial that fuses
  into a single loop (its erfc, which jax.nn.gelu uses, costs three passes over the array on CPU)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class FusedQKVAttention(nn.Module):
  dim: int
  heads: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, length, _ = x.shape
    qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(batch, length, 3, self.heads, self.dim // self.heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out.reshape(batch, length, self.dim))


class Mlp(nn.Module):
  hidden: int
  dim: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(self.dim, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    x = x + FusedQKVAttention(cfg.vision_dim, cfg.vision_heads, dtype, name="attn")(
        layer_norm(VIT_LN_EPS, "norm1")(x).astype(dtype))
    x = x + Mlp(cfg.vision_mlp_dim, cfg.vision_dim, dtype, name="mlp")(
        layer_norm(VIT_LN_EPS, "norm2")(x).astype(dtype))
    return x


class VisionTransformer(nn.Module):
  """Returns all tokens, class token first.

  `features` gives the last block's output (before any final norm): the linear probe's input.
  `__call__` gives the tokens the text encoder attends to: final norm if the backbone applies it, then the
  projection to the text width if configured. The `norm` parameters always exist (so an export carries
  them), even where the backbone's RetFiner path does not apply them.
  """
  cfg: ModelConfig

  def setup(self):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    self.patch_embed = nn.Conv(cfg.vision_dim, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                               padding="VALID", dtype=dtype)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.vision_dim))
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, 1 + cfg.grid_size ** 2, cfg.vision_dim))
    block = maybe_remat(Block, cfg.remat)
    self.blocks = [block(cfg) for _ in range(cfg.vision_depth)]
    self.norm = layer_norm(VIT_LN_EPS)
    if cfg.vision_projection:
      self.proj = nn.Dense(cfg.text_dim, dtype=dtype)

  def features(self, images):
    cfg = self.cfg
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"expected NHWC images of shape (B, {cfg.image_size}, {cfg.image_size}, 3), "
                       f"got {images.shape}")
    x = self.patch_embed(images.astype(compute_dtype(cfg)))
    x = x.reshape(x.shape[0], -1, cfg.vision_dim)
    cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, cfg.vision_dim)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return x

  def __call__(self, images):
    x = self.features(images)
    normed = self.norm(x)  # Always called so that its parameters exist.
    if self.cfg.apply_final_norm:
      x = normed
    x = x.astype(compute_dtype(self.cfg))
    if self.cfg.vision_projection:
      x = self.proj(x)
    return x
