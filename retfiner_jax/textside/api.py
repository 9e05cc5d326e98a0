"""The refined model from Python: image and report embeddings, image-report matching and zero-shot
classification, with the preprocessing and tokenisation of training.

    from retfiner_jax.api import RetFinerModel
    model = RetFinerModel.load("runs/retfound")            # a training workdir, a converted folder or a .ckpt
    scores = model.similarity(["a.png", "b.png"], ["subretinal fluid", "normal fovea"])
    probs, classes = model.zero_shot(images, {"fluid": ["subretinal fluid"], "dry": ["no fluid"]})

Every method is jitted and runs in batches (padded to a fixed size, so one program serves every call) on the
default device.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retfiner_jax.data.images import ImageError, preprocess, read_image
from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
from retfiner_jax.errors import ConfigError, MissingInput, UserError
from retfiner_jax.models.attention import padding_bias
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.weights import files as weight_files


class BadImage(UserError, ValueError):
  """An image the text-side commands were given that does not exist or does not decode."""


def _resolve(path, tokenizer):
  """A training workdir -> its exported whole model and the tokenizer it trained with."""
  path = Path(path)
  for export in (path / "export", path / "refine" / "export"):
    if (export / "retfiner_flax" / "model.json").exists():
      if tokenizer is None:
        saved = json.loads((export.parent / "config.json").read_text()) if (export.parent / "config.json").exists() \
            else {}
        tokenizer = saved.get("tokenizer") or (saved.get("weights") or {}).get("text") or None
        if tokenizer is None and (export / "text" / "bert_encoder" / "vocab.txt").exists():
          tokenizer = str(export / "text" / "bert_encoder")
      return export / "retfiner_flax", tokenizer
  return path, tokenizer


def match_probability(logits) -> np.ndarray:
  """ITM logits (..., 2) -> the match probability (softmax's second class), in float32 as the model computes it:
  it reaches 1.0 once the logits differ by about 17, so rankings use the logits themselves."""
  logits = np.asarray(logits, np.float32)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (shifted[..., 1] / shifted.sum(axis=-1)).astype(np.float32)


class RetFinerModel:
  def __init__(self, cfg: ModelConfig, params: dict, tokenizer, intensity: str = "bit_depth", batch_size: int = 32,
               dtype: str | None = None):
    """`dtype`: the compute dtype ("float32" or "bfloat16"); None keeps the model config's (training's)."""
    missing = weight_files.WHOLE_MODEL - set(params)
    if missing:
      raise ConfigError(f"the weights lack {sorted(missing)}: the text side needs a whole RetFiner model (a "
                        f"training workdir, its export/retfiner_flax, or a RetFiner checkpoint)")
    cfg = cfg.replace(text_dropout=0.0, drop_path=0.0, dtype=dtype or cfg.dtype)
    self.cfg, self.params = cfg, jax.device_put(params)
    self.tokenizer = load_tokenizer(tokenizer)
    self.intensity, self.batch_size = intensity, batch_size
    model = RetFiner(self.cfg)

    def embed_images(p, images):
      m = model.bind({"params": p})
      return m.image_embedding(m.image_tokens(images))

    def embed_texts(p, ids, mask):
      m = model.bind({"params": p})
      return m.text_embedding(m.text_only(ids, mask)[:, 0])

    def match(p, images, ids, mask):
      m = model.bind({"params": p})
      fused = m.text_with_image(ids, padding_bias(mask), m.image_tokens(images))
      return m.itm_logits(fused[:, 0])
    def match_groups(p, images, ids, mask):  # images (B, ...), texts (B, G, L) -> (B, G)
      m = model.bind({"params": p})
      rows = lambda a: a.swapaxes(0, 1).reshape((-1,) + a.shape[2:])  # Row g*B + i: text g of image i.
      fused = m.text_with_image(rows(ids), padding_bias(rows(mask)), m.image_tokens(images))
      logits = m.itm_logits(fused[:, 0])
      return logits.reshape((ids.shape[1], -1, 2)).swapaxes(0, 1)
    self._embed_images, self._embed_texts, self._match = jax.jit(embed_images), jax.jit(embed_texts), jax.jit(match)
    self._match_groups = jax.jit(match_groups)

  @classmethod
  def load(cls, path, tokenizer=None, variant: str | None = None, log=lambda *a: None, **kw) -> "RetFinerModel":
    """`path`: a training workdir (its tokenizer is found too), a converted whole-model folder, or RetFiner's
    Lightning checkpoint (`variant` names its backbone). `tokenizer`: a vocab.txt or a folder holding one."""
    folder, tokenizer = _resolve(path, tokenizer)
    if not Path(folder).exists():
      raise MissingInput(f"{folder}: no such model (a training workdir, a converted folder or a checkpoint)")
    cfg, params, _ = weight_files.load_weights(folder, variant=variant, log=log)
    if tokenizer is None:
      raise ConfigError(f"{path}: give the tokenizer the model was trained with (tokenizer=VOCAB.txt or a folder)")
    return cls(cfg, params, tokenizer, **kw)

  # -------------------------------------------------------------------------------------------------------
  def preprocess(self, images) -> np.ndarray:
    """Paths or arrays (2-D grey, or H x W x 3) -> (N, S, S, 3) model inputs, as training prepares them."""
    out = []
    for image in images:
      try:
        a = read_image(image) if isinstance(image, (str, Path)) or hasattr(image, "read_pixels") else np.asarray(image)
      except ImageError as e:  # A missing or unreadable file: one line naming it, not a traceback.
        raise BadImage(str(e)) from e
      out.append(preprocess(a, self.cfg.image_size, self.cfg.backbone, self.intensity))
    return np.stack(out).astype(np.float32)

  def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
    out = tokenize(self.tokenizer, list(texts), self.cfg.max_text_length)
    return out["input_ids"], out["attention_mask"]

  def _batched(self, fn, *arrays) -> np.ndarray:
    n, b, results = len(arrays[0]), self.batch_size, []
    for start in range(0, n, b):
      chunk = [a[start:start + b] for a in arrays]
      real = len(chunk[0])
      chunk = [np.concatenate([c, np.zeros((b - real,) + c.shape[1:], c.dtype)]) for c in chunk]
      results.append(np.asarray(fn(self.params, *chunk))[:real])
    return np.concatenate(results) if results else np.zeros((0,))

  def embed_images(self, images) -> np.ndarray:
    """(N, contrastive_dim), L2-normalised: the ITC image embeddings. Images are read and preprocessed a few
    batches at a time, so memory holds a chunk of pixels, not the whole list."""
    chunk = 8 * self.batch_size
    parts = [self._batched(self._embed_images, self.preprocess(images[i:i + chunk]))
             for i in range(0, len(images), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, self.cfg.contrastive_dim), np.float32)

  def embed_texts(self, texts) -> np.ndarray:
    """(N, contrastive_dim), L2-normalised: the ITC report embeddings."""
    return self._batched(self._embed_texts, *self.tokenize(texts))

  def similarity(self, images, texts) -> np.ndarray:
    """(images, texts) cosine similarities of the ITC embeddings."""
    return self.embed_images(images) @ self.embed_texts(texts).T

  def match(self, images, texts) -> np.ndarray:
    """ITM probability that report i belongs to image i, for each pair (len(images) == len(texts))."""
    if len(images) != len(texts):
      raise ValueError(f"match takes pairs: {len(images)} images, {len(texts)} texts")
    return self.match_prepared(self.preprocess(images), *self.tokenize(texts))

  def match_prepared(self, pixels, input_ids, attention_mask) -> np.ndarray:
    """`match` on inputs already preprocessed and tokenised (rows are pairs)."""
    return match_probability(self.match_logits_prepared(pixels, input_ids, attention_mask))

  def match_logits_prepared(self, pixels, input_ids, attention_mask) -> np.ndarray:
    """(N, 2) ITM logits (no match, match) of preprocessed, tokenised pairs: scores that do not saturate."""
    return self._batched(self._match, pixels, input_ids, attention_mask)

  def match_groups(self, pixels, input_ids, attention_mask) -> np.ndarray:
    """(N, G) ITM probabilities of each preprocessed image (N, S, S, 3) with its own G tokenised texts
    ((N, G, L) ids and mask). Each image's vision tower runs once for its G texts (the cross-attention's
    grouped rows), not once per pair."""
    return match_probability(self.match_logits_groups(pixels, input_ids, attention_mask))

  def match_logits_groups(self, pixels, input_ids, attention_mask) -> np.ndarray:
    """(N, G, 2) ITM logits of `match_groups`."""
    return self._batched(self._match_groups, pixels, input_ids, attention_mask)

  def match_every_text(self, pixels, texts) -> np.ndarray:
    """(N images, T texts) ITM probabilities of every preprocessed image with every text (`match_groups`)."""
    ids, mask = self.tokenize(texts)
    every = lambda a: np.broadcast_to(a, (len(pixels),) + a.shape)
    return self.match_groups(pixels, every(ids), every(mask))

  def attention_maps(self, image, text: str, gradcam_layer: int | None = None) -> dict:
    """Where the report's tokens look in the B-scan, in the matching pass (bidirectional text over the image
    tokens). Returns
      "tokens": the report's tokens (no [CLS]/[SEP]);
      "per_token": (T, grid, grid) cross-attention probabilities averaged over heads and layers;
      "mean": (grid, grid) its mean over the tokens; "global": (T,) each token's share on the global image
        token (a token's patch map plus its global share sums to 1);
      "gradcam_per_token", "gradcam": ALBEF's Grad-CAM of one cross-attention layer: the probabilities times
        the positive part of the gradient of the ITM "match" logit with respect to them, averaged over heads
        (per token, and its mean over the tokens); "gradcam_layer": the layer (by default two thirds of the
        way up, layer 8 of 12 as ALBEF takes, and never the last: only [CLS]'s row of the last layer reaches
        the ITM logit, so the tokens' gradients are zero there); "itm": the pair's ITM probability."""
    return self.attention_maps_prepared(self.preprocess([image]), text, gradcam_layer)

  def attention_maps_prepared(self, pixels, text: str, gradcam_layer: int | None = None) -> dict:
    """`attention_maps` of one image already preprocessed ((1, S, S, 3), as `preprocess` gives it)."""
    last = self.cfg.text_layers - 1
    layer = max(0, min(self.cfg.text_layers * 2 // 3, last - 1)) if gradcam_layer is None else gradcam_layer
    if not 0 <= layer < self.cfg.text_layers:
      raise ConfigError(f"gradcam layer {layer}: the text encoder has layers 0..{last}")
    if not hasattr(self, "_cross_attention"):
      self._cross_attention = self._make_cross_attention()
    fn, params = self._cross_attention
    ids, mask = self.tokenize([text])
    probs, cams, logits = fn(params, jnp.asarray(pixels), ids, mask)
    probs, cams, logits = np.asarray(probs)[0], np.asarray(cams)[:, 0], np.asarray(logits)[0]
    keep = [t for t in np.flatnonzero(mask[0])
            if ids[0, t] not in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id)]
    grid = lambda a: a[keep, 1:].reshape(len(keep), self.cfg.grid_size, self.cfg.grid_size)
    per_token, gradcam = grid(probs), grid(cams[layer])
    itm = np.exp(logits - logits.max())
    return {"tokens": self.tokenizer.convert_ids_to_tokens([int(ids[0, t]) for t in keep]), "per_token": per_token,
            "mean": per_token.mean(0), "global": probs[keep, 0], "gradcam_per_token": gradcam,
            "gradcam": gradcam.mean(0), "gradcam_layer": layer, "itm": float(itm[1] / itm.sum())}

  def _make_cross_attention(self):
    """(a jitted (params, pixels, ids, mask) -> ((B, L, 1 + grid^2) cross-attention probabilities, mean over
    layers and heads; (layers, B, L, 1 + grid^2) Grad-CAM per layer, mean over heads; (B, 2) ITM logits), the
    parameters it takes). The probabilities are those of the attention function itself, kept by BertAttention
    (its 'intermediates'), and their gradients those of the zero perturbations it adds to them. The layers run
    unrolled, so that each layer's are its own entry."""
    from retfiner_jax.weights.convert import to_layer_layout
    cfg = self.cfg.replace(scan_layers=False)
    unrolled = jax.device_put(to_layer_layout(jax.tree.map(np.asarray, self.params), scan=False))
    model = RetFiner(cfg)
    layer_names = [f"layer_{i}" for i in range(cfg.text_layers)]

    def cross_attention(params, pixels, ids, mask):
      itm = lambda m: m.itm_logits(m.text_with_image(ids, padding_bias(mask), m.image_tokens(pixels))[:, 0])
      zeros = model.apply({"params": params}, method=itm, mutable=["perturbations"])[1]["perturbations"]

      def match_logit(perturbations):
        logits, state = model.apply({"params": params, "perturbations": perturbations}, method=itm,
                                    mutable=["intermediates"])
        return logits[:, 1].sum(), (logits, state["intermediates"]["text_encoder"])
      grads, (logits, layers) = jax.grad(match_logit, has_aux=True)(zeros)
      probs = jnp.stack([layers[n]["crossattention"]["probs"][0] for n in layer_names])  # (layers, B, H, L, K)
      grad = jnp.stack([grads["text_encoder"][n]["crossattention"]["probs"] for n in layer_names])
      return probs.mean(axis=(0, 2)), (probs * jnp.maximum(grad, 0)).mean(axis=2), logits
    return jax.jit(cross_attention), unrolled

  def class_embeddings(self, prompts: dict) -> tuple[np.ndarray, list[str]]:
    """{class: [prompt, ...]} -> (classes, dim) mean prompt embedding per class, renormalised; class names."""
    classes = list(prompts)
    if len(classes) < 2 or any(not prompts[c] for c in classes):
      raise ValueError("zero-shot needs at least two classes, each with at least one prompt")
    emb = np.stack([self.embed_texts(prompts[c]).mean(0) for c in classes])
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True), classes

  def zero_shot(self, images, prompts: dict, image_embeddings=None) -> tuple[np.ndarray, list[str]]:
    """Class probabilities (softmax of the image-class similarities over the model's temperature) and class
    names; the prediction is the class of highest similarity."""
    emb = self.embed_images(images) if image_embeddings is None else image_embeddings
    class_emb, classes = self.class_embeddings(prompts)
    logits = emb @ class_emb.T / self.cfg.temperature
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True), classes


def command_parser(doc: str, workdir: bool = True):
  """The text-side commands' flags: --model (and --tokenizer / --variant where the model cannot tell), and
  --workdir for the outputs unless `workdir` is False."""
  import argparse
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  if workdir:
    parser.add_argument("--workdir", required=True, help="the folder for the outputs")
  parser.add_argument("--model", required=True, help="a training workdir, a converted whole-model folder, or "
                      "RetFiner's Lightning checkpoint")
  parser.add_argument("--tokenizer", help="the model's vocab.txt (found by itself in a training workdir)")
  parser.add_argument("--variant", help="the backbone of a Lightning checkpoint (retfound, visionfm, urfound)")
  return parser


def run_command(parser, argv, body):
  """Parses `argv`, loads the named model and calls body(model, args); user mistakes are one error line."""
  from retfiner_jax.errors import run_reporting_user_errors
  args = parser.parse_args(argv)
  run_reporting_user_errors(lambda: body(RetFinerModel.load(args.model, args.tokenizer, args.variant), args))
