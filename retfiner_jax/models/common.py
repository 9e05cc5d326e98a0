"""Layer helpers shared by the ViT and BERT: the ViT's input, compute dtype, float32 LayerNorm, exact GELU, remat,
layer stacks.

A stack of identical layers runs either as a Python loop over separately named layers (`blocks_0`, `blocks_1`,
... as the PyTorch checkpoints count them) or, with `ModelConfig.scan_layers`, as one `nn.scan` over a single
layer whose parameters carry a leading layer axis (`blocks/...` of shape (depth, ...)). Scanning compiles one
layer instead of `depth` copies; the converter moves between the two layouts (`convert.to_layer_layout`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from retfiner_jax.data.images import NORMALISATION
from retfiner_jax.errors import ConfigError
from retfiner_jax.models.config import REMAT_CHOICES, ModelConfig

REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


def resolve_remat(choice: str, platform: str) -> str:
  """config.model.remat for a run on `platform`. none: XLA keeps what the backward pass needs. elementwise: only
  elementwise work is recomputed, never a matmul, and the values are the same: each layer (a ViT block, a BERT
  layer) is recomputed whole from the values it names and keeps (`stack`'s `keeps`, `keeping`): its matmuls'
  outputs and what else only a matmul or a random draw could give again. dots, full: whole layers recomputed but
  for their matmuls' outputs, or entirely. auto: elementwise on accelerators, none on CPU, where memory is plenty
  and recomputing would only cost time."""
  if choice not in REMAT_CHOICES:
    raise ConfigError(f"config.model.remat must be one of {REMAT_CHOICES}, got {choice!r}")
  if choice == "auto":
    return "none" if platform == "cpu" else "elementwise"
  return choice


def model_images(images, backbone: str):
  """The ViT's input, (B, S, S, 3) normalised: given as such (the probe, the text side, the reference bundles),
  or made here, on the device, from the (B, S, S) one-channel images in [0, 1] that the training pipeline ships
  (float32 or bfloat16; a third of the bytes or less): the channel repeated to three and normalised with the
  backbone's mean and std in float32, as data/images.py normalise does it on the host."""
  if images.ndim == 4:
    return images
  if images.ndim != 3:
    raise ValueError(f"expected (B, S, S, 3) normalised or (B, S, S) one-channel images, got shape {images.shape}")
  mean, std = (jnp.asarray(v, jnp.float32) for v in NORMALISATION[backbone])
  return (images.astype(jnp.float32)[..., None] - mean) / std


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def layer_norm(eps, name=None):
  """LayerNorm kept in float32 in every precision mode."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


def gelu(x):
  """Exact GELU written as PyTorch writes it, x/2 (1 + erf(x/sqrt 2)): XLA's erf is one polynomial that fuses
  into a single loop (its erfc, which jax.nn.gelu uses, costs three passes over the array on CPU)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class Dropout(nn.Module):
  """Inverted dropout with flax.linen.Dropout's values: the same key (make_rng('dropout') in a submodule of the same
  name) and the same keep mask, which is drawn as one flat vector and reshaped. JAX's bits of a shape are those of
  the flat shape in row-major order (every key implementation), so only the program changes: XLA's CPU compiler
  takes about a fifth of the time over the flat hash (0.2 s against 1.1 s for a (640, 12, 30, 30) probability
  mask), and the full step has eight such masks."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:  # As Flax: zeros, without 0 * inf in the gradient.
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.size,)).reshape(x.shape)
    mask = checkpoint_name(mask, "dropout_mask")  # Kept by a layer rematerialised whole (BERT's LAYER_KEEPS).
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


def torch_linear(features: int, fan_in: int, dtype, use_bias: bool = True, name=None):
  """nn.Dense initialised as a new torch.nn.Linear is: weight kaiming_uniform(a=sqrt(5)) and bias, both
  U(+-1/sqrt(fan_in)). For the layers the original creates afresh (RETFound's `proj`, the contrastive and ITM
  heads)."""
  bound = 1.0 / math.sqrt(fan_in)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name, bias_init=bias_init,
                  kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))


# The forward primitives of cuDNN's fused attention (jax.nn.dot_product_attention, implementation 'cudnn'): their
# outputs, the attention's output and softmax statistics, are what its backward kernel takes besides q, k and v.
_FUSED_ATTENTION_FORWARD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


def _fused_attention_outputs(prim, *_, **__) -> bool:
  return prim.name in _FUSED_ATTENTION_FORWARD


def keeping(names):
  """The checkpoint policy of a layer rematerialised whole under remat 'elementwise': it keeps the values the layer
  names among `names` (jax.ad_checkpoint.checkpoint_name, the identity outside such a checkpoint) and cuDNN's
  attention outputs (recomputing those would rerun the attention's matmuls); all else is recomputed. The names
  must cover every matmul output the backward pass needs (the layer's own job; tests/refine/test_refinement_recipe.py
  counts the gradient's matmuls): keeping a matmul's output with its bias added, rather than the product itself,
  lets XLA fuse the bias into the copy the scan keeps (keeping the bare product, XLA:GPU ran each such matmul twice
  in the forward pass)."""
  return jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.save_only_these_names(*names),
                                                         _fused_attention_outputs)


def maybe_remat(module_cls, policy: str, scanned: bool = False, static_argnums=(), keeps=()):
  """The module class, rematerialised in the backward pass by the named policy ('none': as is). 'elementwise': the
  whole layer, recomputed from the values it names with checkpoint_name and lists in `keeps`. `static_argnums`
  (counting `self` as 0) name the call arguments that are Python values, such as `train`."""
  policy = resolve_remat(policy, jax.default_backend())
  if policy == "none":
    return module_cls
  if policy == "elementwise" and not keeps:
    raise ValueError(f"remat 'elementwise' of {module_cls.__name__}: the layer names no values to keep")
  checkpoint_policy = keeping(keeps) if policy == "elementwise" else REMAT_POLICIES[policy]
  # Inside a scan the loop already keeps XLA from merging the recomputation away (Flax's advice).
  return nn.remat(module_cls, policy=checkpoint_policy, prevent_cse=not scanned, static_argnums=static_argnums)


def stack(layer_cls, cfg: ModelConfig, length: int, num_per_layer: int = 0, num_shared: int = 0, keeps=()):
  """For a parent's `setup`: `length` layers of `layer_cls`, applied in turn by `apply_stack`; `keeps`: the names
  the layer gives what it keeps under remat 'elementwise' (`maybe_remat`; unused under the other settings).

  A layer is called as `layer(x, *per_layer, *shared, train) -> (x, None)`: `num_per_layer` arguments differ
  per layer (arrays with a leading layer axis, e.g. drop-path rates), `num_shared` are the same for every layer
  (masks, image tokens), and `train` (a Python bool) switches dropout and stochastic depth on. With
  `cfg.scan_layers` this is one `nn.scan`ned module (parameters stacked on axis 0 under the attribute's name,
  e.g. `blocks`); otherwise a list of modules (`blocks_0`, `blocks_1`, ...).
  """
  train_argnum = 2 + num_per_layer + num_shared  # self, x, per-layer, shared, train.
  if cfg.scan_layers:
    layer = maybe_remat(layer_cls, cfg.remat, scanned=True, static_argnums=(train_argnum,), keeps=keeps)
    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0,) * num_per_layer + (nn.broadcast,) * (num_shared + 1), length=length)
    return scanned(cfg)
  layer = maybe_remat(layer_cls, cfg.remat, static_argnums=(train_argnum,), keeps=keeps)
  return [layer(cfg) for _ in range(length)]


def apply_stack(layers, x, per_layer=(), shared=(), train: bool = False):
  """Runs what `stack` built on `x`; `per_layer` arrays are indexed by layer, `shared` go to every layer."""
  if isinstance(layers, (list, tuple)):
    for i, layer in enumerate(layers):
      x, _ = layer(x, *(a[i] for a in per_layer), *shared, train)
    return x
  x, _ = layers(x, *per_layer, *shared, train)
  return x
