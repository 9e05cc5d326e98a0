"""A masked autoencoder (He et al., 2022) around the project's ViT: how RETFound and UrFound pretrain their FMs.

The encoder is `VisionTransformer` itself (parameters under `vision_encoder`, the FM's names), run on the
visible patches only, with its final norm. The decoder embeds the encoder's tokens to its own width, puts a
learnt mask token at every masked patch, adds fixed 2-D sin-cos positions, runs its blocks (the ViT's `Block`)
and a norm, and predicts each patch's pixels. The loss is the mean squared error over the masked patches, of
pixels normalised per patch when `norm_pix_loss` (MAE's and RETFound's setting).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from retfiner_jax.models.common import apply_stack, layer_norm, stack
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.vit import BLOCK_KEEPS, VIT_LN_EPS, Block, VisionTransformer

xavier = nn.initializers.xavier_uniform()  # MAE initialises its linear layers so.


@dataclasses.dataclass(frozen=True)
class MaeSettings:
  mask_ratio: float = 0.75
  decoder_dim: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_ratio: int = 4
  norm_pix_loss: bool = True


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(positions.reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """(1, 1 + grid^2, dim) fixed 2-D sin-cos positions, a zero row for the class token first. As MAE's table:
  the first half of the channels encodes a patch's column, the second half its row, each as [sin, cos] of the
  position times 1 / 10000^(i / (dim / 4))."""
  if dim % 4:
    raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
  columns, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  table = np.concatenate([sincos_1d(dim // 2, columns), sincos_1d(dim // 2, rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table])[None].astype(np.float32)


def patchify(images, patch: int):
  """(B, H, W, C) -> (B, patches, patch * patch * C), patches row by row, pixels row by row, channels last."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def reconstruction_loss(pred, images, mask, patch: int, norm_pix: bool = True):
  """Mean over masked patches (mask 1) of the per-patch mean squared error; targets normalised per patch when
  `norm_pix`: (x - mean) / sqrt(var + 1e-6) with the unbiased variance (torch's default, which MAE's code
  takes)."""
  target = patchify(images.astype(jnp.float32), patch)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MaeDecoder(nn.Module):
  cfg: ModelConfig  # The encoder's config; the decoder's blocks take its own sizes.
  settings: MaeSettings

  def setup(self):
    cfg, s = self.cfg, self.settings
    block_cfg = cfg.replace(vision_dim=s.decoder_dim, vision_heads=s.decoder_heads, drop_path=0.0,
                            vision_mlp_dim=s.decoder_dim * s.decoder_mlp_ratio, vision_depth=s.decoder_depth,
                            text_dim=s.decoder_dim)  # (No text side: only keeps the config's check quiet.)
    self.decoder_embed = nn.Dense(s.decoder_dim, kernel_init=xavier)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, s.decoder_dim))
    # Fixed (the MAE command's optimizer leaves it as initialised).
    self.decoder_pos_embed = self.param("decoder_pos_embed", lambda *_: jnp.asarray(
        sincos_pos_embed(s.decoder_dim, cfg.grid_size)))
    self.decoder_blocks = stack(Block, block_cfg.replace(scan_layers=False), s.decoder_depth, num_per_layer=1,
                                keeps=BLOCK_KEEPS)  # decoder_blocks_0, ... as MAE's checkpoints.
    self.decoder_norm = layer_norm(VIT_LN_EPS)
    self.decoder_pred = nn.Dense(cfg.patch_size ** 2 * 3, kernel_init=xavier)

  def __call__(self, latent, restore):
    """latent (B, 1 + K, D) encoder tokens, class token first; restore (B, N) -> (B, N, patch^2 * 3)."""
    x = self.decoder_embed(latent.astype(jnp.float32))
    batch, patches = restore.shape
    mask_tokens = jnp.broadcast_to(self.mask_token, (batch, patches + 1 - x.shape[1], x.shape[2]))
    shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    x = jnp.concatenate([x[:, :1], jnp.take_along_axis(shuffled, restore[..., None], axis=1)], axis=1)
    no_drop = jnp.zeros((self.settings.decoder_depth,), jnp.float32)  # The blocks' stochastic-depth rates.
    x = apply_stack(self.decoder_blocks, x + self.decoder_pos_embed, per_layer=(no_drop,))
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]


class MaskedAutoencoder(nn.Module):
  cfg: ModelConfig
  settings: MaeSettings

  def setup(self):
    self.vision_encoder = VisionTransformer(self.cfg)  # Its projection (RETFound's) is never called: no params.
    self.decoder = MaeDecoder(self.cfg, self.settings)

  def __call__(self, images, visible, restore, train: bool = False):
    """Pixel predictions (B, N, patch^2 * 3) of every patch, from the `visible` ones (see mae/masking.py)."""
    return self.decoder(self.vision_encoder.normed_features(images, visible, train), restore)
