"""Validation: the four losses with masks and negatives from a fixed seed, and image<->report retrieval."""
from __future__ import annotations

import jax
import numpy as np

from retfiner_jax.metrics.embeddings import mean_pairwise_cosine
from retfiner_jax.metrics.ranking import retrieval_recall
from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.refine.objectives import ObjectiveSettings, make_loss_fn
from retfiner_jax.runs import sharding
from retfiner_jax.runs.sharding import to_host


def make_embed_fn(model: RetFiner, mesh=None):
  """(params, images, input_ids, attention_mask) -> (image, text) contrastive embeddings; `mesh`: the run's, on
  which the batches are sharded (sharding.traced_on)."""
  def embed(params, images, input_ids, attention_mask):
    m = model.bind({"params": params})
    image = m.image_embedding(m.image_tokens(images))
    text = m.text_embedding(m.text_only(input_ids, attention_mask)[:, 0])
    return image, text
  return jax.jit(embed if mesh is None else sharding.traced_on(mesh, embed))


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
  # ITC's chance value: ln(rows) of each batch, weighted as the losses are.
  out["chance_loss_itc"] = float(np.average([np.log(max(w, 1)) for w in weights], weights=weights)) if weights else 0.0
  if len(texts) > 1:  # The contrastive embeddings' spread: near 1, every pair looks alike (issue 34).
    out["text_embedding_cosine"] = mean_pairwise_cosine(texts)["mean"]
    out["image_embedding_cosine"] = mean_pairwise_cosine(images)["mean"]
  return out
