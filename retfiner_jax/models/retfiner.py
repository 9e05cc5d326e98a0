"""The RetFiner model: the FM's vision encoder, a BERT text encoder with cross-attention, and the heads.

Each method says what it computes; the objectives (refine/objectives.py) combine them.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from retfiner_jax.models.attention import padding_bias
from retfiner_jax.models.bert import BERT_LN_EPS, BertTextEncoder
from retfiner_jax.models.common import compute_dtype, gelu, layer_norm, torch_linear
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.vit import VisionTransformer

# Each tower's subtree and the name of its layer stack: `blocks` / `layer` holds every layer with a leading layer
# axis when the layers are scanned (ModelConfig.scan_layers), `blocks_0`, `blocks_1`, ... when they are not.
LAYER_STACKS = (("vision_encoder", "blocks"), ("text_encoder", "layer"))
SCANNED_STACKS = tuple(name for _, name in LAYER_STACKS)


class ItmHead(nn.Module):
  """Linear(D, D) -> exact GELU -> LayerNorm(eps 1e-12) -> Linear(D, 2); the Linear layers initialised as
  PyTorch's (the original creates them afresh)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    dtype = compute_dtype(self.cfg)
    d = self.cfg.text_dim
    x = gelu(torch_linear(d, d, dtype, name="linear1")(x))
    x = layer_norm(BERT_LN_EPS, "layernorm")(x)
    return torch_linear(2, d, dtype, name="linear2")(x.astype(dtype)).astype(jnp.float32)


class RetFiner(nn.Module):
  """Methods taking `train` run dropout (BERT) and stochastic depth (ViT) when it is True; they then need a
  'dropout' RNG (`apply(..., rngs={"dropout": key})`)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.vision_encoder = VisionTransformer(cfg)
    self.text_encoder = BertTextEncoder(cfg)
    # New layers of the original (torch.nn.Linear, no bias): PyTorch's init. Both see text-width tokens.
    self.contra_head_v = torch_linear(cfg.contrastive_dim, cfg.text_dim, compute_dtype(cfg), use_bias=False)
    self.contra_head_t = torch_linear(cfg.contrastive_dim, cfg.text_dim, compute_dtype(cfg), use_bias=False)
    self.itm_head = ItmHead(cfg)

  def image_tokens(self, images, train: bool = False):
    """(B, S, S, 3) -> (B, 1+N, text_dim): the tokens the text side attends to; token 0 is the global one."""
    return self.vision_encoder(images, train)

  def image_embedding(self, image_tokens):
    """L2-normalised contrastive embedding of each image's token 0."""
    return l2_normalize(self.contra_head_v(image_tokens[:, 0]))

  def text_only(self, input_ids, attention_mask, train: bool = False):
    """Text encoding without cross-attention (padding mask): (B, L, D)."""
    return self.text_encoder(input_ids, padding_bias(attention_mask), train=train)

  def text_embedding(self, text_cls):
    """L2-normalised contrastive embedding of the text [CLS] output."""
    return l2_normalize(self.contra_head_t(text_cls))

  def text_with_image(self, input_ids, self_bias, image_tokens, extra_image_index=None, train: bool = False):
    """Text encoding fused with image tokens through cross-attention: (R, L, D). Rows: groups of N
    image-aligned rows (N = images in `image_tokens`), then one per `extra_image_index` entry. Each layer
    computes the images' keys/values once, whatever the number of rows."""
    return self.text_encoder(input_ids, self_bias, image_tokens, extra_image_index, train)

  def mlm_logits(self, hidden):
    return self.text_encoder.mlm_logits(hidden)

  def itm_logits(self, fused_cls):
    return self.itm_head(fused_cls)

  def __call__(self, images, input_ids, attention_mask):
    """Touches every parameter once (used by `init`); returns the MLM logits and ITM logits."""
    tokens = self.image_tokens(images)
    text = self.text_only(input_ids, attention_mask)
    sim = self.image_embedding(tokens) @ self.text_embedding(text[:, 0]).T
    fused = self.text_with_image(input_ids, padding_bias(attention_mask), tokens)
    return self.mlm_logits(fused), self.itm_logits(fused[:, 0]), sim


def l2_normalize(x, eps=1e-12):
  """As torch.nn.functional.normalize: x / max(||x||, eps), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def init_params(cfg: ModelConfig, rng, batch_size: int = 1):
  """Randomly initialised parameters of the full model."""
  images = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, 3), jnp.float32)
  ids = jnp.zeros((batch_size, cfg.max_text_length), jnp.int32)
  return RetFiner(cfg).init(rng, images, ids, jnp.ones_like(ids))["params"]
