"""The paper's linear-probe protocol, rule for rule as the original runs it (rules.py), with every seed's head
trained together on one shared encoder pass per batch.

Per epoch the frozen encoder runs again, in train mode (stochastic depth), on freshly augmented training images
(augment.py); the heads of all seeds take one AdamW step per batch with the per-iteration learning rate; then
every head is validated (balanced accuracy, plain cross-entropy as the mean of batch means) and each seed's
`EarlyStopping` decides on the host. Validation and test images are not augmented and the encoder is in eval
mode, so their features are computed once. The one difference from running the original once per seed: the
seeds share the shuffling and augmentation stream (they differ in their heads' initialisation).

Every (dataset, encoder, seed) gets an audit folder with `log.jsonl` (one line per epoch) and
`predictions.npz` (labels and probabilities of the tested, best-validation head on the test split).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import balanced_accuracy_score

from retfiner_jax.models.common import model_images
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.vit import VisionTransformer
from retfiner_jax.probe import augment, rules
from retfiner_jax.probe.features import representation
from retfiner_jax.probe.settings import ProbeSettings
from retfiner_jax.runs import sharding


def paper_features(module: VisionTransformer, images, train: bool = False):
  """The representation the original probes, per FM. RETFound/UrFound: last block output before the final
  norm, concat(mean of patch tokens, class token), LayerNorm without affine. VisionFM: the final norm applied,
  concat(class token, mean of patch tokens), nothing more. RETFound's `proj` is never used."""
  tokens = module.features(images, train)
  if module.cfg.backbone == "visionfm":
    tokens = module.norm(tokens).astype(jnp.float32)
    return jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)
  return representation(tokens, "concat")


def make_encoder_fn(cfg: ModelConfig, train: bool, fill: float = 0.0, mesh=None):
  """(params, uint8 grey images (B, S, S), key) -> features (B, F). Train mode: augmentation + stochastic depth.
  `mesh`: the one the batches are sharded on (sharding.traced_on)."""
  vit = VisionTransformer(cfg)

  def encode(params, gray_u8, key):
    gray = gray_u8.astype(jnp.float32) / 255.0
    key_augment, key_drop = jax.random.split(key)
    if train:
      gray = augment.augment(key_augment, gray, fill)
    images = model_images(gray, cfg.backbone)
    rngs = {"dropout": key_drop} if train else {}
    return vit.apply({"params": params}, images, train, method=paper_features, rngs=rngs)
  return jax.jit(encode if mesh is None else sharding.traced_on(mesh, encode))


def _padded(rows: np.ndarray, size: int):
  """Row indices padded (with row 0) to `size`, and the mask of real rows."""
  mask = np.zeros(size, bool)
  mask[:len(rows)] = True
  return np.concatenate([rows, np.zeros(size - len(rows), rows.dtype)]), mask


def features_once(encode, params, gray_u8: np.ndarray, batch: int, mesh) -> np.ndarray:
  """Eval-mode features of every image (validation, test), in batches of one compiled shape."""
  out, key = [], jax.random.PRNGKey(0)
  for start in range(0, len(gray_u8), batch):
    rows, mask = _padded(np.arange(start, min(start + batch, len(gray_u8))), batch)
    x = jax.device_put(gray_u8[rows], sharding.batch_sharding(mesh))
    out.append(np.asarray(encode(params, x, key))[mask])
  return np.concatenate(out)


def make_head_step(num_classes: int, settings: ProbeSettings):
  tx = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                             weight_decay=settings.weight_decay)

  def loss_fn(head, feats, labels, mask):
    logits = feats @ head["kernel"] + head["bias"]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), settings.label_smoothing)
    per_row = optax.softmax_cross_entropy(logits, targets)
    return jnp.where(mask, per_row, 0.0).sum() / mask.sum()

  def step(heads, opts, active, lr, feats, labels, mask):
    """One AdamW step of every seed's head (frozen where not `active`); returns the batch losses too."""
    def one(head, opt, on):
      loss, grads = jax.value_and_grad(loss_fn)(head, feats, labels, mask)
      opt = opt._replace(hyperparams={**opt.hyperparams, "learning_rate": lr})
      updates, new_opt = tx.update(grads, opt, head)
      new_head = optax.apply_updates(head, updates)
      keep = lambda new, old: jnp.where(on, new, old)
      return jax.tree.map(keep, new_head, head), jax.tree.map(keep, new_opt, opt), loss
    return jax.vmap(one)(heads, opts, active)

  def validate(heads, feats, labels, batch):
    """Per seed: predictions and the mean of per-batch mean cross-entropies (the last batch may be short)."""
    logits = jnp.einsum("nf,sfc->snc", feats, heads["kernel"]) + heads["bias"][:, None]
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None])
    batch_index = jnp.arange(labels.shape[0]) // batch
    batches = -(-labels.shape[0] // batch)
    sums = jax.vmap(lambda r: jax.ops.segment_sum(r, batch_index, batches))(per_row)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), batch_index, batches)
    return logits.argmax(-1), (sums / counts).mean(-1), jax.nn.softmax(logits, -1)

  return tx, jax.jit(step), jax.jit(validate, static_argnums=3)


def probe(cfg: ModelConfig, params, data: dict, num_classes: int, settings: ProbeSettings, audit_dirs: list,
          log=print, mesh=None):
  """data: gray_{train,val,test} (N, S, S) uint8 and y_{train,val,test}. Trains every seed's head; writes
  each seed's audit folder; returns the test-split probabilities (seeds, N_test, C) of the best heads and the
  best epochs."""
  if settings.weight_decay < 0 or settings.drop_path < 0 or settings.batch_size < 0:
    raise ValueError("paper probe: resolve the per-FM settings first (settings.for_backbone); batch_size -1 "
                     "(whole training set) is for the features protocol")
  mesh = mesh if mesh is not None else sharding.make_mesh()
  cfg = cfg.replace(dtype="float32")  # As the features protocol: the probe's numbers in full precision.
  n_train = len(data["y_train"])
  batch = settings.batch_size or rules.batch_size(n_train)
  padded_batch = -(-batch // mesh.size) * mesh.size
  iterations = -(-n_train // batch)  # The last, partial batch is kept.
  train_encode = make_encoder_fn(cfg.replace(drop_path=settings.drop_path), True, settings.fill, mesh)
  eval_encode = make_encoder_fn(cfg, False, mesh=mesh)
  val_feats = jnp.asarray(features_once(eval_encode, params, data["gray_val"], padded_batch, mesh))
  test_feats = jnp.asarray(features_once(eval_encode, params, data["gray_test"], padded_batch, mesh))
  y_val, y_test = np.asarray(data["y_val"]), np.asarray(data["y_test"])

  seeds = len(settings.seeds)
  dim = int(val_feats.shape[1])
  inits = [rules.head_init(np.random.default_rng(s), dim, num_classes) for s in settings.seeds]
  heads = {"kernel": jnp.asarray(np.stack([k for k, _ in inits])), "bias": jnp.asarray(np.stack([b for _, b in inits]))}
  tx, head_step, validate = make_head_step(num_classes, settings)
  opts = jax.vmap(tx.init)(heads)
  best = jax.tree.map(np.array, heads)
  best_epoch = [-1] * seeds
  stoppers = [rules.EarlyStopping(settings.patience, settings.min_delta, settings.min_delta_loss,
                                   settings.patience_from_epoch)
              for _ in range(seeds)]
  active = np.ones(seeds, bool)
  for folder in audit_dirs:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "log.jsonl").write_text("")
  order_rng = np.random.default_rng(settings.data_seed)
  base_key = jax.random.PRNGKey(settings.data_seed)
  y_train = np.asarray(data["y_train"])
  lr = lambda epoch, i: rules.learning_rate(epoch + i / iterations, settings.learning_rate, settings.min_lr,
                                            settings.warmup_epochs, settings.max_epochs)

  for epoch in range(settings.max_epochs):
    if not active.any():
      break
    started = time.perf_counter()
    order = order_rng.permutation(n_train)
    losses = []
    for i in range(iterations):
      rows, mask = _padded(order[i * batch:(i + 1) * batch], padded_batch)
      images = jax.device_put(data["gray_train"][rows], sharding.batch_sharding(mesh))
      feats = train_encode(params, images, jax.random.fold_in(jax.random.fold_in(base_key, epoch), i))
      heads, opts, loss = head_step(heads, opts, jnp.asarray(active), jnp.float32(lr(epoch, i)), feats,
                                    jnp.asarray(y_train[rows]), jnp.asarray(mask))
      losses.append(loss)
    train_loss = np.mean(np.asarray(jnp.stack(losses)), axis=0)
    pred, val_loss, _ = jax.device_get(validate(heads, val_feats, jnp.asarray(y_val), batch))
    seconds = time.perf_counter() - started  # This epoch's training and validation, all seeds together.
    host_heads = None
    for s in np.flatnonzero(active):
      bacc = float(balanced_accuracy_score(y_val, pred[s]))
      is_best = stoppers[s](bacc, float(val_loss[s]), epoch)
      stop = stoppers[s].early_stop
      if is_best:  # (Never together with a stop.)
        host_heads = host_heads if host_heads is not None else jax.tree.map(np.asarray, heads)
        best["kernel"][s], best["bias"][s] = host_heads["kernel"][s], host_heads["bias"][s]
        best_epoch[s] = epoch
      record = {"epoch": epoch, "lr_first": lr(epoch, 0), "lr_last": lr(epoch, iterations - 1),
                "iterations": iterations, "batch_size": batch, "train_loss": float(train_loss[s]),
                "val_loss": float(val_loss[s]), "val_bacc": bacc, "best": bool(is_best), "early_stop": bool(stop),
                "seconds": seconds}
      with (Path(audit_dirs[s]) / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
      if stop:
        active[s] = False
    if epoch % 50 == 0 or not active.any():
      log(f"  epoch {epoch}: {int(active.sum())}/{seeds} seeds training, best epochs {best_epoch}")

  _, _, probs = jax.device_get(validate(jax.tree.map(jnp.asarray, best), test_feats, jnp.asarray(y_test), batch))
  for s, folder in enumerate(audit_dirs):
    np.savez(Path(folder) / "predictions.npz", labels=y_test, probs=probs[s])
  return probs, best_epoch
