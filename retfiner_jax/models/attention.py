"""The one attention function of the project, the choice of its kernel, and the additive masks it takes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from retfiner_jax.errors import ConfigError
from retfiner_jax.models.layout import rows_over_devices

# config.model.attention. auto: cuDNN's fused kernel on NVIDIA GPUs in bfloat16, XLA's ops elsewhere (CPU keeps the
# float32 path the reference bundles are matched with; on TPU XLA's own fusion is used).
ATTENTION_CHOICES = ("auto", "xla", "fused")
GPU_PLATFORMS = ("gpu", "cuda")
# What each resolved choice runs (the run log says it).
ATTENTION_KERNELS = {
    "fused": "fused (cuDNN flash attention in the ViT; BERT's attention on XLA's ops, for its masks, dropout and "
             "attention maps)",
    "xla": "xla (scores and softmax in float32 by XLA's ops)",
}

# Added to the scores of keys a query must not see. The original adds -10000; any value this large gives the
# same float32 softmax, and this one stays finite when two masks are summed.
MASKED = -1e9


def resolve_attention(choice: str, platform: str, dtype: str) -> str:
  """config.model.attention for a run on `platform` ('cpu', 'gpu'/'cuda', 'tpu') in compute `dtype` -> 'xla' or
  'fused'. 'fused' is cuDNN's flash attention: NVIDIA GPUs, bfloat16 only; asking for it elsewhere is an error."""
  if choice not in ATTENTION_CHOICES:
    raise ConfigError(f"config.model.attention must be one of {ATTENTION_CHOICES}, got {choice!r}")
  usable = platform in GPU_PLATFORMS and dtype != "float32"
  if choice == "auto":
    return "fused" if usable else "xla"
  if choice == "fused" and not usable:
    raise ConfigError(f"config.model.attention='fused' is cuDNN's fused attention, for NVIDIA GPUs in bfloat16; this "
                     f"run is on {platform!r} in {dtype}: use 'auto' or 'xla'")
  return choice


def fused_where_traced(choice: str, dtype: str) -> bool:
  """Whether a model's attention takes the fused kernel: a run's step resolves 'auto' for its devices
  (refine/step.py); a model built elsewhere resolves it for the backend it is traced on. 'fused' is taken as given
  (the AOT tool traces on the CPU for a GPU)."""
  if choice == "auto":
    return resolve_attention(choice, jax.default_backend(), dtype) == "fused"
  return choice == "fused"


def attention(query, key, value, bias=None, on_probs=None, fused: bool = False):
  """Scaled dot-product attention over heads.

  query: (B, Lq, H, d); key, value: (B, Lk, H, d); bias: additive, broadcastable to (B, H, Lq, Lk), float32.
  The scores, the bias and the softmax are float32 whatever the compute dtype; the weighted sum of the
  values runs in the values' dtype. `on_probs`, if given, maps the attention probabilities (B, H, Lq, Lk) before
  they weight the values (dropout; a Flax perturbation, to take gradients with respect to them).
  `fused` (a resolve_attention 'fused'): cuDNN's kernel, which never holds the probabilities; it takes no bias
  and no `on_probs`, so a call with either stays on the path below.
  Returns (B, Lq, H, d).
  """
  if fused and bias is None and on_probs is None:
    return fused_attention(query, key, value)
  depth = query.shape[-1]
  # Heads moved ahead of the sequence first: XLA:CPU runs the two batched matmuls 2.4x faster on (B, H, L, d)
  # operands than when the einsums take (B, L, H, d) directly (ViT-S/16, batch 64: 86 vs 207 ms a layer).
  query, key, value = (jnp.swapaxes(a, 1, 2) for a in (query, key, value))
  scores = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(depth))
  if bias is not None:
    scores = scores + bias
  probs = softmax_keeping_probs(scores)
  if on_probs is not None:
    probs = on_probs(probs)
  context = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(value.dtype), value)
  # Named for a layer rematerialised whole (common.keeping), as the probabilities: only a matmul could recompute it.
  # Named before the transpose: named after it, XLA:GPU copied it into BERT's scan stacks transposed, 17 GB a step
  # more than what it does this way, the product computed a second time straight into the stack (benchmarks/README).
  return jnp.swapaxes(checkpoint_name(context, "attention_context"), 1, 2)


def _softmax_parts(x):
  """jax.nn.softmax's forward as JAX computes it by default (`jax_softmax_custom_jvp` off): the exponentials of x
  less its max, and their sum (keeping the reduced axis)."""
  unnormalized = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, initial=-jnp.inf, keepdims=True)))
  return unnormalized, jnp.sum(unnormalized, axis=-1, keepdims=True)


@jax.custom_jvp
def softmax_keeping_probs(x):
  """jax.nn.softmax over the last axis, the same program bit for bit (checked on CPU against JAX's default), with
  what its derivative reuses named 'attention_probs': the exponentials and their sum. A layer rematerialised whole
  (common.keeping) then keeps them instead of recomputing the scores' matmul: JAX's own derivatives reuse the
  unnamed values (exp's its output; the custom softmax rule its probabilities, computed inside the rule), out of a
  checkpoint policy's sight."""
  unnormalized, total = _softmax_parts(x)
  return unnormalized / total


@softmax_keeping_probs.defjvp
def _softmax_keeping_probs_jvp(primals, tangents):
  # The derivative JAX takes of the forward above, operation for operation (exp: tangent times output; division:
  # d(u / t) = du / t + (-dt u) t^-2), but reusing the named values.
  (x,), (x_dot,) = primals, tangents
  unnormalized, total = (checkpoint_name(a, "attention_probs") for a in _softmax_parts(x))
  unnormalized_dot = x_dot * unnormalized
  total_dot = jnp.sum(unnormalized_dot, axis=-1, keepdims=True)
  return unnormalized / total, unnormalized_dot / total + -total_dot * unnormalized * jax.lax.integer_pow(total, -2)


def fused_attention(query, key, value, kernel: str = "cudnn"):
  """The same attention through jax.nn.dot_product_attention (`kernel` 'cudnn' on a GPU; 'xla' runs the same call
  on any backend, for tests). Odd lengths are padded by one (cuDNN's training kernels take even lengths only,
  such as ViT's 197 tokens) and the padding is masked out by sequence lengths, so the result is unchanged.

  Traced on a mesh, the operands are first laid out as the run lays out its batches (layout.rows_over_devices):
  XLA's sharding propagation can otherwise hand the kernel's partitioner a layout it cannot express on the mesh
  (seen for 8 GPUs: an error at compile time)."""
  query, key, value = (rows_over_devices(a) for a in (query, key, value))
  batch, q_len, _, _ = query.shape
  kv_len = key.shape[1]
  lengths = {}
  if q_len % 2 or kv_len % 2:
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
    query, key, value = pad(query, q_len), pad(key, kv_len), pad(value, kv_len)
    lengths = dict(query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
                   key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32))
  out = jax.nn.dot_product_attention(query, key, value, implementation=kernel, **lengths)
  return out[:, :q_len]


def padding_bias(attention_mask):
  """(B, Lk) 1/0 key mask -> (B, 1, 1, Lk) additive bias: every query sees every non-padding key."""
  return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, MASKED).astype(jnp.float32)


def causal_padding_bias(attention_mask):
  """(B, L) -> (B, 1, L, L): query i sees key j only if j <= i and j is not padding."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  visible = causal[None, None] & (attention_mask[:, None, None, :] > 0)
  return jnp.where(visible, 0.0, MASKED).astype(jnp.float32)


def self_attention_bias(attention_mask, causal):
  """Per-example choice of mask: `causal` (B,) bool selects causal+padding, else padding only."""
  bidirectional = jnp.broadcast_to(padding_bias(attention_mask),
                                   (attention_mask.shape[0], 1) + (attention_mask.shape[-1],) * 2)
  return jnp.where(jnp.asarray(causal)[:, None, None, None], causal_padding_bias(attention_mask), bidirectional)
