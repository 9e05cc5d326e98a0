"""Model sizes: one flat, JSON-friendly description of a RetFiner model (or of one of its encoders).

The field names are those of the `config` block of a reference bundle's `expected.json`, so that block is a
valid model config. Sizes a PyTorch checkpoint cannot tell (head counts) come from a named variant.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from retfiner_jax.errors import ConfigError
from retfiner_jax.models.attention import ATTENTION_CHOICES

BACKBONES = ("retfound", "visionfm", "urfound")
# Rematerialisation in the backward pass (models/common.py resolve_remat says what each does).
REMAT_CHOICES = ("auto", "none", "elementwise", "dots", "full")


class InvalidModelSetting(ConfigError):
  """A model-config value that cannot work, named with where the settings came from: `config.model.KEY` for a
  run's config, `SOURCE: KEY` for a file."""

  def __init__(self, key: str, problem: str, source: str = "model config"):
    self.key, self.problem = key, problem
    where = f"{source}.{key}" if source.startswith("config.") else f"{source}: {key}"
    super().__init__(f"{where} {problem}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Vision encoder (timm/MAE ViT).
  backbone: str = "retfound"
  image_size: int = 224
  patch_size: int = 16
  vision_dim: int = 1024
  vision_depth: int = 24
  vision_heads: int = 16
  vision_mlp_dim: int = 4096
  vision_projection: bool = True  # RETFound: a new Linear(vision_dim -> text_dim) after the final norm.
  vision_final_norm: bool | None = None  # None: as the backbone does (UrFound's RetFiner path skips it).
  drop_path: float = 0.0  # Stochastic depth of the last ViT block (timm's linear ramp from 0), when training.
  # Text encoder (BERT with cross-attention).
  text_dim: int = 768
  text_layers: int = 12
  text_heads: int = 12
  text_intermediate: int = 3072
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  text_dropout: float = 0.1  # BERT's hidden and attention-probability dropout while training (BERT's 0.1).
  # Heads and objectives.
  contrastive_dim: int = 512
  temperature: float = 0.07
  label_smoothing: float = 0.1
  max_text_length: int = 30
  # Numerics: "bfloat16" (bf16 compute, f32 params, softmax, LayerNorm and losses; the original trains in
  # float16 mixed precision) or "float32" (the parity tests).
  dtype: str = "bfloat16"
  # Rematerialisation in the backward pass (REMAT_CHOICES): auto | none | elementwise | dots | full. auto:
  # elementwise (layers recomputed from what they keep, no matmul; common.resolve_remat) on accelerators, none on CPU.
  remat: str = "auto"
  # Run the ViT blocks and BERT layers as one nn.scan each (parameters stacked on a leading layer axis): one
  # layer compiled instead of all of them. False: a loop of separately named layers (`blocks_0`, `layer_0`).
  scan_layers: bool = True
  # The attention kernel (models/attention.py resolve_attention): auto | xla | fused. auto: cuDNN's fused attention
  # in the ViT on NVIDIA GPUs in bfloat16, XLA's ops elsewhere. BERT's attention keeps XLA's ops (its masks,
  # dropout and the attention maps that `explain` reads need the probabilities).
  attention: str = "auto"

  def __post_init__(self):
    def check(ok: bool, key: str, problem: str):
      if not ok:
        raise InvalidModelSetting(key, problem)
    check(self.backbone in BACKBONES, "backbone", f"must be one of {BACKBONES}, got {self.backbone!r}")
    check(self.dtype in ("float32", "bfloat16"), "dtype", f"must be 'float32' or 'bfloat16', got {self.dtype!r}")
    check(self.remat in REMAT_CHOICES, "remat", f"must be one of {REMAT_CHOICES}, got {self.remat!r}")
    check(self.attention in ATTENTION_CHOICES, "attention",
          f"must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
    check(0.0 <= self.drop_path < 1.0, "drop_path", f"must be in [0, 1), got {self.drop_path}")
    check(self.vision_dim % self.vision_heads == 0, "vision_dim",
          f"{self.vision_dim} must be divisible by vision_heads {self.vision_heads}")
    check(self.text_dim % self.text_heads == 0, "text_dim",
          f"{self.text_dim} must be divisible by text_heads {self.text_heads}")
    check(self.vision_projection or self.vision_dim == self.text_dim, "vision_projection",
          f"must be True where vision_dim {self.vision_dim} != text_dim {self.text_dim}")

  @property
  def apply_final_norm(self) -> bool:
    if self.vision_final_norm is not None:
      return self.vision_final_norm
    return self.backbone != "urfound"

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"{source}: unknown model-config keys {unknown}; known keys: {sorted(known)}")
    d = dict(d)
    if "vision_mlp_dim" not in d and "vision_dim" in d:
      d["vision_mlp_dim"] = 4 * d["vision_dim"]
    try:
      return cls(**d)
    except InvalidModelSetting as e:  # Named after where the settings came from: config.model.remat, a file's key.
      raise InvalidModelSetting(e.key, e.problem, source) from None

  @classmethod
  def from_json(cls, path: str | Path) -> "ModelConfig":
    """Reads a model config JSON; a reference bundle's `expected.json` (its `config` block) and a converted
    folder's `model.json` (its `model_config` block) also work."""
    path = Path(path)
    try:
      d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"{path}: cannot read a model config: {e}") from e
    if "config" in d and isinstance(d["config"], dict):  # A reference bundle's expected.json.
      block = dict(d["config"])
      if "backbone" in d and "backbone" not in block:
        block["backbone"] = d["backbone"]
      d = block
    elif "model_config" in d and isinstance(d["model_config"], dict):  # A converted folder's model.json.
      d = d["model_config"]
    return cls.from_dict(d, source=str(path))


_VIT_L = dict(vision_dim=1024, vision_depth=24, vision_heads=16, vision_mlp_dim=4096)
_VIT_B = dict(vision_dim=768, vision_depth=12, vision_heads=12, vision_mlp_dim=3072)
_BERT_BASE = dict(text_dim=768, text_layers=12, text_heads=12, text_intermediate=3072)
_TINY_TEXT = dict(text_dim=48, text_layers=2, text_heads=4, text_intermediate=192, contrastive_dim=32)

VARIANTS: dict[str, ModelConfig] = {
    "retfound": ModelConfig(backbone="retfound", vision_projection=True, **_VIT_L, **_BERT_BASE),
    "visionfm": ModelConfig(backbone="visionfm", vision_projection=False, **_VIT_B, **_BERT_BASE),
    "urfound": ModelConfig(backbone="urfound", vision_projection=False, **_VIT_B, **_BERT_BASE),
    # A RETFound-shaped ViT-S/16 (the probe benchmark's encoder).
    "vit-s16": ModelConfig(backbone="retfound", vision_projection=True, vision_dim=384, vision_depth=12,
                           vision_heads=6, vision_mlp_dim=1536, **_BERT_BASE),
    # Text-only sizes: the vision part is left at its defaults and unused.
    "bert-base": ModelConfig(**_BERT_BASE),
    # Tiny models for tests (same shapes as the reference bundles).
    "tiny-retfound": ModelConfig(backbone="retfound", image_size=32, vision_dim=64, vision_depth=2,
                                 vision_heads=4, vision_mlp_dim=256, vision_projection=True, **_TINY_TEXT),
    "tiny-visionfm": ModelConfig(backbone="visionfm", image_size=32, vision_dim=48, vision_depth=2,
                                 vision_heads=4, vision_mlp_dim=192, vision_projection=False, **_TINY_TEXT),
    "tiny-urfound": ModelConfig(backbone="urfound", image_size=32, vision_dim=48, vision_depth=2,
                                vision_heads=4, vision_mlp_dim=192, vision_projection=False, **_TINY_TEXT),
}


def get_variant(name: str) -> ModelConfig:
  if name not in VARIANTS:
    raise ConfigError(f"unknown model variant {name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[name]
