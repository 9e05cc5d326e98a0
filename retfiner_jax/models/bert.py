"""BERT with an optional cross-attention sub-layer in every layer, and the tied MLM prediction head.

Post-LN layers (LayerNorm eps 1e-12), exact GELU, token type 0, absolute positions. Each layer runs
self-attention -> cross-attention (when image keys/values are given) -> feed-forward. The image keys/values
of every layer depend only on the image tokens, so each layer computes their keys/values once per image and
every row attends them (rows paired with other images gather theirs).
Parameter names follow Hugging Face's BERT (`embeddings`, `layer_N/attention`, `crossattention`, ...).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from retfiner_jax.models.attention import attention, padding_bias
from retfiner_jax.models.common import Dropout, apply_stack, compute_dtype, gelu, layer_norm, stack
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.layout import rows_over_devices

BERT_LN_EPS = 1e-12
# What a layer keeps for its backward pass where it is rematerialised whole (remat 'elementwise'): the query, key
# and value projections, the attention's probabilities and output (attention.py), the dropout masks, fc1's output
# and each sub-layer's sum before its LayerNorm. That is every matmul output the backward pass takes, and the
# random bits are not drawn again; the LayerNorms, GELU and the dropout's scaling are recomputed.
LAYER_KEEPS = ("bert_projection", "attention_probs", "attention_context", "dropout_mask", "bert_fc1",
               "bert_pre_norm")


init_normal = nn.initializers.normal(0.02)  # BERT's initializer_range.


def dense(features, dtype, name=None):
  return nn.Dense(features, dtype=dtype, kernel_init=init_normal, name=name)


class BertAttention(nn.Module):
  """Multi-head attention + output dense + residual + LayerNorm (BERT's `attention` / `crossattention`)."""
  cfg: ModelConfig

  def setup(self):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    self.query = dense(cfg.text_dim, dtype)
    self.key = dense(cfg.text_dim, dtype)
    self.value = dense(cfg.text_dim, dtype)
    self.output_dense = dense(cfg.text_dim, dtype)
    self.output_LayerNorm = layer_norm(BERT_LN_EPS)
    self.dropout = Dropout(cfg.text_dropout)

  def _heads(self, x):
    return x.reshape(x.shape[:2] + (self.cfg.text_heads, self.cfg.text_dim // self.cfg.text_heads))

  def keys_values(self, source):
    """(B, Lk, D) -> key, value of shape (B, Lk, H, d)."""
    return tuple(self._heads(checkpoint_name(dense(source), "bert_projection")) for dense in (self.key, self.value))

  def __call__(self, hidden, keys_values, bias=None, extra_index=None, train: bool = False):
    """Attention of `hidden` (R, L, D) to `keys_values` ((N, Lk, H, d) each), plus output and residual.

    For self-attention N = R. For cross-attention the keys/values are per image (N images) and the rows are
    G groups of N image-aligned rows (row g*N + i attends image i), then, if `extra_index` is given, one row
    per entry attending image extra_index[e]. Aligned groups run as one attention per image with G*L
    queries, so no image's keys/values are copied; only the extra rows gather theirs. `train`: dropout on.
    """
    key, value = keys_values
    drop = self.cfg.text_dropout > 0 and train

    def on_probs(name):
      # A zero perturbation (a no-op unless a 'perturbations' collection is passed: the gradient of an output
      # with respect to it is the gradient with respect to the probabilities, for Grad-CAM), kept in the
      # 'intermediates' collection where that is mutable (the attention maps), then dropout.
      def hook(p):
        p = self.perturb(name, p)
        self.sow("intermediates", name, p)
        return self.dropout(p, deterministic=not drop)
      return hook
    query = self._heads(checkpoint_name(self.query(hidden), "bert_projection"))
    rows, length, heads, depth = query.shape
    images = key.shape[0]
    extra = 0 if extra_index is None else extra_index.shape[0]
    groups, remainder = divmod(rows - extra, images)
    if remainder or groups < 1:
      raise ValueError(f"attention: {rows} rows do not split into groups of {images} image-aligned rows "
                       f"plus {extra} extra rows")
    if groups == 1:
      context = attention(query[:images], key, value, bias, on_probs("probs"))
    else:
      if bias is not None:
        raise ValueError("attention: grouped rows take no mask (cross-attention sees every image token)")
      # Regrouped by image, each device keeps its own images' rows (rows_over_devices), as in the keys/values.
      grouped = query[:groups * images].reshape(groups, images, length, heads, depth).swapaxes(0, 1)
      grouped = rows_over_devices(grouped.reshape(images, groups * length, heads, depth))
      context = attention(grouped, rows_over_devices(key), rows_over_devices(value), None, on_probs("probs"))
      context = rows_over_devices(context).reshape(images, groups, length, heads, depth).swapaxes(0, 1)
      context = context.reshape(groups * images, length, heads, depth)
    if extra:
      context = jnp.concatenate([context, attention(query[groups * images:], key[extra_index], value[extra_index],
                                                    None, on_probs("extra_probs"))])
    out = self.output_dense(context.reshape(hidden.shape[:2] + (self.cfg.text_dim,)))
    out = self.dropout(out, deterministic=not train)
    return self.output_LayerNorm(checkpoint_name(out + hidden, "bert_pre_norm")).astype(hidden.dtype)


class BertLayer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    self.attention = BertAttention(cfg)
    self.crossattention = BertAttention(cfg)
    self.intermediate_dense = dense(cfg.text_intermediate, dtype)
    self.output_dense = dense(cfg.text_dim, dtype)
    self.output_LayerNorm = layer_norm(BERT_LN_EPS)
    self.dropout = Dropout(cfg.text_dropout)

  def __call__(self, hidden, self_bias, image_tokens=None, extra_image_index=None, train: bool = False):
    """One layer; returns (hidden, None) (a scan step). Cross-attention runs when `image_tokens` is given."""
    hidden = rows_over_devices(hidden)
    hidden = self.attention(hidden, self.attention.keys_values(hidden), self_bias, train=train)
    if image_tokens is not None:  # No mask: every image token is visible.
      cross_kv = self.crossattention.keys_values(image_tokens.astype(hidden.dtype))
      hidden = self.crossattention(hidden, cross_kv, extra_index=extra_image_index, train=train)
    out = self.output_dense(gelu(checkpoint_name(self.intermediate_dense(hidden), "bert_fc1")))
    out = self.dropout(out, deterministic=not train)
    return self.output_LayerNorm(checkpoint_name(out + hidden, "bert_pre_norm")).astype(hidden.dtype), None


class BertEmbeddings(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.text_dim, embedding_init=init_normal)
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.text_dim, embedding_init=init_normal)
    self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.text_dim, embedding_init=init_normal)
    self.LayerNorm = layer_norm(BERT_LN_EPS)
    self.dropout = Dropout(cfg.text_dropout)

  def __call__(self, input_ids, train: bool = False):
    length = input_ids.shape[-1]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(length))[None]
         + self.token_type_embeddings(jnp.zeros_like(input_ids)))
    x = self.dropout(self.LayerNorm(x), deterministic=not train)
    return x.astype(compute_dtype(self.cfg))


class MlmHead(nn.Module):
  """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus a bias."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden, word_embeddings: nn.Embed):
    x = gelu(dense(self.cfg.text_dim, compute_dtype(self.cfg), name="transform_dense")(hidden))
    x = layer_norm(BERT_LN_EPS, "transform_LayerNorm")(x)
    bias = self.param("bias", nn.initializers.zeros, (self.cfg.vocab_size,))
    logits = jnp.dot(x.astype(compute_dtype(self.cfg)), word_embeddings.embedding.T.astype(compute_dtype(self.cfg)),
                     preferred_element_type=jnp.float32)
    return logits + bias


class BertTextEncoder(nn.Module):
  cfg: ModelConfig

  def setup(self):
    self.embeddings = BertEmbeddings(self.cfg)
    self.layer = stack(BertLayer, self.cfg, self.cfg.text_layers, num_shared=3, keeps=LAYER_KEEPS)
    self.mlm_head = MlmHead(self.cfg)

  def __call__(self, input_ids, self_bias, image_tokens=None, extra_image_index=None, train: bool = False):
    """Sequence output (R, L, D). `self_bias` is the additive self-attention mask (see attention.py).
    `image_tokens` (N, Lk, D) switches cross-attention on: rows come in groups of N image-aligned rows, then one
    row per `extra_image_index` entry (see BertAttention). `train`: dropout on (needs a 'dropout' RNG)."""
    return apply_stack(self.layer, self.embeddings(input_ids, train),
                       shared=(self_bias, image_tokens, extra_image_index), train=train)

  def mlm_logits(self, hidden):
    """Vocabulary logits (float32) of the given hidden states (any leading shape)."""
    return self.mlm_head(hidden, self.embeddings.word_embeddings)

  def init_all(self, input_ids, attention_mask, image_tokens):
    """Touches every parameter (for `init`)."""
    hidden = self(input_ids, padding_bias(attention_mask), image_tokens)
    return self.mlm_logits(hidden)
