"""Linear probing of a frozen vision encoder with the paper's protocol, computed once per encoder and dataset.

The encoder never changes, so its features are extracted once; the linear heads of every seed are then
trained together (`vmap`) entirely on device, with the paper's early stopping inside the compiled loop:
patience 20 epochs on validation balanced accuracy (min delta 0.001, ties broken by validation loss), counted
from epoch 20, and the best-validation head is tested. Metrics on the test split come from scikit-learn.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retfiner_jax.data.images import IMAGE_SUFFIXES, ImageError, preprocess, read_image
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  seeds: tuple = (0, 1, 2, 3, 4)
  max_epochs: int = 1000
  patience: int = 20
  patience_from_epoch: int = 20
  min_delta: float = 0.001
  learning_rate: float = 1e-3
  weight_decay: float = 0.05
  label_smoothing: float = 0.1
  init_std: float = 2e-5
  batch_size: int = 0  # 0: full batch.
  class_balanced: bool = False


# ---------------------------------------------------------------------------------------------------------
# Data: ImageFolder layout root/{train,val,test}/<class>/<image>.

class ProbeDataError(ValueError):
  pass


def read_image_folder(root) -> dict:
  """-> {split: [(path, class_index)]}, class names; checks that every split has the same classes."""
  root = Path(root)
  if not (root / "train").is_dir() or not (root / "test").is_dir():
    raise ProbeDataError(f"{root}: expected ImageFolder layout {root}/{{train,val,test}}/<class>/<image> "
                         f"(val optional)")
  splits, classes = {}, None
  for split in ("train", "val", "test"):
    folder = root / split
    if not folder.is_dir():
      continue
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
      classes = names
    elif names != classes:
      raise ProbeDataError(f"{folder}: classes {names} differ from {root / 'train'}: {classes}")
    items = []
    for index, name in enumerate(names):
      files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not files:
        raise ProbeDataError(f"{folder / name}: empty class folder")
      items += [(p, index) for p in files]
    if len(names) < 2:
      raise ProbeDataError(f"{folder}: a split needs at least two classes, found {names}")
    splits[split] = items
  return splits, classes


def stratified_split(items, fraction=0.15, seed=0):
  """Takes a stratified validation split out of `items` (used when a dataset has no val folder)."""
  rng = np.random.default_rng(seed)
  labels = np.array([y for _, y in items])
  val = np.zeros(len(items), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    val[rng.permutation(idx)[:max(1, int(round(fraction * len(idx))))]] = True
  return [it for it, v in zip(items, val) if not v], [it for it, v in zip(items, val) if v]


def load_images(paths, cfg: ModelConfig, workers=8) -> np.ndarray:
  def one(path):
    try:
      return preprocess(read_image(path), cfg.image_size, cfg.backbone)
    except ImageError as e:
      raise ProbeDataError(str(e)) from e
  with ThreadPoolExecutor(workers) as pool:
    return np.stack(list(pool.map(one, paths)))


# ---------------------------------------------------------------------------------------------------------
# Features.

def representation(tokens, kind: str = "concat"):
  """Block output before any final norm (B, 1+N, D) -> (B, F). concat: LayerNorm(no affine) of
  [mean of patch tokens, class token], as the paper; cls: class token; mean: mean of patch tokens."""
  tokens = tokens.astype(jnp.float32)
  if kind == "cls":
    return tokens[:, 0]
  if kind == "mean":
    return tokens[:, 1:].mean(axis=1)
  if kind != "concat":
    raise ValueError(f"representation must be concat, cls or mean, got {kind!r}")
  x = jnp.concatenate([tokens[:, 1:].mean(axis=1), tokens[:, 0]], axis=-1)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6)


def make_feature_fn(cfg: ModelConfig, kind: str = "concat"):
  vit = VisionTransformer(cfg)
  return jax.jit(lambda params, images: representation(vit.apply({"params": params}, images,
                                                                  method=VisionTransformer.features), kind))


def extract_features(cfg: ModelConfig, vision_params, images: np.ndarray, kind="concat", batch=64) -> np.ndarray:
  fn = make_feature_fn(cfg, kind)
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    real = len(chunk)
    if real < batch:  # Pad to keep one compiled shape.
      chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(vision_params, jnp.asarray(chunk)))[:real])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------
# Heads: every seed at once, early stopping inside the compiled loop.

def _balanced_accuracy(pred, y, num_classes):
  onehot = jax.nn.one_hot(y, num_classes)
  correct = (pred == y)[:, None] * onehot
  per_class = correct.sum(0) / jnp.maximum(onehot.sum(0), 1)
  present = onehot.sum(0) > 0
  return (per_class * present).sum() / present.sum()


def train_heads(x_train, y_train, x_val, y_val, num_classes: int, settings: ProbeSettings = ProbeSettings()):
  """-> dict of (seeds, ...) arrays: kernel, bias (best-validation heads), best_epoch, epochs_run, val_bacc."""
  x_train, x_val = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_val, jnp.float32)
  y_train, y_val = jnp.asarray(y_train, jnp.int32), jnp.asarray(y_val, jnp.int32)
  n, dim = x_train.shape
  counts = jnp.bincount(y_train, length=num_classes)
  class_weight = (n / (num_classes * jnp.maximum(counts, 1))) if settings.class_balanced else jnp.ones(num_classes)
  tx = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
  batch = settings.batch_size if 0 < settings.batch_size < n else n
  steps_per_epoch = n // batch

  def loss_fn(head, x, y):
    logits = x @ head["kernel"] + head["bias"]
    targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), settings.label_smoothing)
    w = class_weight[y]
    return (optax.softmax_cross_entropy(logits, targets) * w).sum() / w.sum()

  def one_seed(seed):
    key = jax.random.PRNGKey(seed)
    head = {"kernel": settings.init_std * jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes)),
            "bias": jnp.zeros(num_classes)}

    def epoch_body(carry):
      head, opt, epoch, best, best_bacc, best_loss, best_epoch, bad, _ = carry
      perm = jax.random.permutation(jax.random.fold_in(key, epoch), n) if batch < n else jnp.arange(n)

      def step(state, i):
        h, o = state
        rows = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
        grads = jax.grad(loss_fn)(h, x_train[rows], y_train[rows])
        updates, o = tx.update(grads, o, h)
        return (optax.apply_updates(h, updates), o), None

      (head, opt), _ = jax.lax.scan(step, (head, opt), jnp.arange(steps_per_epoch))
      logits = x_val @ head["kernel"] + head["bias"]
      bacc = _balanced_accuracy(logits.argmax(-1), y_val, num_classes)
      val_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_val).mean()
      better = (bacc > best_bacc + settings.min_delta) | (
          (jnp.abs(bacc - best_bacc) <= settings.min_delta) & (val_loss < best_loss))
      best = jax.tree.map(lambda new, old: jnp.where(better, new, old), head, best)
      best_bacc = jnp.where(better, jnp.maximum(bacc, best_bacc), best_bacc)
      best_loss = jnp.where(better, val_loss, best_loss)
      best_epoch = jnp.where(better, epoch, best_epoch)
      bad = jnp.where(better, 0, jnp.where(epoch >= settings.patience_from_epoch, bad + 1, bad))
      return head, opt, epoch + 1, best, best_bacc, best_loss, best_epoch, bad, bacc

    def keep_going(carry):
      epoch, bad = carry[2], carry[7]
      return (epoch < settings.max_epochs) & (bad < settings.patience)

    init = (head, tx.init(head), jnp.int32(0), head, jnp.float32(-1.0), jnp.float32(jnp.inf), jnp.int32(-1),
            jnp.int32(0), jnp.float32(0))
    out = jax.lax.while_loop(keep_going, epoch_body, init)
    return {"kernel": out[3]["kernel"], "bias": out[3]["bias"], "best_epoch": out[6], "epochs_run": out[2],
            "val_bacc": out[4]}

  return jax.jit(jax.vmap(one_seed))(jnp.asarray(settings.seeds))


def predict_proba(heads, x):
  logits = jnp.einsum("nd,sdc->snc", jnp.asarray(x, jnp.float32), heads["kernel"]) + heads["bias"][:, None]
  return np.asarray(jax.nn.softmax(logits, axis=-1))


# ---------------------------------------------------------------------------------------------------------
# Metrics (scikit-learn).

METRICS = ("bacc", "auroc", "ap", "f1", "mcc")


def classification_metrics(y_true, proba) -> dict:
  from sklearn import metrics as skm
  y_true = np.asarray(y_true)
  pred = proba.argmax(-1)
  num_classes = proba.shape[1]
  if num_classes == 2:
    auroc = skm.roc_auc_score(y_true, proba[:, 1])
    ap = skm.average_precision_score(y_true, proba[:, 1])
  else:
    auroc = skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=np.arange(num_classes))
    ap = skm.average_precision_score(np.eye(num_classes)[y_true], proba, average="macro")
  return {"bacc": skm.balanced_accuracy_score(y_true, pred), "auroc": auroc, "ap": ap,
          "f1": skm.f1_score(y_true, pred, average="weighted"), "mcc": skm.matthews_corrcoef(y_true, pred)}


def summarise(per_seed: list[dict]) -> dict:
  return {m: {"mean": float(np.mean([r[m] for r in per_seed])), "std": float(np.std([r[m] for r in per_seed])),
              "per_seed": [float(r[m]) for r in per_seed]} for m in METRICS}


def probe_features(features: dict, labels: dict, num_classes: int, settings: ProbeSettings = ProbeSettings()):
  """features/labels: {"train", "val", "test"} -> arrays. Returns (summary, heads)."""
  heads = train_heads(features["train"], labels["train"], features["val"], labels["val"], num_classes, settings)
  proba = predict_proba(heads, features["test"])
  return summarise([classification_metrics(labels["test"], p) for p in proba]), heads


def probe_image_folder(cfg: ModelConfig, vision_params, root, settings: ProbeSettings = ProbeSettings(),
                       kind: str = "concat", log=print):
  """The whole protocol on one ImageFolder dataset: -> (summary, class names)."""
  splits, classes = read_image_folder(root)
  if "val" not in splits:
    splits["train"], splits["val"] = stratified_split(splits["train"], seed=0)
    log(f"{root}: no val folder; took a stratified 15 % of train as validation (seed 0)")
  features, labels = {}, {}
  for split, items in splits.items():
    images = load_images([p for p, _ in items], cfg)
    features[split] = extract_features(cfg, vision_params, images, kind)
    labels[split] = np.array([y for _, y in items])
  summary, _ = probe_features(features, labels, len(classes), settings)
  return summary, classes
