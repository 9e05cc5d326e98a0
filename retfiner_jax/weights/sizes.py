"""Model sizes read from the weights themselves: a converted folder's `model.json`, a Hugging Face
`config.json`, or the shapes of a PyTorch checkpoint's tensors.

Tensors tell every size but the head counts; those follow the FMs' and BERT's convention of 64 channels a head
when the width differs from the configured one (ViT-B 768 -> 12, ViT-L 1024 -> 16, BERT-base 768 -> 12), and
are otherwise left as configured. A training run takes its encoders' sizes from its weights unless the command
line sets them (`--config.model.vision_dim=...`), in which case a disagreement is one error naming the keys.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from retfiner_jax.errors import ConfigError

VISION_SIZES = ("patch_size", "vision_dim", "vision_depth", "vision_heads", "vision_mlp_dim")
TEXT_SIZES = ("text_dim", "text_layers", "text_heads", "text_intermediate", "vocab_size",
              "max_position_embeddings", "type_vocab_size")
HEAD_WIDTH = 64


def _count(state, pattern) -> int:
  found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def vit_sizes(state: dict, prefix: str = "") -> dict:
  """Sizes of a timm/MAE/iBOT ViT from its tensors (keys under `prefix`); {} when there is none. `image_size`
  is the pretraining grid times the patch (a run may use another: the position grid is resampled)."""
  p = prefix
  if f"{p}cls_token" not in state or f"{p}patch_embed.proj.weight" not in state:
    return {}
  dim, patch = np.shape(state[f"{p}cls_token"])[-1], np.shape(state[f"{p}patch_embed.proj.weight"])[-1]
  sizes = {"vision_dim": dim, "patch_size": patch, "vision_depth": _count(state, rf"{re.escape(p)}blocks\.(\d+)\.")}
  if f"{p}blocks.0.mlp.fc1.weight" in state:
    sizes["vision_mlp_dim"] = np.shape(state[f"{p}blocks.0.mlp.fc1.weight"])[0]
  if f"{p}pos_embed" in state:
    grid = int(round(np.sqrt(np.shape(state[f"{p}pos_embed"])[1] - 1)))
    sizes["image_size"] = grid * patch
  return {k: int(v) for k, v in sizes.items()}


def bert_sizes(state: dict, prefix: str = "bert.") -> dict:
  """Sizes of a Hugging Face BERT from its tensors (keys under `prefix`); {} when there is none."""
  p = prefix
  words = state.get(f"{p}embeddings.word_embeddings.weight")
  if words is None:
    return {}
  sizes = {"vocab_size": np.shape(words)[0], "text_dim": np.shape(words)[1],
           "text_layers": _count(state, rf"{re.escape(p)}encoder\.layer\.(\d+)\.")}
  for key, name, axis in (("max_position_embeddings", "embeddings.position_embeddings.weight", 0),
                          ("type_vocab_size", "embeddings.token_type_embeddings.weight", 0),
                          ("text_intermediate", "encoder.layer.0.intermediate.dense.weight", 0)):
    if f"{p}{name}" in state:
      sizes[key] = np.shape(state[f"{p}{name}"])[axis]
  return {k: int(v) for k, v in sizes.items()}


def hf_config_sizes(hf: dict) -> dict:
  """Text sizes from a Hugging Face BERT config.json (head count included)."""
  return {"text_dim": hf["hidden_size"], "text_layers": hf["num_hidden_layers"],
          "text_heads": hf["num_attention_heads"], "text_intermediate": hf["intermediate_size"],
          "vocab_size": hf["vocab_size"], "max_position_embeddings": hf["max_position_embeddings"],
          "type_vocab_size": hf.get("type_vocab_size", 2)}


def with_conventional_heads(sizes: dict, current) -> dict:
  """Adds head counts by the 64-channel convention for a width that differs from `current`'s (a ModelConfig or
  a mapping); a width the configured model already has keeps its configured heads."""
  out = dict(sizes)
  get = current.get if hasattr(current, "get") else lambda k: getattr(current, k)
  for dim, heads in (("vision_dim", "vision_heads"), ("text_dim", "text_heads")):
    if dim in out and heads not in out and out[dim] != get(dim):
      if out[dim] % HEAD_WIDTH:
        raise ConfigError(f"the weights have {dim} {out[dim]}, not a multiple of {HEAD_WIDTH}: the head count "
                          f"cannot be inferred; set config.model.{heads} (or the converter's --variant)")
      out[heads] = out[dim] // HEAD_WIDTH
  return out


def sizes_of_weights(path, part: str) -> dict:
  """The sizes the weights at `path` fix for `part` ("vision", "text" or "retfiner": both), image size left
  out. Reads model.json or config.json when there is one, else the checkpoint's tensors."""
  from retfiner_jax.weights import convert as cv
  path = Path(path)
  wanted = {"vision": VISION_SIZES, "text": TEXT_SIZES, "retfiner": VISION_SIZES + TEXT_SIZES}[part]
  if path.is_dir() and (path / "model.json").exists():  # A converted folder.
    info = json.loads((path / "model.json").read_text())
    model, contents = info.get("model_config", {}), info.get("contents", [])
    keep = (VISION_SIZES if "vision_encoder" in contents else ()) + (TEXT_SIZES if "text_encoder" in contents else ())
    return {k: model[k] for k in wanted if k in keep and k in model}
  if path.is_dir():  # A Hugging Face folder: its config.json.
    config = path / "config.json"
    if not config.exists():
      raise cv.CheckpointError(f"{path}: a BERT folder needs config.json")
    return {k: v for k, v in hf_config_sizes(json.loads(config.read_text())).items() if k in wanted}
  state, fmt = cv.read_shapes(path)  # Shapes only: the run reads the weights themselves once, later.
  if fmt == "lightning":
    sizes = {**vit_sizes(state, "model.vision_encoder."), **bert_sizes(state, "model.multimodal_encoder.bert.")}
  elif fmt == "hf-bert":
    sizes = bert_sizes(state, "bert." if any(k.startswith("bert.") for k in state) else "")
  else:
    sizes = vit_sizes(state)
  return {k: v for k, v in sizes.items() if k in wanted}


def weight_sources(config) -> list[tuple[str, str, str]]:
  """(config.weights key, path, the part it fills: "retfiner" for the whole model, "vision", "text") of each
  configured source: a whole RetFiner model, or the FM and/or the BERT."""
  w = config.weights
  if w.retfiner:
    return [("retfiner", w.retfiner, "retfiner")]
  return [(n, p, n) for n, p in (("vision", w.vision), ("text", w.text)) if p]


def resolve_model_sizes(config, explicit=(), log=print):
  """Sets `config.model`'s sizes from the configured weights (in place). `explicit`: the config.model keys the
  command line set; the weights disagreeing with one of those is an error naming them all."""
  changes, conflicts = [], []
  for name, path, part in weight_sources(config):
    if not Path(path).exists():
      continue  # files.configured_weights names the missing file (before the compile starts).
    sizes = with_conventional_heads(sizes_of_weights(path, part), config.model)
    for key, value in sizes.items():
      if config.model[key] == value:
        continue
      (conflicts if key in explicit else changes).append((key, config.model[key], value, f"config.weights.{name}"))
  if conflicts:
    raise ConfigError("the command line sets model sizes the weights do not have: " + "; ".join(
        f"--config.model.{k}={old} but {src} has {new}" for k, old, new, src in conflicts)
        + ". Drop those flags (sizes come from the weights), or give weights of those sizes")
  for key, old, new, src in changes:
    config.model[key] = new
  if changes:
    log("model sizes from the weights: " + ", ".join(f"{k} {old} -> {new} ({src})" for k, old, new, src in changes))
