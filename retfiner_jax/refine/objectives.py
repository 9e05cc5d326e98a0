"""RetFiner's four objectives (ITC, ITM, MLM, GM) as pure functions of explicit inputs.

`compute_objectives` takes the sampled MLM/GM views and (optionally) the ITM negatives; `make_loss_fn`
wraps it with the sampling (sampling.py) into the one function (params, batch, rng) -> (total, metrics).

Work the original repeats is done once here: the text-only pass feeds both ITC and the ITM sampling
weights; the image tokens' cross-attention keys/values are computed once per image and layer; with
`fused=True` the MLM, GM and ITM passes run as one batched BERT call with per-row self-attention masks
(bidirectional or causal): the four passes aligned with their own image attend its keys/values as one group
per image, and only the negative-image pass gathers the keys/values of other images. `fused=False` computes
the plain way (one call per pass, keys/values recomputed per pass) and gives the same numbers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from retfiner_jax.models.attention import self_attention_bias
from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.refine.sampling import IGNORE_LABEL, sample_hard_negatives, sample_token_masks

OBJECTIVES = ("itc", "itm", "mlm", "gm")


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
  """What the loss computes. The run config's `train.objectives` block is built from these defaults
  (config_defaults.py), so they are the only ones: `ObjectiveSettings(**config.train.objectives)`."""
  itc_weight: float = 1.0  # A weight of 0 switches the objective off.
  itm_weight: float = 1.0
  mlm_weight: float = 1.0
  gm_weight: float = 1.0
  mlm_probability: float = 0.15
  gm_probability: float = 0.6
  # One BERT call for the MLM, GM and ITM passes (same numbers as one call per pass, the original's way).
  fused: bool = True
  # Vocabulary logits only at target positions: room for this fraction of the batch's positions (a batch with
  # more targets takes the exact all-positions path, so results never depend on it). 1.0: every position.
  mlm_target_fraction: float = 0.3
  gm_target_fraction: float = 0.75

  def weight(self, name):
    return getattr(self, f"{name}_weight")

  def enabled(self, name):
    return self.weight(name) != 0


ITM_PRIOR = 1 / 3  # One positive per two negatives.
ITM_PRIOR_LOSS = -(ITM_PRIOR * math.log(ITM_PRIOR) + (1 - ITM_PRIOR) * math.log(1 - ITM_PRIOR))  # 0.6365


def chance_values(rows: int) -> dict:
  """What each loss and accuracy is when nothing is learnt, for a batch (or micro-batch) of `rows` pairs. ITC:
  uniform similarities give ln(rows) whatever the label smoothing, and accuracy 1/rows. ITM: one positive per two
  negatives, so a model that learnt only that prior (always "no match") has the entropy of (1/3, 2/3) and
  accuracy 2/3. MLM and GM have no such fixed value (their prior is the tokens' frequencies)."""
  return {"loss_itc": math.log(rows), "itc_i2t_accuracy": 1 / rows, "itc_t2i_accuracy": 1 / rows,
          "loss_itm": ITM_PRIOR_LOSS, "itm_accuracy": 1 - ITM_PRIOR}


class TextPass(NamedTuple):
  """One pass of the text encoder with cross-attention: rows paired with `image_index`'s images (None: row i
  with image i, "image-aligned")."""
  name: str
  input_ids: jnp.ndarray
  attention_mask: jnp.ndarray
  causal: bool
  image_index: jnp.ndarray | None = None


def _masked_mean(x, rows):
  return x.mean() if rows is None else jnp.where(rows, x, 0).sum() / jnp.maximum(rows.sum(), 1)


def smoothed_cross_entropy(logits, labels, smoothing=0.0, rows=None, classes=None):
  """Mean cross-entropy with integer labels and label smoothing as torch's CrossEntropyLoss defines it.
  `rows` (N,) bool: only these rows count; `classes` (C,) bool: only these classes exist (the others get no
  probability and no share of the smoothing), as if the batch held only the valid pairs."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if classes is not None:
    logits = jnp.where(classes, logits, -1e9)
    uniform = classes / jnp.maximum(classes.sum(), 1)
  else:
    uniform = jnp.full((num_classes,), 1.0 / num_classes)
  targets = (1.0 - smoothing) * jax.nn.one_hot(labels, num_classes) + smoothing * uniform
  return _masked_mean(optax.softmax_cross_entropy(logits, targets), rows)


def itc_loss(image_embedding, text_embedding, temperature, label_smoothing, valid=None):
  """Symmetric contrastive loss over the (global) batch; `valid` (B,) leaves padding rows out of everything.
  Returns (loss, sim_i2t, sim_t2i, metrics)."""
  sim_i2t = image_embedding @ text_embedding.T / temperature
  sim_t2i = text_embedding @ image_embedding.T / temperature
  targets = jnp.arange(sim_i2t.shape[0])
  loss = (smoothed_cross_entropy(sim_i2t, targets, label_smoothing, valid, valid)
          + smoothed_cross_entropy(sim_t2i, targets, label_smoothing, valid, valid)) / 2
  masked = lambda sim: sim if valid is None else jnp.where(valid, sim, -jnp.inf)
  metrics = {"itc_i2t_accuracy": _masked_mean(masked(sim_i2t).argmax(-1) == targets, valid),
             "itc_t2i_accuracy": _masked_mean(masked(sim_t2i).argmax(-1) == targets, valid)}
  return loss, sim_i2t, sim_t2i, metrics


def itm_loss(itm_logits, valid=None):
  """(3B, 2) logits for [positives; text-with-negative-image; negative-text-with-image]."""
  batch = itm_logits.shape[0] // 3
  labels = jnp.concatenate([jnp.ones(batch, jnp.int32), jnp.zeros(2 * batch, jnp.int32)])
  rows = None if valid is None else jnp.tile(valid, 3)
  loss = smoothed_cross_entropy(itm_logits, labels, rows=rows)
  return loss, {"itm_accuracy": _masked_mean(itm_logits.argmax(-1) == labels, rows)}


def token_prediction_losses(logits_fn, parts, groups: int = 1):
  """Cross-entropy averaged over the target positions (labels != -100) of each part's whole batch.

  parts: [(hidden (B, L, D), labels (B, L), target_fraction)], e.g. MLM and GM. `logits_fn` maps hidden states
  (..., D) to vocabulary logits (..., V); it runs once for all parts, and only on the first sum(fraction x B x L)
  positions after sorting targets first. A batch with more targets than that takes the exact all-positions path,
  so the results never depend on the fractions. Returns [(loss, accuracy over targets)] per part.

  `groups`: the batch's rows as that many equal consecutive blocks (the devices the batch is sharded over), each
  choosing its own target positions (room for its share of them), so that on a mesh every device computes the
  logits of its own rows only instead of the whole batch's. The results are the same for any number of groups;
  the all-positions path is taken when any group has more targets than its room.
  """
  batch = parts[0][1].shape[0]
  if batch % groups:
    raise ValueError(f"token_prediction_losses: a batch of {batch} rows does not split into {groups} groups")
  grouped = lambda x: x.reshape((groups, -1) + x.shape[2:])  # (B, L, ...) -> (groups, B / groups x L, ...)
  hidden = jnp.concatenate([grouped(h) for h, _, _ in parts], axis=1)
  labels = jnp.concatenate([grouped(lab) for _, lab, _ in parts], axis=1)
  part = jnp.concatenate([jnp.full(grouped(lab).shape, i) for i, (_, lab, _) in enumerate(parts)], axis=1)
  is_target = labels != IGNORE_LABEL
  counts = [jnp.maximum((is_target & (part == i)).sum(), 1) for i in range(len(parts))]

  def losses_at(rows):  # rows (groups, n): positions within each group.
    pick = lambda x: jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)
    logits = logits_fn(pick(hidden)).astype(jnp.float32)
    lab, of = pick(labels), pick(part)
    valid = lab != IGNORE_LABEL
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, lab, 0))
    correct = (logits.argmax(-1) == lab) & valid
    return [(jnp.where(valid & (of == i), ce, 0.0).sum() / n, (correct & (of == i)).sum() / n)
            for i, n in enumerate(counts)]

  per_group = labels.shape[1]
  room = sum(int(round(fraction * lab.size / groups)) for _, lab, fraction in parts)
  every_row = jnp.broadcast_to(jnp.arange(per_group), labels.shape)
  if room >= per_group:
    return losses_at(every_row)
  targets_first = jnp.argsort(~is_target, axis=1, stable=True)[:, :room]
  fits = jnp.all(is_target.sum(axis=1) <= room)
  return jax.lax.cond(fits, lambda: losses_at(targets_first), lambda: losses_at(every_row))


def _concatenated(passes):
  """The passes' rows one after the other, and a function splitting an output back into {name: rows}."""
  sizes = [p.input_ids.shape[0] for p in passes]
  ids = jnp.concatenate([p.input_ids for p in passes])
  mask = jnp.concatenate([p.attention_mask for p in passes])
  causal = jnp.concatenate([jnp.full((n,), p.causal) for n, p in zip(sizes, passes)])
  offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

  def split(out):
    return {p.name: out[offsets[i]:offsets[i + 1]] for i, p in enumerate(passes)}
  return ids, self_attention_bias(mask, causal), split


def run_text_passes(m, passes, image_tokens, fused: bool, train: bool):
  """{pass name: hidden states (B, L, D)}. Fused: one BERT call, the image-aligned passes first (groups that
  attend their own image's keys/values, computed once), then at most one pass with an `image_index` (it gathers
  the keys/values of its images). Not fused: as the original computes, MLM and GM one call each, the ITM passes
  one call with each row's image tokens gathered."""
  if not passes:
    return {}
  if fused:
    passes = sorted(passes, key=lambda p: p.image_index is not None)
    if any(p.image_index is not None for p in passes[:-1]):
      raise ValueError("fused text passes: at most one pass may pair its rows with other images")
    ids, bias, split = _concatenated(passes)
    return split(m.text_with_image(ids, bias, image_tokens, passes[-1].image_index, train=train))
  hidden, itm = {}, [p for p in passes if p.name.startswith("itm")]
  for p in passes:
    if not p.name.startswith("itm"):
      ids, bias, split = _concatenated([p])
      hidden.update(split(m.text_with_image(ids, bias, image_tokens, train=train)))
  if itm:
    ids, bias, split = _concatenated(itm)
    tokens = jnp.concatenate([image_tokens if p.image_index is None else image_tokens[p.image_index] for p in itm])
    hidden.update(split(m.text_with_image(ids, bias, tokens, train=train)))
  return hidden


def compute_objectives(model: RetFiner, params, batch, views, settings: ObjectiveSettings = ObjectiveSettings(),
                       negatives=None, negative_rng=None, train: bool = False, dropout_rng=None, loss_scale=None,
                       token_groups: int = 1):
  """All enabled objectives for given masked views and (optionally) given ITM negatives.

  batch: images (B, S, S, 3) NHWC, input_ids and attention_mask (B, L), optional pair_ids (B,) and valid (B,)
  (False on padding rows: they take part in no loss, are nobody's negative and are not counted).
  views: mlm_input_ids, mlm_labels, gm_input_ids, gm_labels (B, L).
  negatives: (neg_image_idx, neg_text_idx), each (B,); if None they are sampled with `negative_rng` from the
  ITC similarities. `train`: dropout and stochastic depth on, drawn from `dropout_rng`. `loss_scale` ({objective: factor}) multiplies each loss inside the total (gradient
  accumulation weights micro-batches with it); the metrics report the losses as computed. `token_groups`: the
  devices the batch is sharded over, so that each computes the MLM/GM vocabulary logits of its own rows
  (token_prediction_losses; the numbers do not depend on it).
  Returns (total_loss, metrics).
  """
  if train and dropout_rng is None:
    raise ValueError("compute_objectives: train=True needs a dropout_rng")
  m = model.bind({"params": params}, rngs={"dropout": dropout_rng} if train else {})
  cfg, on = model.cfg, settings.enabled
  ids, mask = batch["input_ids"], batch["attention_mask"]
  losses, metrics = {}, {}

  image_tokens = m.image_tokens(batch["images"], train)
  text_only = m.text_only(ids, mask, train)  # Computed once: ITC and the ITM sampling weights.
  valid = batch.get("valid")
  if valid is not None:  # Padding rows predict no token.
    views = dict(views, **{k: jnp.where(valid[:, None], views[k], IGNORE_LABEL) for k in ("mlm_labels", "gm_labels")})
  losses["itc"], sim_i2t, sim_t2i, itc_metrics = itc_loss(
      m.image_embedding(image_tokens), m.text_embedding(text_only[:, 0]), cfg.temperature, cfg.label_smoothing,
      valid)
  metrics.update(itc_metrics)

  passes = []
  if on("mlm"):
    passes.append(TextPass("mlm", views["mlm_input_ids"], mask, causal=False))
  if on("gm"):
    passes.append(TextPass("gm", views["gm_input_ids"], mask, causal=True))
  if on("itm"):
    if negatives is None:
      neg_image, neg_text, no_distinct = sample_hard_negatives(negative_rng, sim_i2t, sim_t2i,
                                                               batch.get("pair_ids"), valid)
      metrics["itm_rows_without_distinct_negative"] = no_distinct
    else:
      neg_image, neg_text = negatives
    passes += [TextPass("itm_pos", ids, mask, causal=False),
               TextPass("itm_neg_image", ids, mask, causal=False, image_index=neg_image),
               TextPass("itm_neg_text", ids[neg_text], mask[neg_text], causal=False)]
  hidden = run_text_passes(m, passes, image_tokens, settings.fused, train)

  token_objectives = [k for k in ("mlm", "gm") if on(k)]
  if token_objectives:  # One vocabulary-logit computation for both.
    fractions = {"mlm": settings.mlm_target_fraction, "gm": settings.gm_target_fraction}
    results = token_prediction_losses(m.mlm_logits, [(hidden[k], views[f"{k}_labels"], fractions[k])
                                                     for k in token_objectives], token_groups)
    for k, (loss, accuracy) in zip(token_objectives, results):
      losses[k], metrics[f"{k}_accuracy"] = loss, accuracy
  if on("itm"):
    cls = jnp.concatenate([hidden["itm_pos"][:, 0], hidden["itm_neg_image"][:, 0], hidden["itm_neg_text"][:, 0]])
    losses["itm"], itm_metrics = itm_loss(m.itm_logits(cls), valid)
    metrics.update(itm_metrics)

  scale = loss_scale or {}
  total = sum(settings.weight(k) * scale.get(k, 1.0) * losses[k] for k in OBJECTIVES if on(k))
  metrics.update({f"loss_{k}": v for k, v in losses.items()})
  metrics["loss"] = total
  return total, metrics


def sample_views(rng, input_ids, vocab_size, settings: ObjectiveSettings):
  """The MLM (15 %) and GM (60 %) masked views of a batch of token ids."""
  key_mlm, key_gm = jax.random.split(rng)
  mlm_ids, mlm_labels = sample_token_masks(key_mlm, input_ids, settings.mlm_probability, vocab_size)
  gm_ids, gm_labels = sample_token_masks(key_gm, input_ids, settings.gm_probability, vocab_size)
  return {"mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels, "gm_input_ids": gm_ids, "gm_labels": gm_labels}


def make_loss_fn(model: RetFiner, settings: ObjectiveSettings = ObjectiveSettings(), train: bool = False,
                 token_groups: int = 1):
  """(params, batch, rng[, views, loss_scale]) -> (total_loss, metrics): samples the MLM/GM views (unless given)
  and the ITM negatives, then the losses; `train` switches dropout and stochastic depth on; `token_groups`: the
  devices the batch is sharded over (compute_objectives)."""
  def loss_fn(params, batch, rng, views=None, loss_scale=None):
    key_views, key_negatives, key_dropout = jax.random.split(rng, 3)
    if views is None:
      views = sample_views(key_views, batch["input_ids"], model.cfg.vocab_size, settings)
    return compute_objectives(model, params, batch, views, settings, negative_rng=key_negatives, train=train,
                              dropout_rng=key_dropout, loss_scale=loss_scale, token_groups=token_groups)
  return loss_fn
