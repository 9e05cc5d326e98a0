"""Linear heads on frozen features: every seed at once (`vmap`), the whole training loop compiled on device.

The features protocol (settings.py): weights truncated-normal (std 2e-5), bias 0; AdamW; label-smoothing
cross-entropy; early stopping on validation balanced accuracy (ties broken by a lower validation loss), the
patience counted from `patience_from_epoch`; the best-validation head is the one tested. A constant learning
rate and clean features (no augmentation) are what this protocol changes against the paper's (paper.py).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retfiner_jax.probe import rules
from retfiner_jax.probe.settings import ProbeSettings


class Stopping(NamedTuple):
  best_bacc: jnp.ndarray
  best_loss: jnp.ndarray
  best_epoch: jnp.ndarray
  bad_epochs: jnp.ndarray

  @classmethod
  def start(cls):
    return cls(jnp.float32(-1.0), jnp.float32(jnp.inf), jnp.int32(-1), jnp.int32(0))


def stopping_update(state: Stopping, epoch, bacc, loss, settings: ProbeSettings):
  """One epoch of early stopping. An epoch improves when its balanced accuracy beats the best by more than
  min_delta, or ties with it (within min_delta) at a lower validation loss. Epochs without improvement count
  towards the patience only from `patience_from_epoch` on. Returns (new state, improved, stop)."""
  improved = (bacc > state.best_bacc + settings.min_delta) | (
      (jnp.abs(bacc - state.best_bacc) <= settings.min_delta) & (loss < state.best_loss))
  bad = jnp.where(improved, 0, jnp.where(epoch >= settings.patience_from_epoch, state.bad_epochs + 1,
                                         state.bad_epochs))
  new = Stopping(jnp.where(improved, jnp.maximum(bacc, state.best_bacc), state.best_bacc),
                 jnp.where(improved, loss, state.best_loss), jnp.where(improved, epoch, state.best_epoch), bad)
  return new, improved, bad >= settings.patience


def balanced_accuracy(pred, y, num_classes):
  onehot = jax.nn.one_hot(y, num_classes)
  per_class = ((pred == y)[:, None] * onehot).sum(0) / jnp.maximum(onehot.sum(0), 1)
  present = onehot.sum(0) > 0
  return (per_class * present).sum() / present.sum()


def train_heads(x_train, y_train, x_val, y_val, num_classes: int, settings: ProbeSettings = ProbeSettings()):
  """-> dict of per-seed arrays: kernel (S, F, C), bias (S, C) of the best-validation heads, best_epoch,
  epochs_run, val_bacc."""
  x_train, x_val = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_val, jnp.float32)
  y_train, y_val = jnp.asarray(y_train, jnp.int32), jnp.asarray(y_val, jnp.int32)
  n, dim = x_train.shape
  counts = jnp.bincount(y_train, length=num_classes)
  class_weight = n / (num_classes * jnp.maximum(counts, 1)) if settings.class_balanced else jnp.ones(num_classes)
  if settings.weight_decay < 0:
    raise ValueError("train_heads: weight_decay < 0 means 'per FM'; resolve it with settings.for_backbone first")
  tx = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
  batch = n if settings.batch_size < 0 else min(settings.batch_size or rules.batch_size(n), n)
  steps_per_epoch = n // batch

  def loss_fn(head, x, y):
    logits = x @ head["kernel"] + head["bias"]
    targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), settings.label_smoothing)
    w = class_weight[y]
    loss = (optax.softmax_cross_entropy(logits, targets) * w).sum() / w.sum()
    return loss + 0.5 * settings.l2 * jnp.sum(head["kernel"] ** 2)

  def one_seed(seed):
    key = jax.random.PRNGKey(seed)
    head = {"kernel": rules.HEAD_STD * jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes)),
            "bias": jnp.zeros(num_classes)}

    def epoch_body(carry):
      head, opt, epoch, best, stopping, _ = carry
      order = jax.random.permutation(jax.random.fold_in(key, epoch), n) if batch < n else jnp.arange(n)

      def step(state, i):
        h, o = state
        rows = jax.lax.dynamic_slice_in_dim(order, i * batch, batch)
        updates, o = tx.update(jax.grad(loss_fn)(h, x_train[rows], y_train[rows]), o, h)
        return (optax.apply_updates(h, updates), o), None

      (head, opt), _ = jax.lax.scan(step, (head, opt), jnp.arange(steps_per_epoch))
      logits = x_val @ head["kernel"] + head["bias"]
      bacc = balanced_accuracy(logits.argmax(-1), y_val, num_classes)
      val_loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_val).mean()
      stopping, improved, stop = stopping_update(stopping, epoch, bacc, val_loss, settings)
      best = jax.tree.map(lambda new, old: jnp.where(improved, new, old), head, best)
      return head, opt, epoch + 1, best, stopping, stop

    def keep_going(carry):
      return (carry[2] < settings.max_epochs) & ~carry[5]

    init = (head, tx.init(head), jnp.int32(0), head, Stopping.start(), jnp.bool_(False))
    _, _, epochs, best, stopping, _ = jax.lax.while_loop(keep_going, epoch_body, init)
    return {"kernel": best["kernel"], "bias": best["bias"], "best_epoch": stopping.best_epoch,
            "epochs_run": epochs, "val_bacc": stopping.best_bacc}

  return jax.jit(jax.vmap(one_seed))(jnp.asarray(settings.seeds))


def predict_proba(heads, x) -> np.ndarray:
  """(S, N, C) class probabilities of every seed's head."""
  logits = jnp.einsum("nd,sdc->snc", jnp.asarray(x, jnp.float32), heads["kernel"]) + heads["bias"][:, None]
  return np.asarray(jax.nn.softmax(logits, axis=-1))
