"""Vision Transformer with the timm/MAE structure used by RETFound, VisionFM and UrFound.

Parameter names follow the PyTorch checkpoints (`patch_embed`, `blocks_N/{norm1,attn/qkv,attn/proj,norm2,
mlp/fc1,mlp/fc2}`, `norm`, `proj`) so conversion is a mechanical rename; with `scan_layers` the blocks are
one `blocks/...` tree stacked over N. Images are NHWC float.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from retfiner_jax.models.attention import attention, fused_where_traced
from retfiner_jax.models.common import (apply_stack, compute_dtype, gelu, layer_norm, model_images, stack,
                                       torch_linear)
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.layout import rows_over_devices

VIT_LN_EPS = 1e-6
# What a block keeps for its backward pass where it is rematerialised whole (remat 'elementwise'): the qkv
# projection, the residual stream between its two halves and fc1's output, each with its bias added, and the
# attention's probabilities and output (XLA's path; cuDNN's kernel keeps its own output and statistics instead).
# That is every matmul output the backward pass takes; its LayerNorms, GELU, the stochastic-depth factors (drawn
# per sample) and (cuDNN) the padding of q, k, v to an even length and the slicing back are recomputed.
BLOCK_KEEPS = ("vit_qkv", "vit_between_halves", "vit_fc1", "attention_probs", "attention_context")


class FusedQKVAttention(nn.Module):
  """timm's Attention: one qkv projection, attention over heads, the output projection. `fused`: cuDNN's kernel
  (attention.resolve_attention)."""
  dim: int
  heads: int
  dtype: object = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x):
    batch, length, _ = x.shape
    qkv = checkpoint_name(nn.Dense(3 * self.dim, dtype=self.dtype, name="qkv")(x), "vit_qkv")
    qkv = qkv.reshape(batch, length, 3, self.heads, self.dim // self.heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], fused=self.fused)
    return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out.reshape(batch, length, self.dim))


class Mlp(nn.Module):
  hidden: int
  dim: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = gelu(checkpoint_name(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), "vit_fc1"))
    return nn.Dense(self.dim, dtype=self.dtype, name="fc2")(x)


def drop_path(x, rate, rng):
  """Stochastic depth as timm's DropPath: each sample's branch is zeroed with probability `rate`, the kept ones
  scaled by 1 / (1 - rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  # timm's order, x / keep * mask; a (B, 1, 1) factor, so the backward pass keeps no mask of x's size.
  return x / keep.astype(x.dtype) * mask.astype(x.dtype)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). Returns (x, None) (a scan step).
  `drop_rate` (a scalar) is this block's stochastic-depth rate, applied to both branches when `train` (draws
  from the 'dropout' RNG stream)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, drop_rate, train: bool = False):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    dropping = train and cfg.drop_path > 0
    branch = lambda y: drop_path(y, drop_rate, self.make_rng("dropout")) if dropping else y
    fused = fused_where_traced(cfg.attention, cfg.dtype)
    x = rows_over_devices(x)
    x = x + branch(FusedQKVAttention(cfg.vision_dim, cfg.vision_heads, dtype, fused, name="attn")(
        layer_norm(VIT_LN_EPS, "norm1")(x).astype(dtype)))
    x = checkpoint_name(x, "vit_between_halves")
    x = x + branch(Mlp(cfg.vision_mlp_dim, cfg.vision_dim, dtype, name="mlp")(
        layer_norm(VIT_LN_EPS, "norm2")(x).astype(dtype)))
    return x, None


class VisionTransformer(nn.Module):
  """Returns all tokens, class token first.

  `features` gives the last block's output (before any final norm): the linear probe's input.
  `__call__` gives the tokens the text encoder attends to: final norm if the backbone applies it, then the
  projection to the text width if configured. The `norm` parameters always exist (so an export carries
  them), even where the backbone's RetFiner path does not apply them.
  `train=True` switches stochastic depth (cfg.drop_path) on; it then needs a 'dropout' RNG.
  """
  cfg: ModelConfig

  def setup(self):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    self.patch_embed = nn.Conv(cfg.vision_dim, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                               padding="VALID", dtype=dtype)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.vision_dim))
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                (1, 1 + cfg.grid_size ** 2, cfg.vision_dim))
    self.blocks = stack(Block, cfg, cfg.vision_depth, num_per_layer=1, keeps=BLOCK_KEEPS)
    self.norm = layer_norm(VIT_LN_EPS)
    if cfg.vision_projection:
      self.proj = torch_linear(cfg.text_dim, cfg.vision_dim, dtype)  # RetFiner's new layer: PyTorch's init.

  def features(self, images, train: bool = False, visible=None):
    """`visible` (B, K) patch indices: only those patches (and the class token) go through the blocks, as
    MAE's encoder takes them."""
    cfg = self.cfg
    images = model_images(images, cfg.backbone)
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"expected NHWC images of shape (B, {cfg.image_size}, {cfg.image_size}, 3) (or one channel, "
                       f"(B, {cfg.image_size}, {cfg.image_size})), got {images.shape}")
    x = self.patch_embed(images.astype(compute_dtype(cfg)))
    x = x.reshape(x.shape[0], -1, cfg.vision_dim)
    cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, cfg.vision_dim)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    if visible is not None:
      x = jnp.concatenate([x[:, :1], jnp.take_along_axis(x[:, 1:], visible[..., None], axis=1)], axis=1)
    # timm's rule: rates rising linearly from 0 at the first block to cfg.drop_path at the last.
    rates = jnp.linspace(0.0, cfg.drop_path, cfg.vision_depth, dtype=jnp.float32)
    return apply_stack(self.blocks, x, per_layer=(rates,), train=train)

  def normed_features(self, images, visible=None, train: bool = False):
    """The final norm of `features`: MAE's encoder output."""
    return self.norm(self.features(images, train, visible))

  def __call__(self, images, train: bool = False):
    x = self.features(images, train)
    normed = self.norm(x)  # Always called so that its parameters exist.
    if self.cfg.apply_final_norm:
      x = normed
    x = x.astype(compute_dtype(self.cfg))
    if self.cfg.vision_projection:
      x = self.proj(x)
    return x
