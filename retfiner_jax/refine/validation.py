"""Validation: the four losses with masks and negatives from a fixed seed, and image<->report retrieval."""
from __future__ import annotations

import jax
import numpy as np

from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.refine.objectives import ObjectiveSettings, make_loss_fn
from retfiner_jax.runs.sharding import to_host


def make_embed_fn(model: RetFiner):
  def embed(params, images, input_ids, attention_mask):
    m = model.bind({"params": params})
    image = m.image_embedding(m.image_tokens(images))
    text = m.text_embedding(m.text_only(input_ids, attention_mask)[:, 0])
    return image, text
  return jax.jit(embed)


def match_matrix(keys) -> np.ndarray:
  """(N, N) True where rows i and j have equal keys (compared as integer codes: fast for many rows)."""
  codes = np.unique(np.array(keys, dtype=object), return_inverse=True)[1].reshape(-1)
  return codes[:, None] == codes[None, :]


def first_match_ranks(scores, matches) -> np.ndarray:
  """The 1-based rank of each row's first match when its columns are ranked by `scores` (highest first, ties in
  column order). Counted, not sorted: the columns ahead of a row's best-placed match are those scoring higher,
  and those scoring the same at a lower index. A row without a match gets len(columns) + 1."""
  scores, matches = np.asarray(scores), np.asarray(matches, bool)
  masked = np.where(matches, scores, -np.inf)
  best = masked.max(axis=1, keepdims=True)
  first = np.argmax(masked == best, axis=1)[:, None]  # The lowest-index match with the best score.
  ahead = (scores > best) | ((scores == best) & (np.arange(scores.shape[1])[None, :] < first))
  return np.where(matches.any(axis=1), ahead.sum(axis=1) + 1, scores.shape[1] + 1)


def metrics_from_ranks(ranks, ks=(1, 5, 10)) -> dict:
  ranks = np.asarray(ranks)
  out = {f"recall_at_{k}": float((ranks <= k).mean()) for k in ks}
  out["median_rank"] = float(np.median(ranks))
  return out


def ranking_metrics(scores, matches, ks=(1, 5, 10)) -> dict:
  """Recall@k and the median rank of rows ranked over the columns by `scores` (first_match_ranks)."""
  return metrics_from_ranks(first_match_ranks(scores, matches), ks)


def retrieval_recall(image_emb, text_emb, report_keys, ks=(1, 5, 10)) -> dict:
  """Recall@k both ways; a retrieved report counts as correct when its text equals the image's own report."""
  sims = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
  match = match_matrix(report_keys)
  out = {}
  for name, s, m in (("i2t", sims, match), ("t2i", sims.T, match.T)):
    ranked = ranking_metrics(s, m, ks)
    out.update({f"recall_{name}_at_{k}": ranked[f"recall_at_{k}"] for k in ks})
  return out


def evaluate(model: RetFiner, params, batches, settings: ObjectiveSettings, seed: int, to_global, ks=(1, 5, 10),
             loss_fn=None, embed_fn=None, epoch=None):
  """Validation losses over every example (padding rows of the last batch are masked out of every loss; each
  batch weighs by its real rows) and retrieval recall over every example. Masks and negatives come from `seed`
  (the same every epoch), or from (`seed`, `epoch`) when an epoch is given (redrawn every epoch, as Lightning
  does). `to_global` makes a host batch a (sharded) device batch."""
  loss_fn = loss_fn or jax.jit(make_loss_fn(model, settings))
  embed_fn = embed_fn or make_embed_fn(model)
  key = jax.random.PRNGKey(seed)
  if epoch is not None:
    key = jax.random.fold_in(key, epoch)
  batch_metrics, embeddings, valids, ids = [], [], [], []
  for i, batch in enumerate(batches):  # Results stay on device until the end: no sync per batch.
    device_batch = to_global(batch)
    batch_metrics.append(loss_fn(params, device_batch, jax.random.fold_in(key, i))[1])
    embeddings.append(embed_fn(params, device_batch["images"], device_batch["input_ids"],
                               device_batch["attention_mask"]))
    valids.append(device_batch["valid"])
    ids.append(device_batch["input_ids"])
  # The global batches' rows (every process's share) on every host.
  batch_metrics, (embeddings, valids, ids) = jax.device_get(batch_metrics), to_host((embeddings, valids, ids))
  weights = [int(v.sum()) for v in valids]  # Each batch weighs by its real rows.
  out = {k: float(np.average([m[k] for m in batch_metrics], weights=weights)) for k in batch_metrics[0]} \
      if batch_metrics else {}
  images = np.concatenate([img[v] for (img, _), v in zip(embeddings, valids)])
  texts = np.concatenate([txt[v] for (_, txt), v in zip(embeddings, valids)])
  report_keys = [row.tobytes() for batch_ids, v in zip(ids, valids) for row in np.asarray(batch_ids)[v]]
  out.update(retrieval_recall(images, texts, report_keys, ks))
  out["examples"] = float(len(report_keys))
  return out
