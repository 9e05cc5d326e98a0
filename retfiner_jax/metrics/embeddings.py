"""The spread of a set of embeddings: whether a tower tells its inputs apart at all."""
from __future__ import annotations

import numpy as np

# Above this mean pairwise cosine a set of embeddings is collapsed: every input gets (nearly) the same vector, so
# a contrastive loss over them stays at its chance value (issue 34: a random BERT's [CLS] gives 0.9999+).
COLLAPSED_COSINE = 0.999


def mean_pairwise_cosine(embeddings) -> dict:
  """Mean and minimum cosine similarity over all pairs i != j of the rows (float64). Needs at least two rows."""
  x = np.asarray(embeddings, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"mean_pairwise_cosine needs (N >= 2, D) embeddings, got shape {x.shape}")
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  cos = x @ x.T
  off = ~np.eye(len(x), dtype=bool)
  return {"mean": float(cos[off].mean()), "min": float(cos[off].min())}

