"""Analytic matmul FLOPs of a training step (a multiply-add counts 2), for MFU and step-time estimates.

XLA's own cost analysis counts a scanned layer once and gives nothing for some GPU compiles, so the count is
made here from the model's sizes: ViT, BERT (text-only and cross-attention passes), the vocabulary head at the
target positions, and the contrastive/ITM heads. A differentiated pass costs 3x its forward pass.
"""
from __future__ import annotations

from retfiner_jax.models.config import ModelConfig
from retfiner_jax.refine.objectives import ObjectiveSettings


def vit_flops(cfg: ModelConfig, b: int) -> int:
  n = cfg.grid_size ** 2
  t, d, m = n + 1, cfg.vision_dim, cfg.vision_mlp_dim
  layer = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * m
  out = b * (2 * n * 3 * cfg.patch_size ** 2 * d + cfg.vision_depth * layer)
  return out + (b * 2 * t * d * cfg.text_dim if cfg.vision_projection else 0)


def bert_flops(cfg: ModelConfig, rows: int, cross_rows_kv: int = 0, cross: bool = False) -> int:
  """`rows` sequences through BERT; cross-attention with the image keys/values of `cross_rows_kv` images."""
  l, d, i = cfg.max_text_length, cfg.text_dim, cfg.text_intermediate
  t = cfg.grid_size ** 2 + 1
  layer = 2 * l * d * 3 * d + 4 * l * l * d + 2 * l * d * d + 4 * l * d * i
  if cross:
    layer += 2 * l * d * d + 4 * l * t * d + 2 * l * d * d
  kv = 2 * 2 * t * d * d * cross_rows_kv
  return cfg.text_layers * (rows * layer + kv)


def vocab_flops(cfg: ModelConfig, positions: int) -> int:
  return positions * (2 * cfg.text_dim * cfg.text_dim + 2 * cfg.text_dim * cfg.vocab_size)


def step_flops(cfg: ModelConfig, b: int, ours: bool = True, settings: ObjectiveSettings = ObjectiveSettings()) -> int:
  """Training FLOPs of one step of global batch `b`: ours (one text-only pass, the fused cross-attention passes
  of ITM's 3 and MLM/GM's 2 rows per pair, the vocabulary head at the target positions), or the original's way
  (a second text-only pass without gradient, logits at every position)."""
  heads = 2 * b * cfg.text_dim * cfg.contrastive_dim * 2 + 3 * b * (2 * cfg.text_dim ** 2 + 4 * cfg.text_dim)
  length = cfg.max_text_length
  if ours:
    fwd = (vit_flops(cfg, b) + bert_flops(cfg, b) + bert_flops(cfg, 5 * b, cross_rows_kv=b, cross=True)
           + vocab_flops(cfg, int(round(settings.mlm_target_fraction * b * length)))
           + vocab_flops(cfg, int(round(settings.gm_target_fraction * b * length))) + heads)
    return 3 * fwd
  fwd = (vit_flops(cfg, b) + bert_flops(cfg, b) + bert_flops(cfg, 3 * b, cross_rows_kv=3 * b, cross=True)
         + 2 * bert_flops(cfg, b, cross_rows_kv=b, cross=True) + 2 * vocab_flops(cfg, b * length) + heads)
  return 3 * fwd + bert_flops(cfg, b)
