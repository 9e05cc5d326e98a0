"""Report <-> B-scan retrieval with the refined model: recall@1/5/10 and the median rank both ways.

  python -m retfiner_jax.retrieval --model=runs/retfound --manifest=test.csv --workdir=runs/retrieval [--itm-top-k=16]

Every image is ranked against every report of the manifest by the ITC similarity; with --itm-top-k K the top K
of each ranking are re-ordered by BLIP's score (its train_retrieval.py evaluation): the ITM head's "match" logit
plus the ITC similarity. Each image is read and passed through the vision tower once per direction, with all the
reports it is scored against, a chunk of images at a time. Logits, not probabilities: a float32 probability is 1.0 for every pair whose logits
differ by more than about 17, and such ties would fall to column order. (ALBEF re-ranks by the logit alone.) A report counts as a
match of an image when both rows share an `id` (a B-scan's own row otherwise). Writes retrieval.json and
retrieval.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from retfiner_jax.errors import MissingInput
from retfiner_jax.metrics.ranking import first_match_ranks, metrics_from_ranks

KS = (1, 5, 10)
DEFAULT_ITM_TOP_K = 128  # ALBEF's and BLIP's k_test on Flickr30k (256 on COCO).


def match_codes(ids) -> np.ndarray:
  """Integer codes of the rows' pairs: rows match when their codes are equal (the same non-empty id; a row
  without an id matches only itself)."""
  keys = np.array([i if i else f"\0row{n}" for n, i in enumerate(ids)], dtype=object)
  return np.unique(keys, return_inverse=True)[1].reshape(-1)


def _top_columns(scores: np.ndarray, k: int) -> np.ndarray:
  """Each row's k highest columns, best first, ties to the lower column (as a stable sort of -scores gives),
  found by partition: O(N) per row, not a full sort."""
  if k >= scores.shape[1]:
    return np.argsort(-scores, axis=1, kind="stable")
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
  # Where the k-th score is tied with columns left out, the partition's choice among them is arbitrary: sort.
  tied = (scores == kth[:, None]).sum(axis=1) != (np.take_along_axis(scores, part, axis=1) == kth[:, None]).sum(1)
  if tied.any():
    part[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
  vals = np.take_along_axis(scores, part, axis=1)
  order = np.lexsort((part, -vals), axis=1)  # By score, then by column.
  return np.take_along_axis(part, order, axis=1)


def short_lists(queries, gallery, query_codes, gallery_codes, k: int, chunk: int = 256) -> dict:
  """Ranks every query over the whole gallery by the ITC similarity, `chunk` queries at a time (memory: chunk x
  gallery scores, never queries x gallery). With k = 0: {"ranks"}, each query's 1-based rank of its first match.
  With k > 0, what ITM re-ranking needs: {"top"} (queries, k) gallery columns, {"top_scores"} their ITC scores,
  {"top_match"} which of them match, {"rest_rank"} the rank of the best match among the other columns."""
  queries, gallery = np.asarray(queries), np.asarray(gallery)
  n, k = len(gallery), min(k, len(gallery))
  out = {"ranks": np.zeros(len(queries), np.int64)} if not k else {
      "top": np.zeros((len(queries), k), np.int64), "top_scores": np.zeros((len(queries), k), np.float64),
      "top_match": np.zeros((len(queries), k), bool), "rest_rank": np.zeros(len(queries), np.int64)}
  for start in range(0, len(queries), chunk):
    rows = slice(start, start + chunk)
    scores = queries[rows] @ gallery.T
    matches = query_codes[rows, None] == gallery_codes[None, :]
    if not k:
      out["ranks"][rows] = first_match_ranks(scores, matches)
      continue
    top = _top_columns(scores, k)
    out["top"][rows], out["top_scores"][rows] = top, np.take_along_axis(scores, top, axis=1)
    out["top_match"][rows] = np.take_along_axis(matches, top, axis=1)
    # Where no match is short-listed, the k short-listed columns are all ahead of the best match (they score
    # higher, or the same at a lower column): its rank among the others is its full rank less k.
    out["rest_rank"][rows] = first_match_ranks(scores, matches) - k
  return out


def reranked_ranks(short: dict, itm_logits) -> np.ndarray:
  """Each query's rank after re-ranking its short list by BLIP's score, the ITM "match" logit plus the ITC
  similarity (ties to the lower column); the short list stays ahead of every other column."""
  top, k = short["top"], short["top"].shape[1]
  score = np.asarray(itm_logits, np.float64) + short["top_scores"]
  matched = short["top_match"]
  best = np.where(matched, score, -np.inf).max(axis=1, keepdims=True)
  first = np.where(matched & (score == best), top, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
  ahead = (score > best) | ((score == best) & (top < first))
  return np.where(matched.any(axis=1), ahead.sum(axis=1) + 1, k + short["rest_rank"])


def image_query_logits(model, images, ids, mask, top, chunk: int = 64) -> np.ndarray:
  """(N, k) ITM match logits of each image with the k reports of its short list (`top`, report indices): each
  image's vision pass once for its k reports; images read `chunk` at a time."""
  out = np.zeros(top.shape, np.float32)
  for start in range(0, len(images), chunk):
    rows = slice(start, start + chunk)
    pixels = model.preprocess(images[rows])
    out[rows] = model.match_logits_groups(pixels, ids[top[rows]], mask[top[rows]])[..., 1]
  return out


def report_query_logits(model, images, ids, mask, top, chunk: int = 64) -> np.ndarray:
  """(R, k) ITM match logits of each report with the k images of its short list (`top`, image indices), computed
  image by image as ALBEF and BLIP cache each image's features once: every image is read and passed through the
  vision tower once, with all the reports that short-listed it (groups padded to the chunk's largest), `chunk`
  images at a time. Memory holds a chunk of images, never the R x k pairs' pixels."""
  out = np.zeros(top.shape, np.float32)
  flat = top.reshape(-1)
  order = np.argsort(flat, kind="stable")
  report_of, slot_of = np.divmod(order, top.shape[1])  # Pair order -> (report, its position in the short list).
  starts = np.searchsorted(flat[order], np.arange(len(images) + 1))  # Pairs of image j: order[starts[j]:starts[j+1]].
  for start in range(0, len(images), chunk):
    members = [np.arange(starts[j], starts[j + 1]) for j in range(start, min(start + chunk, len(images)))]
    wanted = [j for j, m in zip(range(start, start + chunk), members) if len(m)]
    if not wanted:
      continue
    groups = [members[j - start] for j in wanted]
    width = max(len(g) for g in groups)
    padded = np.stack([np.pad(report_of[g], (0, width - len(g)), mode="edge") for g in groups])  # (C, G) reports.
    logits = model.match_logits_groups(model.preprocess([images[j] for j in wanted]), ids[padded], mask[padded])
    for g, row in zip(groups, logits[..., 1]):
      out[report_of[g], slot_of[g]] = row[:len(g)]
  return out


def run(model, manifest, workdir, itm_top_k: int = DEFAULT_ITM_TOP_K, log=print) -> dict:
  from retfiner_jax.data.manifest import read_manifest
  if not Path(manifest).exists():
    raise MissingInput(f"--manifest {manifest}: file not found")
  records = read_manifest(manifest)
  missing = [r for r in records if not Path(r["image"]).exists()]  # Named by row before any image is read.
  if missing:
    more = (f" ({len(missing)} rows in all: python -m retfiner_jax.data.check {manifest} lists them)"
            if len(missing) > 1 else "")
    raise MissingInput(f"--manifest {manifest} row {missing[0]['row']}: {missing[0]['image']}: file not found{more}")
  images, reports = [r["image"] for r in records], [r["report"] for r in records]
  log(f"{manifest}: {len(records)} pairs")
  image_emb, text_emb = model.embed_images(images), model.embed_texts(reports)
  codes = match_codes([r["id"] for r in records])
  ranks = {}
  if itm_top_k > 0:
    ids, mask = model.tokenize(reports)
    k = min(itm_top_k, len(records))
    log(f"re-ranking each query's top {k} by ITM: {2 * len(records) * k} image-report pairs through the fusion "
        f"encoder (--itm-top-k=0 ranks by ITC alone)")
    short = short_lists(image_emb, text_emb, codes, codes, k)
    ranks["image_to_report"] = reranked_ranks(short, image_query_logits(model, images, ids, mask, short["top"]))
    short = short_lists(text_emb, image_emb, codes, codes, k)
    ranks["report_to_image"] = reranked_ranks(short, report_query_logits(model, images, ids, mask, short["top"]))
  else:
    ranks["image_to_report"] = short_lists(image_emb, text_emb, codes, codes, 0)["ranks"]
    ranks["report_to_image"] = short_lists(text_emb, image_emb, codes, codes, 0)["ranks"]
  result = {"pairs": len(records), "itm_top_k": itm_top_k,
            **{direction: metrics_from_ranks(r, KS) for direction, r in ranks.items()}}
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "retrieval.json").write_text(json.dumps(result, indent=1))
  lines = ["| direction | " + " | ".join(f"R@{k}" for k in KS) + " | median rank |", "|---|" + "---|" * (len(KS) + 1)]
  for direction in ("image_to_report", "report_to_image"):
    m = result[direction]
    lines.append(f"| {direction.replace('_', ' ')} | " + " | ".join(f"{100 * m[f'recall_at_{k}']:.1f}" for k in KS)
                 + f" | {m['median_rank']:g} |")
  (workdir / "retrieval.md").write_text(f"{len(records)} pairs from {manifest}"
                                        + (f", ITM re-ranking of the top {itm_top_k}" if itm_top_k else "")
                                        + "\n\n" + "\n".join(lines) + "\n")
  log("\n".join(lines))
  return result


def main(argv=None):
  from retfiner_jax.textside import api
  p = api.command_parser(__doc__)
  p.add_argument("--manifest", required=True)
  p.add_argument("--itm-top-k", type=int, default=DEFAULT_ITM_TOP_K,
                 help=f"re-rank each query's top K by ITM (default {DEFAULT_ITM_TOP_K}, ALBEF's and BLIP's k_test "
                 "for Flickr30k); 0: rank by ITC alone")
  api.run_command(p, argv, lambda model, a: run(model, a.manifest, a.workdir, a.itm_top_k))


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
