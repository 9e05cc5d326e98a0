"""PyTorch checkpoints <-> Flax parameters.

Every supported layout is described by a table of entries (PyTorch key, Flax path, kind); importing and
exporting both walk the same table, so the two directions cannot disagree. Kinds:
  linear_w  Linear weight (out, in)  <-> Dense kernel (in, out)
  conv_w    Conv2d weight (O, I, kh, kw) <-> Conv kernel (kh, kw, I, O)
  ln_w      LayerNorm weight <-> scale
  same      bias, embedding table, cls_token, pos_embed, MLM bias: copied as is
Importing is strict: an unknown key, a missing key or a shape mismatch raises one error listing them all.
The tables name the unrolled layer layout (`blocks_N`, `layer_N`); `to_layer_layout` moves a parameter tree
to and from the scanned layout (`blocks`, `layer`: one tree stacked over N), so either loads either way.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from pathlib import Path

import jax
import numpy as np

from retfiner_jax.errors import UserError
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import LAYER_STACKS

FORMATS = ("retfound", "visionfm", "urfound", "lightning", "backbone", "hf-bert")

# Keys that a format carries but RetFiner does not use.
IGNORED = {
    # fc_norm: timm's global-pool norm and masked_embed: iBOT's mask token, both unused by RetFiner.
    "retfound": ["mask_token", "decoder_*", "head.*", "fc_norm.*"],
    "urfound": ["mask_token", "decoder_*", "head.*", "fc_norm.*", "bert_encoder.*", "bert_mlp.*"],
    "visionfm": ["head.*", "masked_embed"],
    "backbone": ["head.*", "fc_norm.*", "masked_embed"],
    "lightning": ["model.vision_encoder.head.*", "model.vision_encoder.fc_norm.*", "model.vision_encoder.masked_embed",
                  "*position_ids"],
    "hf-bert": ["*position_ids", "*pooler.*", "cls.seq_relationship.*"],
}


class CheckpointError(UserError, ValueError):
  """A checkpoint that does not match the model: the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  flax_path: tuple
  kind: str  # linear_w | conv_w | ln_w | same


def _linear(t, f, bias=True):
  out = [Entry(f"{t}.weight", f + ("kernel",), "linear_w")]
  if bias:
    out.append(Entry(f"{t}.bias", f + ("bias",), "same"))
  return out


def _ln(t, f):
  return [Entry(f"{t}.weight", f + ("scale",), "ln_w"), Entry(f"{t}.bias", f + ("bias",), "same")]


def vision_table(cfg: ModelConfig, prefix: str = "") -> list[Entry]:
  """The timm/MAE/iBOT ViT layout (identical key names in RETFound, VisionFM and UrFound)."""
  p, root = prefix, ("vision_encoder",)
  t = [Entry(f"{p}cls_token", root + ("cls_token",), "same"),
       Entry(f"{p}pos_embed", root + ("pos_embed",), "same"),
       Entry(f"{p}patch_embed.proj.weight", root + ("patch_embed", "kernel"), "conv_w"),
       Entry(f"{p}patch_embed.proj.bias", root + ("patch_embed", "bias"), "same")]
  for i in range(cfg.vision_depth):
    b, fb = f"{p}blocks.{i}.", root + (f"blocks_{i}",)
    t += _ln(b + "norm1", fb + ("norm1",)) + _linear(b + "attn.qkv", fb + ("attn", "qkv"))
    t += _linear(b + "attn.proj", fb + ("attn", "proj")) + _ln(b + "norm2", fb + ("norm2",))
    t += _linear(b + "mlp.fc1", fb + ("mlp", "fc1")) + _linear(b + "mlp.fc2", fb + ("mlp", "fc2"))
  t += _ln(f"{p}norm", root + ("norm",))
  if cfg.vision_projection:
    t += _linear(f"{p}proj", root + ("proj",))
  return t


def bert_table(cfg: ModelConfig, bert_prefix: str = "bert.", head_prefix: str = "",
               cross_attention: bool = True, mlm_head: bool = True) -> list[Entry]:
  """Hugging Face BERT layout: `{bert_prefix}embeddings...`, `{bert_prefix}encoder.layer.N...`,
  `{head_prefix}cls.predictions...` (the tied decoder is handled separately)."""
  p, root = bert_prefix, ("text_encoder",)
  e = root + ("embeddings",)
  t = [Entry(f"{p}embeddings.{n}.weight", e + (n, "embedding"), "same")
       for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  t += _ln(f"{p}embeddings.LayerNorm", e + ("LayerNorm",))
  for i in range(cfg.text_layers):
    b, fl = f"{p}encoder.layer.{i}.", root + (f"layer_{i}",)
    for kind in ("attention",) + (("crossattention",) if cross_attention else ()):
      for n in ("query", "key", "value"):
        t += _linear(f"{b}{kind}.self.{n}", fl + (kind, n))
      t += _linear(f"{b}{kind}.output.dense", fl + (kind, "output_dense"))
      t += _ln(f"{b}{kind}.output.LayerNorm", fl + (kind, "output_LayerNorm"))
    t += _linear(f"{b}intermediate.dense", fl + ("intermediate_dense",))
    t += _linear(f"{b}output.dense", fl + ("output_dense",))
    t += _ln(f"{b}output.LayerNorm", fl + ("output_LayerNorm",))
  if mlm_head:
    h, fh = f"{head_prefix}cls.predictions.", root + ("mlm_head",)
    t += _linear(h + "transform.dense", fh + ("transform_dense",)) + _ln(h + "transform.LayerNorm",
                                                                          fh + ("transform_LayerNorm",))
    t.append(Entry(h + "bias", fh + ("bias",), "same"))
  return t


def heads_table(prefix: str = "model.") -> list[Entry]:
  p = prefix
  return (_linear(f"{p}contra_head_v.linear", ("contra_head_v",), bias=False)
          + _linear(f"{p}contra_head_t.linear", ("contra_head_t",), bias=False)
          + _linear(f"{p}itm_head.linear1", ("itm_head", "linear1"))
          + _ln(f"{p}itm_head.layernorm", ("itm_head", "layernorm"))
          + _linear(f"{p}itm_head.linear2", ("itm_head", "linear2")))


def lightning_table(cfg: ModelConfig) -> list[Entry]:
  """RetFiner's Lightning checkpoint: the whole model under `model.`."""
  return (vision_table(cfg, "model.vision_encoder.")
          + bert_table(cfg, "model.multimodal_encoder.bert.", "model.multimodal_encoder.")
          + heads_table("model."))


# Tied MLM decoder: (decoder key, the key it must equal).
def tied_keys(head_prefix: str, bert_prefix: str) -> list[tuple[str, str]]:
  return [(f"{head_prefix}cls.predictions.decoder.weight", f"{bert_prefix}embeddings.word_embeddings.weight"),
          (f"{head_prefix}cls.predictions.decoder.bias", f"{head_prefix}cls.predictions.bias")]


# ---------------------------------------------------------------------------------------------------------
# Layer layouts (models/retfiner.py's LAYER_STACKS: each subtree and the name of its layer stack).


def to_layer_layout(params: dict, scan: bool) -> dict:
  """A nested parameter tree (numpy or jax leaves) in either layer layout -> the scanned (`scan=True`: one
  `blocks` / `layer` subtree with a leading layer axis) or the unrolled one (`blocks_0`, `blocks_1`, ...)."""
  out = dict(params)
  for root, name in LAYER_STACKS:
    if root not in out:
      continue
    sub = dict(out[root])
    numbered = {int(m.group(1)): k for k in sub if (m := re.fullmatch(rf"{name}_(\d+)", k))}
    if scan and numbered:
      if name in sub or sorted(numbered) != list(range(len(numbered))):
        raise CheckpointError(f"{root}: layers {sorted(numbered)} are not numbered 0..N-1 (or mix layouts)")
      layers = [sub.pop(numbered[i]) for i in range(len(numbered))]
      paths = [sorted(flatten(layer)) for layer in layers]
      differ = [i for i, p in enumerate(paths) if p != paths[0]]
      if differ:
        raise CheckpointError(f"{root}: {name}_{differ[0]} does not hold the parameters {name}_0 holds (layers "
                              f"{differ} differ from layer 0): every layer needs the same tensors")
      sub[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    elif not scan and name in sub:
      if numbered:
        raise CheckpointError(f"{root}: holds both {name} and {name}_N layers")
      stacked = sub.pop(name)
      depth = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
      if len(depth) != 1:
        raise CheckpointError(f"{root}/{name}: stacked layers disagree on the layer count {sorted(depth)}")
      for i in range(depth.pop()):
        sub[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    out[root] = sub
  return out


# ---------------------------------------------------------------------------------------------------------
# Tensor transforms.

# The axis order that takes a PyTorch tensor to its Flax layout, and back, for the kinds whose layouts differ.
TO_FLAX_AXES = {"linear_w": (1, 0), "conv_w": (2, 3, 1, 0)}  # (out, in) -> (in, out); OIHW -> HWIO.
TO_TORCH_AXES = {"linear_w": (1, 0), "conv_w": (3, 2, 0, 1)}


def to_flax(kind: str, x: np.ndarray) -> np.ndarray:
  return x.transpose(TO_FLAX_AXES[kind]) if kind in TO_FLAX_AXES else x


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  return x.transpose(TO_TORCH_AXES[kind]) if kind in TO_TORCH_AXES else x


def _cubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """(out, in) matrix of PyTorch's bicubic interpolation (align_corners=False, clamped borders)."""
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k, d in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
      d = abs(d)
      if d <= 1:
        c = ((a + 2) * d - (a + 3)) * d * d + 1
      else:
        c = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
      w[o, min(max(base + k, 0), in_size - 1)] += c
  return w


def resample_pos_embed(pos_embed: np.ndarray, grid: int, extra_tokens: int = 1) -> np.ndarray:
  """(1, extra + g*g, D) -> (1, extra + grid*grid, D), bicubic over the grid as MAE/RETFound do."""
  extra, tokens = pos_embed[:, :extra_tokens], pos_embed[0, extra_tokens:]
  old = int(round(np.sqrt(tokens.shape[0])))
  if old * old != tokens.shape[0]:
    raise CheckpointError(f"pos_embed has {tokens.shape[0]} grid tokens: not a square grid")
  w = _cubic_weights(old, grid)
  g = tokens.reshape(old, old, -1).astype(np.float64)
  out = np.einsum("yi,ijd,xj->yxd", w, g, w).reshape(1, grid * grid, -1).astype(pos_embed.dtype)
  return np.concatenate([extra, out], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Import / export.

@dataclasses.dataclass
class ImportReport:
  loaded: list = dataclasses.field(default_factory=list)
  ignored: list = dataclasses.field(default_factory=list)
  initialised: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"loaded {len(self.loaded)} tensors"]
    if self.ignored:
      lines.append(f"ignored {len(self.ignored)} keys: {', '.join(_compress(self.ignored))}")
    if self.initialised:
      lines.append(f"initialised {len(self.initialised)} parameters not in the checkpoint: "
                   f"{', '.join(_compress(self.initialised))}")
    lines += self.notes
    return "\n".join(lines)


def _compress(keys, limit=12):
  keys = sorted(keys)
  return keys if len(keys) <= limit else keys[:limit] + [f"... ({len(keys) - limit} more)"]


def import_state(state: dict, table: list[Entry], expected_shapes: dict, ignore: list[str] = (),
                 allow_missing=lambda entry: False, tied: list = (), grid: int | None = None):
  """Maps a flat PyTorch state (name -> numpy array) onto Flax paths.

  expected_shapes: Flax path -> shape. Missing entries for which `allow_missing(entry)` is true are left out
  (the caller initialises them). Returns ({flax_path: array}, ImportReport).
  """
  report, out, problems = ImportReport(), {}, []
  used = set()
  for entry in table:
    if entry.torch_key not in state:
      if allow_missing(entry):
        report.initialised.append(entry.torch_key)
      else:
        problems.append(f"missing key {entry.torch_key}")
      continue
    used.add(entry.torch_key)
    x = np.asarray(state[entry.torch_key])
    if entry.flax_path[-1] == "pos_embed" and grid is not None and x.ndim == 3 \
        and x.shape[1] != 1 + grid * grid and x.shape[2] == expected_shapes[entry.flax_path][2]:
      old = int(round(np.sqrt(x.shape[1] - 1)))
      x = resample_pos_embed(x, grid)
      report.notes.append(f"resampled {entry.torch_key} bicubically from a {old}x{old} grid to {grid}x{grid}")
    x = to_flax(entry.kind, x)
    want = tuple(expected_shapes[entry.flax_path])
    if x.shape != want:
      problems.append(f"shape mismatch {entry.torch_key}: checkpoint {tuple(to_torch(entry.kind, x).shape)}, "
                      f"model expects {tuple(to_torch(entry.kind, np.empty(want)).shape)}")
      continue
    if not np.issubdtype(x.dtype, np.floating):
      problems.append(f"{entry.torch_key}: expected a floating-point tensor, got {x.dtype}")
      continue
    out[entry.flax_path] = x.astype(np.float32, copy=False)  # No copy of float32: layers are copied when stacked.
    report.loaded.append(entry.torch_key)
  for decoder_key, source_key in tied:
    if decoder_key in state:
      used.add(decoder_key)
      if source_key in state and not np.array_equal(np.asarray(state[decoder_key]), np.asarray(state[source_key])):
        problems.append(f"{decoder_key} differs from {source_key}: an untied MLM decoder is not supported")
      else:
        report.ignored.append(f"{decoder_key} (tied to {source_key})")
  for key in state:
    if key in used:
      continue
    if any(fnmatch.fnmatchcase(key, pat) for pat in ignore):
      report.ignored.append(key)
    else:
      problems.append(f"unknown key {key} {tuple(np.shape(state[key]))}")
  if problems:
    raise CheckpointError(f"{len(problems)} problem(s) with the checkpoint:\n  " + "\n  ".join(problems))
  return out, report


def export_state(flat_params: dict, table: list[Entry], tied: list = ()) -> dict:
  """Flax paths -> PyTorch state (name -> numpy array), for every table entry present in `flat_params`."""
  out = {}
  for entry in table:
    if entry.flax_path in flat_params:
      out[entry.torch_key] = np.ascontiguousarray(to_torch(entry.kind, np.asarray(flat_params[entry.flax_path])))
  for decoder_key, source_key in tied:
    if source_key in out:
      out[decoder_key] = out[source_key]
  return out


def flatten(tree: dict, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoints.

def _harmless_globals() -> list:
  """What the FMs' training scripts pickle beside the weights and that cannot run code: MAE's and iBOT's
  `args` (an argparse.Namespace), numpy scalars and their dtypes."""
  import argparse
  try:
    from numpy._core.multiarray import scalar
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar
  dtypes = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)
  return [argparse.Namespace, scalar, np.dtype] + [type(np.dtype(t)) for t in dtypes]


def read_torch_file(path: Path, mmap: bool = False):
  """Loads a torch pickle without executing arbitrary code (weights_only, plus the harmless globals above),
  CUDA tensors onto the CPU. `mmap`: map the tensors' data instead of reading it (when only shapes are needed;
  files in torch's old, non-zip format are read whole)."""
  import torch
  try:
    with torch.serialization.safe_globals(_harmless_globals()):
      if mmap:
        try:
          return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # Not a zip-format file: no memory map.
          pass
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for truncated or foreign files.
    raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def tensors_to_numpy(state: dict, where: str, convert: bool = True) -> dict:
  """Tensors -> numpy (floating ones as float32); `convert` False checks them and keeps the tensors."""
  import torch
  out = {}
  for k, v in state.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v if not convert else v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  return out


def read_hf_bert_folder(folder: Path):
  """A Hugging Face BERT folder -> (state, config.json dict)."""
  cfg_path = folder / "config.json"
  if not cfg_path.exists():
    raise CheckpointError(f"{folder}: a BERT folder needs config.json")
  hf_config = json.loads(cfg_path.read_text())
  if (folder / "model.safetensors").exists():
    from safetensors.numpy import load_file
    try:
      state = load_file(folder / "model.safetensors")
    except Exception as e:
      raise CheckpointError(f"{folder / 'model.safetensors'}: cannot read ({e})") from e
  elif (folder / "pytorch_model.bin").exists():
    state = tensors_to_numpy(read_torch_file(folder / "pytorch_model.bin"), str(folder / "pytorch_model.bin"))
  else:
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
  return {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
          for k, v in state.items()}, hf_config


def detect_format(obj, path: Path) -> str:
  if path.is_dir():
    return "hf-bert"
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: a checkpoint must hold a dict, got {type(obj).__name__}")
  keys = set(obj)
  if "state_dict" in keys and isinstance(obj["state_dict"], dict) and \
      any(k.startswith("model.") for k in obj["state_dict"]):
    return "lightning"
  if "teacher" in keys or "student" in keys:
    return "visionfm"
  if "model" in keys and isinstance(obj["model"], dict):
    inner = obj["model"]
    return "urfound" if any(k.startswith(("bert_encoder.", "bert_mlp.")) for k in inner) else "retfound"
  if "cls_token" in keys and "pos_embed" in keys:
    return "backbone"
  if any(k.startswith(("bert.", "embeddings.")) for k in keys):
    return "hf-bert"
  raise CheckpointError(f"{path}: unknown checkpoint format; top-level keys: {_compress(list(map(str, keys)))}. "
                        f"Pass --format, one of {FORMATS}")


def read_state(path: Path, fmt: str | None = None) -> tuple[dict, str]:
  """A checkpoint file (torch pickle or safetensors) -> (flat numpy state without the format's wrapper, format)."""
  path = Path(path)
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      state = dict(load_file(path))
    except Exception as e:
      raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from e
    detected = fmt or detect_format(state, path)
  else:
    obj = read_torch_file(path)
    detected = fmt or detect_format(obj, path)
  if detected not in FORMATS:
    raise CheckpointError(f"unknown --format {detected!r}; known: {FORMATS}")
  if fmt == "hf-bert":
    raise CheckpointError(f"{path}: format {fmt} does not match (hf-bert is a folder, the others files)")
  return (state if path.suffix == ".safetensors" else extract_state(obj, detected, path)), detected


def read_shapes(path: Path) -> tuple[dict, str]:
  """As `read_state`, but for the tensors' shapes only, without reading their data where the file allows it (a
  safetensors header, a memory-mapped zip-format torch file): ({key: anything with a .shape}, format)."""
  path = Path(path)
  if path.suffix != ".safetensors":
    obj = read_torch_file(path, mmap=True)
    fmt = detect_format(obj, path)
    return extract_state(obj, fmt, path, to_numpy=False), fmt
  import types
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="numpy") as f:
      shapes = {k: types.SimpleNamespace(shape=tuple(f.get_slice(k).get_shape())) for k in f.keys()}
  except Exception as e:
    raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from e
  return shapes, detect_format(shapes, path)


def extract_state(obj, fmt: str, path: Path, to_numpy: bool = True) -> dict:
  """The flat tensor dict of a loaded checkpoint, with the format's wrapper prefix removed (numpy arrays, or
  the tensors themselves with `to_numpy` False)."""
  where = f"{path} (format {fmt})"
  if fmt == "lightning":
    if "state_dict" not in obj:
      raise CheckpointError(f"{where}: no 'state_dict' entry")
    return tensors_to_numpy(obj["state_dict"], where, to_numpy)
  if fmt == "visionfm":
    key = "teacher" if "teacher" in obj else "student"
    if key not in obj:
      raise CheckpointError(f"{where}: needs a 'teacher' or 'student' entry")
    state = tensors_to_numpy(obj[key], where, to_numpy)
    if key == "student":  # Saved from DistributedDataParallel: `module.backbone.*`, `module.head.*`.
      state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    # `backbone.*` is the ViT; the rest (the iBOT projection `head.*`) goes to the ignore list or is unknown.
    return {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
  if fmt in ("retfound", "urfound"):
    if "model" not in obj:
      raise CheckpointError(f"{where}: no 'model' entry")
    return tensors_to_numpy(obj["model"], where, to_numpy)
  return tensors_to_numpy(obj, where, to_numpy)
