"""Model weights on disk: PyTorch checkpoints converted to Flax, the converted (Orbax) form, and exports.

A converted checkpoint is a folder holding `params/` (an Orbax checkpoint of the Flax parameters, in the
RetFiner model's tree: any of `vision_encoder`, `text_encoder`, heads) and `model.json` (the model config
it implies, which subtrees it holds, and where it came from). Every command that takes model weights
accepts such a folder, or a PyTorch checkpoint that it converts on the fly with `convert_checkpoint`.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retfiner_jax.errors import ConfigError, MissingInput
from retfiner_jax.models.bert import BertTextEncoder
from retfiner_jax.models.config import ModelConfig, get_variant
from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.models.vit import VisionTransformer
from retfiner_jax.weights import convert as cv
from retfiner_jax.weights import sizes

DEFAULT_VARIANT = {"retfound": "retfound", "urfound": "urfound", "visionfm": "visionfm", "hf-bert": "bert-base"}
HEADS = ("contra_head_v", "contra_head_t", "itm_head")
WHOLE_MODEL = frozenset({"vision_encoder", "text_encoder", *HEADS})  # The parts of a whole RetFiner model.
POOLER_FILE = "bert_pooler.safetensors"
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


def abstract_params(cfg: ModelConfig):
  """Shapes of the full model's parameters, without computing anything."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, cfg.max_text_length), jnp.int32)
  return jax.eval_shape(lambda i, t: RetFiner(cfg).init(jax.random.PRNGKey(0), i, t, t)["params"], images, ids)


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: ModelConfig) -> tuple:
  return tuple(cv.flatten(jax.tree.map(lambda s: s.shape, abstract_params(cfg))).items())


def param_shapes(cfg: ModelConfig) -> dict:
  """{Flax path: shape} of the model's parameters in `cfg`'s layout (traced once per config: a run that loads
  an FM and a BERT asks twice)."""
  return dict(_param_shapes(cfg))


def init_subtree(cfg: ModelConfig, name: str, seed: int = 0):
  """Fresh parameters of one encoder (to fill what a checkpoint lacks)."""
  rng = jax.random.PRNGKey(seed)
  if name == "vision_encoder":
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    return jax.jit(VisionTransformer(cfg).init)(rng, images)["params"]
  if name == "text_encoder":
    ids = jnp.zeros((1, cfg.max_text_length), jnp.int32)
    tokens = jnp.zeros((1, 1 + cfg.grid_size ** 2, cfg.text_dim))
    init = jax.jit(lambda r: BertTextEncoder(cfg).init(r, ids, jnp.ones_like(ids), tokens,
                                                       method=BertTextEncoder.init_all))
    return init(rng)["params"]
  raise ValueError(name)


def _config_from_hf(hf: dict, base: ModelConfig, where: str) -> ModelConfig:
  act, eps = hf.get("hidden_act", "gelu"), hf.get("layer_norm_eps", 1e-12)
  if act != "gelu" or abs(eps - 1e-12) > 1e-15 or hf.get("position_embedding_type", "absolute") != "absolute":
    raise cv.CheckpointError(f"{where}: only BERT with exact GELU, LayerNorm eps 1e-12 and absolute positions "
                             f"is supported (got hidden_act={act}, layer_norm_eps={eps})")
  return base.replace(**sizes.hf_config_sizes(hf))


def convert_checkpoint(path, fmt: str | None = None, variant: str | None = None,
                       model_config: ModelConfig | str | Path | None = None, extra_ignore=(), seed: int = 0,
                       log=print, fill_missing: bool = True):
  """Reads any supported PyTorch checkpoint. Returns (ModelConfig, params (nested dict), meta dict).

  Sizes come from `model_config` (a ModelConfig or a JSON file), else the named `variant`, else the tensors
  (weights/sizes.py) over the format's own FM; a Hugging Face folder's config.json sets the text sizes.
  The parameters a format may lack (RETFound's new projection, BERT's cross-attention and MLM head, ...) are
  freshly initialised from `seed` (`fill_missing`), or left out for the caller's own initialisation to stand
  (`fill_missing=False`: what a training run does, weights/files.py load_pretrained).
  """
  path = Path(path)
  if not path.exists():
    raise MissingInput(f"{path}: no such checkpoint file or folder")
  hf_config = None
  if path.is_dir():
    if fmt not in (None, "hf-bert"):
      raise cv.CheckpointError(f"{path}: format {fmt} does not match (hf-bert is a folder, the others files)")
    (state, hf_config), detected = cv.read_hf_bert_folder(path), "hf-bert"
  else:
    state, detected = cv.read_state(path, fmt)

  explicit = model_config is not None or variant is not None
  if isinstance(model_config, (str, Path)):
    cfg = ModelConfig.from_json(model_config)
  elif model_config is not None:
    cfg = model_config
  elif variant is not None:
    cfg = get_variant(variant)
  elif detected in DEFAULT_VARIANT:
    cfg = get_variant(DEFAULT_VARIANT[detected])
  elif detected == "backbone" and "proj.weight" in state:
    cfg = get_variant("retfound")
  else:
    raise cv.CheckpointError(f"{path}: format {detected} does not say which backbone or how many heads; "
                             f"pass --variant (retfound, visionfm, urfound, ...) or --model-config FILE")
  if hf_config is not None:
    cfg = _config_from_hf(hf_config, cfg, str(path))
  vision_prefix = "model.vision_encoder." if detected == "lightning" else ""
  if not explicit:  # Sizes from the tensors (heads by the 64-channel convention where the width is new).
    inferred = sizes.vit_sizes(state, vision_prefix) if detected != "hf-bert" else {}
    if detected == "lightning":
      inferred.update(sizes.bert_sizes(state, "model.multimodal_encoder.bert."))
    elif detected == "hf-bert" and hf_config is None:  # A BERT state_dict saved as one file.
      inferred.update(sizes.bert_sizes(state, "bert." if any(k.startswith("bert.") for k in state) else ""))
    cfg = cfg.replace(**sizes.with_conventional_heads(inferred, cfg))
  else:  # The MLP width is in the checkpoint (head counts are not): take it when every block agrees on it.
    widths = {np.shape(v)[0] for k, v in state.items()
              if k.startswith(f"{vision_prefix}blocks.") and k.endswith(".mlp.fc1.weight")}
    if len(widths) == 1:
      cfg = cfg.replace(vision_mlp_dim=int(widths.pop()))

  ignore = list(cv.IGNORED.get(detected, [])) + list(extra_ignore)
  tied = []
  if detected == "lightning":
    table, contents = cv.lightning_table(cfg), ["vision_encoder", "text_encoder", *HEADS]
    tied = cv.tied_keys("model.multimodal_encoder.", "model.multimodal_encoder.bert.")
    # UrFound's RetFiner path never uses the final norm: it may be absent (then initialised, and reported).
    allow = lambda e: e.flax_path[:2] == ("vision_encoder", "norm") and not cfg.apply_final_norm
  elif detected == "hf-bert":
    bert_prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    table, contents = cv.bert_table(cfg, bert_prefix, ""), ["text_encoder"]
    tied = cv.tied_keys("", bert_prefix)
    allow = lambda e: "crossattention" in e.flax_path or "mlm_head" in e.flax_path
  else:
    table, contents = cv.vision_table(cfg), ["vision_encoder"]
    # RETFound's projection is RetFiner's own, new layer; UrFound's RetFiner path skips the final norm.
    allow = lambda e: e.flax_path[1] == "proj" or (e.flax_path[1] == "norm" and not cfg.apply_final_norm)

  # The tables name the unrolled layout; the result is put in the configured one at the end.
  unrolled = cfg.replace(scan_layers=False)
  expected = param_shapes(unrolled)
  flat, report = cv.import_state(state, table, expected, ignore, allow, tied, grid=cfg.grid_size)
  if report.initialised and fill_missing:
    by_root = {e.flax_path[0] for e in table if e.torch_key in report.initialised}
    for root in sorted(by_root):
      fresh = cv.flatten({root: init_subtree(unrolled, root, seed)})
      for e in table:
        if e.torch_key in report.initialised:
          flat[e.flax_path] = np.asarray(fresh[e.flax_path])
  log(f"{path}: format {detected}, {cfg.backbone if 'vision_encoder' in contents else 'text'} model")
  log(report.summary())
  meta = {"source": str(path), "source_format": detected, "contents": contents, "report": {
      "loaded": len(report.loaded), "ignored": report.ignored, "initialised": report.initialised,
      "notes": report.notes}}
  return cfg, cv.to_layer_layout(cv.unflatten(flat), cfg.scan_layers), meta


# ---------------------------------------------------------------------------------------------------------
# The converted form.

def this_process_checkpointer():
  """An Orbax checkpointer that involves this process alone: converted folders are written by one process and
  read by each on its own, also when several train together (Orbax's default waits for all of them)."""
  import orbax.checkpoint as ocp
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


# A Hugging Face BERT folder's tokenizer files, kept in a folder converted from it.
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def save_converted(out_dir, cfg: ModelConfig, params: dict, meta: dict, pooler: dict | None = None,
                   vocabulary_from=None):
  """`pooler`: a source BERT's pooler tensors (PyTorch layout), kept beside the parameters for the Hugging
  Face export (RetFiner's model has no pooler and never changes it). `vocabulary_from`: a BERT folder whose
  tokenizer files (TOKENIZER_FILES) are copied in, so that the converted folder serves as the tokenizer too
  (`config.tokenizer`, the converter's --export-bert)."""
  from safetensors.numpy import save_file
  out_dir = Path(out_dir).absolute()
  out_dir.mkdir(parents=True, exist_ok=True)
  target = out_dir / "params"
  if target.exists():
    raise FileExistsError(f"{target} exists; choose an empty --output folder")
  with this_process_checkpointer() as ckptr:
    ckptr.save(target, jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
  if pooler:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in pooler.items()}, str(out_dir / POOLER_FILE))
  # The attention kernel is chosen where the model runs, not where it was trained: an export says 'auto'.
  described = cfg.replace(attention="auto").to_dict()
  (out_dir / "model.json").write_text(json.dumps({"model_config": described, **meta}, indent=1))
  if vocabulary_from is not None and Path(vocabulary_from).is_dir():
    for name in TOKENIZER_FILES:
      if (Path(vocabulary_from) / name).is_file():
        shutil.copyfile(Path(vocabulary_from) / name, out_dir / name)
  readable_by_all(out_dir)


def readable_by_all(folder):
  """Files 0644 and folders 0755 under `folder` (Orbax writes 0600): exports are for colleagues too."""
  import os
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      os.chmod(os.path.join(root, d), 0o755)
    for f in files:
      os.chmod(os.path.join(root, f), 0o644)
  os.chmod(folder, 0o755)


def load_converted(folder):
  folder = Path(folder).absolute()
  info_path = folder / "model.json"
  if not info_path.exists() or not (folder / "params").exists():
    raise MissingInput(f"{folder}: not a converted checkpoint (needs model.json and params/); convert a "
                            f"PyTorch file with: python tools/convert_weights.py --input FILE --output DIR")
  info = json.loads(info_path.read_text())
  cfg = ModelConfig.from_dict(info.pop("model_config"), source=str(info_path))
  with this_process_checkpointer() as ckptr:
    params = ckptr.restore(folder / "params")
  # Folders written before layers could be scanned hold the unrolled layout whatever model.json says.
  return cfg, cv.to_layer_layout(jax.tree.map(np.asarray, params), cfg.scan_layers), info


def load_weights(path, **convert_kw):
  """A converted folder or any PyTorch checkpoint (converted on the fly) -> (cfg, params, meta)."""
  path = Path(path)
  if path.is_dir() and (path / "model.json").exists():
    return load_converted(path)
  return convert_checkpoint(path, **convert_kw)


def source_pooler(path) -> dict | None:
  """The pooler of the BERT at `path` (a Hugging Face folder, or a converted folder that kept it), PyTorch
  layout, or None when it has none. BERT's pooler (a dense layer and tanh on [CLS], trained by next-sentence
  prediction) is not part of RetFiner's model; it is carried unchanged so that the plain text-encoder export
  loads into `BertModel` whole."""
  path = Path(path)
  if (path / POOLER_FILE).exists():
    from safetensors.numpy import load_file
    return dict(load_file(str(path / POOLER_FILE)))
  if not path.is_dir() or not (path / "config.json").exists() or (path / "model.json").exists():
    return None
  if (path / "model.safetensors").exists():  # Only the pooler's two tensors are read.
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
      state = {k: f.get_tensor(k) for k in f.keys() if k.endswith(POOLER_KEYS)}
  elif (path / "pytorch_model.bin").exists():
    bin_file = path / "pytorch_model.bin"
    tensors = cv.read_torch_file(bin_file, mmap=True)
    state = cv.tensors_to_numpy({k: v for k, v in tensors.items() if k.endswith(POOLER_KEYS)}, str(bin_file))
  else:
    return None
  for prefix in ("", "bert."):
    if all(prefix + k in state for k in POOLER_KEYS):
      return {k: np.asarray(state[prefix + k], np.float32) for k in POOLER_KEYS}
  return None


def unrolled_flat(params: dict) -> dict:
  """Flat {path: array} of a parameter tree in the unrolled layer layout (what the key tables name)."""
  return cv.flatten(cv.to_layer_layout(jax.tree.map(np.asarray, params), scan=False))


# ---------------------------------------------------------------------------------------------------------
# A training run's weights: the pretrained ones it starts from, the refined encoder it exports.

def overlay(params: dict, loaded: dict, where: str, cfg: ModelConfig) -> dict:
  """Replaces the subtrees of `params` that `loaded` holds; every shape must match (pos_embed is resampled)."""
  flat = cv.flatten(params)
  new = cv.flatten(cv.to_layer_layout(loaded, cfg.scan_layers))
  problems = []
  for path, value in new.items():
    if path not in flat:
      problems.append(f"{'/'.join(path)} is not a parameter of the configured model")
      continue
    value = np.asarray(value)
    if path[-1] == "pos_embed" and value.shape != flat[path].shape:
      value = cv.resample_pos_embed(value, cfg.grid_size)
    if value.shape != tuple(flat[path].shape):
      problems.append(f"{'/'.join(path)}: weights {value.shape}, configured model {tuple(flat[path].shape)}")
      continue
    flat[path] = value
  if problems:
    raise ConfigError(f"{where} does not fit config.model:\n  " + "\n  ".join(problems))
  return cv.unflatten(flat)


def configured_weights(config) -> list[tuple[str, str, str]]:
  """sizes.weight_sources, each checked to exist (MissingInput names the config.weights key)."""
  sources = sizes.weight_sources(config)
  for name, path, _ in sources:
    if not Path(path).exists():
      raise MissingInput(
          f"config.weights.{name} = {path}: not found. Give a converted folder (python tools/convert_weights.py "
          f"--input CHECKPOINT --output DIR) or the PyTorch checkpoint itself.")
  return sources


def load_pretrained(config, cfg: ModelConfig, params: dict, log=print) -> dict:
  """Puts the configured pretrained weights (FM, BERT, or a whole RetFiner model) into `params` (their leaves
  replaced by numpy arrays; the others kept as they are)."""
  fmt = config.weights.format or None
  for name, path, part in configured_weights(config):
    # What a PyTorch checkpoint lacks keeps the run's own initialisation (config.seed), as with a converted
    # folder that lacks it.
    _, loaded, meta = load_weights(path, fmt=fmt, model_config=cfg, log=log, fill_missing=False)
    if part == "vision":
      if "vision_encoder" not in loaded:
        raise ConfigError(f"config.weights.vision = {path} holds no vision encoder")
      source = meta.get("source_format")
      if source in ("retfound", "visionfm", "urfound") and source != cfg.backbone:
        raise ConfigError(f"config.weights.vision = {path} is a {source} checkpoint but config.model.backbone is "
                         f"{cfg.backbone!r}; use configs/{source}.py or set --config.model.backbone={source}")
      loaded = {"vision_encoder": loaded["vision_encoder"]}
    elif part == "text":
      if "text_encoder" not in loaded:
        raise ConfigError(f"config.weights.text = {path} holds no text encoder")
      loaded = {"text_encoder": loaded["text_encoder"]}
    params = overlay(params, loaded, f"config.weights.{name} = {path}", cfg)
    log(f"loaded {', '.join(sorted(loaded))} from {path}")
  return params
