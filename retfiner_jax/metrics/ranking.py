"""Ranking measures: the rank of each query's first match, recall@k and the median rank, and image<->report
recall both ways. Validation (refine/validation.py), retrieval (textside/retrieval.py) and the demo use these."""
from __future__ import annotations

import numpy as np


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


def chance_recall(matches, k: int) -> float:
  """The recall@k a random ranking gets on average: for each row with m matches among n columns, the
  probability that at least one of k columns drawn without replacement is a match, 1 - C(n-m, k) / C(n, k)
  (the product over j < k of (n - m - j) / (n - j) is the chance of missing them all)."""
  matches = np.asarray(matches, bool)
  n, m = matches.shape[1], matches.sum(axis=1)[:, None]
  j = np.arange(min(k, n))[None, :]
  miss = np.prod(np.maximum(n - m - j, 0) / (n - j), axis=1)
  return float(np.mean(np.where(m[:, 0] > 0, 1.0 - miss, 0.0)))
