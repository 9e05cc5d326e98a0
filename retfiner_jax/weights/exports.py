"""A model written out for other tools: the FMs' PyTorch layout, Hugging Face BERT folders, RetFiner's own
Lightning layout, and our converted (Flax) folders.

`export_model` is what a finished training run writes to `workdir/export/`; the converter's `--export-*`
options call the single-part writers. Every writer goes through the key tables of `convert.py`, the ones
importing uses, so an export converts back to the same parameters.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from retfiner_jax.disk_space import shortfall, size_text, tree_nbytes
from retfiner_jax.errors import ConfigError, DiskFull
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.runs import whole_files
from retfiner_jax.weights import convert as cv
from retfiner_jax.weights.files import readable_by_all, save_converted, unrolled_flat


def vision_state_dict(cfg: ModelConfig, params: dict) -> dict:
  """The vision encoder as a state_dict in the FMs' own (timm/MAE/iBOT) key layout, numpy values."""
  return cv.export_state(unrolled_flat({"vision_encoder": params["vision_encoder"]}), cv.vision_table(cfg))


def lightning_state_dict(cfg: ModelConfig, params: dict) -> dict:
  """The whole model in RetFiner's Lightning `state_dict` layout (`model.` prefix), tied decoder included."""
  return cv.export_state(unrolled_flat(params), cv.lightning_table(cfg),
                         cv.tied_keys("model.multimodal_encoder.", "model.multimodal_encoder.bert."))


def heads_state_dict(params: dict) -> dict:
  """The contrastive and matching heads, in the original's module names (`contra_head_v.linear.weight`, ...)."""
  return cv.export_state(cv.flatten({k: params[k] for k in ("contra_head_v", "contra_head_t", "itm_head")}),
                         cv.heads_table(prefix=""))


def save_torch(state: dict, path, **extra):
  """A torch pickle of `state` (numpy values become tensors), with `extra` entries beside it if given."""
  import torch
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  torch.save({**extra, "state_dict": tensors} if extra else tensors, path)


def save_fm_checkpoint(state: dict, path):
  """A vision encoder as RETFound's and MAE's checkpoints hold it, `{"model": state_dict}`: the layout their
  loaders (and RetFiner's, `checkpoint["model"]`) read."""
  import torch
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)


def save_lightning(cfg: ModelConfig, params: dict, path, epoch: int = 0, global_step: int = 0):
  """The whole model as a checkpoint the original's scripts read: {"state_dict": {"model.…": tensor}, ...}."""
  save_torch(lightning_state_dict(cfg, params), path, epoch=epoch, global_step=global_step)


def save_safetensors(state: dict, path):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------
# Hugging Face BERT folders.

ENCODER, CROSS_ATTENTION = "bert_encoder", "bert_cross_attention"


def _hf_config(cfg: ModelConfig, architecture: str, decoder: bool) -> dict:
  return {"architectures": [architecture], "model_type": "bert", "hidden_size": cfg.text_dim,
          "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
          "intermediate_size": cfg.text_intermediate, "vocab_size": cfg.vocab_size,
          "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
          "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
          "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 0,
          "position_embedding_type": "absolute", "is_decoder": decoder, "add_cross_attention": decoder,
          "tie_word_embeddings": True}


def _readme_hf(cfg: ModelConfig, pooler: bool) -> str:
  pooled = ("`pooler.*` is the source BERT's pooler, carried unchanged: RetFiner never uses or trains it, so "
            "`pooler_output` is not a refined quantity." if pooler else
            "It has no pooler (RetFiner's model has none, and the source BERT had none to carry): load it with "
            "`BertModel.from_pretrained(DIR, add_pooling_layer=False)`; plain `AutoModel` would add a random one "
            "and say so.")
  return f"""# RetFiner's text encoder as Hugging Face folders

Both folders hold the same refined weights ({cfg.text_layers} layers, width {cfg.text_dim}) and the tokenizer
the model was trained with (`vocab.txt`, uncased WordPiece, reports cut at {cfg.max_text_length} tokens).

- `{ENCODER}/`: the plain, bidirectional text encoder, without cross-attention. This is the unimodal pass
  RetFiner uses for image-text contrast (ITC): `AutoTokenizer` and `AutoModel` (a `BertModel`) load it.
  {pooled}
- `{CROSS_ATTENTION}/`: the whole text side, for `BertLMHeadModel`: every layer's cross-attention over the
  image tokens (`encoder_hidden_states`, the vision encoder's output projected to width {cfg.text_dim}) and
  the tied masked-language-model head. It is a decoder (`is_decoder: true`): with a 2-D `attention_mask` it
  runs causal attention, as RetFiner's generative objective does; the matching and masked-language passes
  are bidirectional and need a 4-D additive mask.

The ITC and ITM heads are not part of either folder (see `heads.safetensors` beside them when present).
"""


def hf_bert(cfg: ModelConfig, params: dict, folder, tokenizer, pooler: dict | None = None) -> dict:
  """The text encoder as two Hugging Face folders (see `_readme_hf`) under `folder`, with a README.

  tokenizer: the vocab.txt (or a folder holding one) the model was trained with; pooler: a source BERT's
  pooler tensors to carry (weights.source_pooler)."""
  from retfiner_jax.data.tokenizer import load_tokenizer
  if "text_encoder" not in params:
    raise ConfigError("the weights hold no text encoder to export")
  if not tokenizer:
    raise ConfigError("a Hugging Face export needs the vocabulary the model was trained with: give the "
                      "tokenizer (a vocab.txt or a BERT folder holding one)")
  tok = load_tokenizer(tokenizer)
  if len(tok) > cfg.vocab_size:  # Fewer is fine: the extra embedding rows are never looked up.
    raise ConfigError(f"tokenizer {tokenizer} has {len(tok)} tokens, more than the model's {cfg.vocab_size}: it is "
                      f"not the vocabulary this model was trained with")
  tok.model_max_length = cfg.max_text_length
  folder = Path(folder)
  flat = unrolled_flat({"text_encoder": params["text_encoder"]})
  encoder = cv.export_state(flat, cv.bert_table(cfg, "", "", cross_attention=False, mlm_head=False))
  full = cv.export_state(flat, cv.bert_table(cfg, "bert.", ""), cv.tied_keys("", "bert."))
  for name, state, architecture, decoder in ((ENCODER, {**encoder, **(pooler or {})}, "BertModel", False),
                                             (CROSS_ATTENTION, full, "BertLMHeadModel", True)):
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, architecture, decoder), indent=1))
    tok.save_pretrained(str(out))
  (folder / "README.md").write_text(_readme_hf(cfg, bool(pooler)))
  readable_by_all(folder)
  return {"hf_encoder": str(folder / ENCODER), "hf_cross_attention": str(folder / CROSS_ATTENTION)}


# ---------------------------------------------------------------------------------------------------------
# A training run's export.

def _readme_run(cfg: ModelConfig, files: dict, out: Path) -> str:
  rows = {
      "vision_flax": "the refined vision encoder as a converted (Flax) folder: the probe's `--encoder`",
      "safetensors": f"the vision encoder in {cfg.backbone}'s own key layout (safetensors)",
      "pytorch": f"the same as a PyTorch state_dict: loads strictly into {cfg.backbone}'s ViT",
      "retfiner_flax": "the whole model (both encoders and the heads) as a converted folder: every command's "
                       "weights (`config.weights.retfiner`, the probe's `--encoder`, the converter's `--input`)",
      "lightning": "the whole model in the original RetFiner's Lightning layout (`state_dict` with `model.` keys); "
                   "the original's get_vision_backbone_for_linprobing.py reads it",
      "heads": "the ITC heads and the ITM head, in the original's module names",
      "hf_encoder": "the text encoder for Hugging Face `AutoModel`/`AutoTokenizer` (see text/README.md)",
      "hf_cross_attention": "the text encoder with cross-attention and MLM head for `BertLMHeadModel`",
  }
  lines = [f"# The refined model ({cfg.backbone} backbone)", ""]
  lines += [f"- `{Path(files[k]).relative_to(out)}`: {text}"
            for k, text in rows.items() if k in files]
  return "\n".join(lines) + "\n"


# What a finished run can write (`config.export.formats`, comma-separated, or "all"), each once.
EXPORT_FORMATS = {
    "retfiner_flax": "the whole model, a converted Flax folder (the text side, config.weights.retfiner, the probe)",
    "vision_flax": "the vision encoder alone, a converted Flax folder",
    "pytorch": "the vision encoder in the FM's PyTorch key layout, vision_<backbone>.pth (needs torch)",
    "safetensors": "the vision encoder in the FM's key layout, vision_<backbone>.safetensors",
    "heads": "the contrastive and ITM heads, heads.safetensors",
    "lightning": "the whole model as the original's Lightning checkpoint, retfiner_lightning.ckpt (needs torch)",
    "hf": "the text encoder as Hugging Face BERT folders, text/ (needs the tokenizer)",
}
# What an FM's users need: the Flax folder of the whole model, and the refined FM in its own PyTorch layout.
DEFAULT_FORMATS = "retfiner_flax,pytorch"


def parse_formats(formats: str, tokenizer=None) -> list[str]:
  """`config.export.formats` -> the formats in EXPORT_FORMATS' order. A format that cannot be written here is an
  error before anything is trained (named with its fix), never skipped at the end."""
  names = list(EXPORT_FORMATS) if formats.strip() == "all" else [f.strip() for f in formats.split(",") if f.strip()]
  unknown = [f for f in names if f not in EXPORT_FORMATS]
  if unknown:
    raise ConfigError(f"config.export.formats: unknown {unknown}; known: {', '.join(EXPORT_FORMATS)} (or 'all')")
  if not names:
    raise ConfigError("config.export.formats is empty: name at least one of " + ", ".join(EXPORT_FORMATS))
  needs_torch = sorted({"pytorch", "lightning"} & set(names))
  if needs_torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      raise ConfigError(f"config.export.formats asks for {needs_torch}, which need torch, and torch is not "
                        f"installed: pip install torch, or leave them out, e.g. "
                        f"--config.export.formats=retfiner_flax,safetensors") from None
  if "hf" in names and not tokenizer:
    raise ConfigError("config.export.formats asks for hf (Hugging Face BERT folders), which needs the tokenizer: set "
                      "config.tokenizer, or leave hf out")
  return [f for f in EXPORT_FORMATS if f in names]


def export_shares(params) -> dict:
  """About how many bytes each format writes for `params`."""
  whole, vision, text = (tree_nbytes(t) for t in (params, params["vision_encoder"], params["text_encoder"]))
  return {"retfiner_flax": whole, "vision_flax": vision, "pytorch": vision, "safetensors": vision,
          "heads": whole - vision - text, "lightning": whole, "hf": 2 * text}  # hf: two folders.


def export_paths(cfg: ModelConfig, out: Path) -> dict:
  """Where each format is written under `out` (a file, or a folder for the Flax and Hugging Face formats)."""
  return {"retfiner_flax": out / "retfiner_flax", "vision_flax": out / "vision_flax",
          "pytorch": out / f"vision_{cfg.backbone}.pth", "safetensors": out / f"vision_{cfg.backbone}.safetensors",
          "heads": out / "heads.safetensors", "lightning": out / "retfiner_lightning.ckpt", "hf": out / "text"}


def check_space(params, paths: dict, out: Path, chosen):
  """Refuses exports that would not fit in the free space of `out`, before any is written. Formats are written
  in `chosen`'s order, each beside its earlier export until complete (export_model), so an earlier export of a
  chosen format counts as free only for the formats written after it; one of a format not chosen stays."""
  def size(path: Path) -> int:
    files = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
    return sum(f.stat().st_size for f in files if f.is_file())
  share = export_shares(params)
  written = replaced = 0
  short = None
  for name in chosen:  # While `name` is written: the formats before it have replaced their earlier exports.
    written += share[name]
    short = shortfall(out, written, replaced)
    if short:
      break
    replaced += size(paths[name])
  if short:
    need, free = short
    raise DiskFull(f"not enough disk space in {out} for the exports ({', '.join(chosen)}): they need about "
                   f"{size_text(need)}, {size_text(free)} are free. Free some space or ask for fewer formats "
                   f"(config.export.formats), then rerun the same command: the run's final checkpoint is complete, "
                   f"so it trains nothing and writes the exports")


def export_model(cfg: ModelConfig, params, out, tokenizer=None, pooler: dict | None = None, epoch: int = 0,
                 step: int = 0, log=print, formats: str = "all") -> dict:
  """Writes the model to `out` in each of `formats` (parse_formats; an earlier export's files are replaced) and
  logs each one's seconds; returns {kind: path}. Each format is written under a `.partial` name and renamed when
  complete, so a process killed while exporting leaves no half-written file under an export's name (and an
  earlier export of that format whole); the next export removes what such a kill left."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  chosen = parse_formats(formats, tokenizer)
  params = jax.tree.map(np.asarray, params)
  where = export_paths(cfg, out)
  for path in where.values():  # What an export killed half-way left.
    whole_files.remove(whole_files.partial_path(path))
  check_space(params, where, out, chosen)
  vision = vision_state_dict(cfg, params) if {"pytorch", "safetensors"} & set(chosen) else None

  def staged(name, write):  # write(path) makes the file or folder at `path`.
    return {name: str(whole_files.make_whole(where[name], write))}

  def flax_folder(name, part):
    return staged(name, lambda path: save_converted(
        path, cfg, part, {"source": "retfiner_jax training", "source_format": cfg.backbone, "contents": sorted(part)},
        pooler=pooler if name == "retfiner_flax" else None))

  def hf_folders():
    staged("hf", lambda path: hf_bert(cfg, params, path, tokenizer, pooler))
    return {"hf_encoder": str(where["hf"] / ENCODER), "hf_cross_attention": str(where["hf"] / CROSS_ATTENTION)}

  writers = {
      "retfiner_flax": lambda: flax_folder("retfiner_flax", params),
      "vision_flax": lambda: flax_folder("vision_flax", {"vision_encoder": params["vision_encoder"]}),
      "pytorch": lambda: staged("pytorch", lambda p: save_torch(vision, p)),
      "safetensors": lambda: staged("safetensors", lambda p: save_safetensors(vision, p)),
      "heads": lambda: staged("heads", lambda p: save_safetensors(heads_state_dict(params), p)),
      "lightning": lambda: staged("lightning", lambda p: save_lightning(cfg, params, p, epoch, step)),
      "hf": hf_folders,
  }
  paths, seconds = {}, {}
  for name in chosen:
    started = time.time()
    paths.update(writers[name]())
    seconds[name] = time.time() - started
  if "vision_flax" in paths:
    paths["flax"] = paths["vision_flax"]  # The name earlier summaries used.
  (out / "README.md").write_text(_readme_run(cfg, paths, out))
  readable_by_all(out)
  others = [f for f in EXPORT_FORMATS if f not in chosen]
  log(f"exported the refined model to {out}: " + ", ".join(f"{k} ({seconds[k]:.1f} s)" for k in chosen)
      + (f"; more on request (config.export.formats): {', '.join(others)}" if others else ""))
  return paths

