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
from retfiner_jax.refine import validation
from retfiner_jax.refine.validation import ranking_metrics

KS = (1, 5, 10)


def match_matrix(ids) -> np.ndarray:
  """(N, N) True where rows i and j are a pair: the same non-empty id, or the same row."""
  return validation.match_matrix([i if i else f"\0row{n}" for n, i in enumerate(ids)])


def rerank_top_k(scores, k: int, itm_logit) -> np.ndarray:
  """Scores with each row's top k replaced by BLIP's re-ranking score: `itm_logit(top)` ((N, k) columns -> (N, k)
  ITM "match" logits, one call for all N*k pairs) plus the ITC score, shifted to stay above every other column."""
  out = np.array(scores, np.float64)
  top = np.argsort(-out, axis=1, kind="stable")[:, :k]
  reranked = np.asarray(itm_logit(top), np.float64) + np.take_along_axis(out, top, axis=1)
  rest = np.delete(out, top, axis=1) if out.shape[1] > top.shape[1] else np.zeros((len(out), 1))
  offset = rest.max(axis=1, keepdims=True) - reranked.min(axis=1, keepdims=True) + 1.0  # Top k stay on top.
  np.put_along_axis(out, top, reranked + np.maximum(offset, 0.0), axis=1)
  return out


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


def run(model, manifest, workdir, itm_top_k: int = 0, log=print) -> dict:
  from retfiner_jax.data.manifest import read_manifest
  if not Path(manifest).exists():
    raise MissingInput(f"--manifest {manifest}: file not found")
  records = read_manifest(manifest)
  images, reports = [r["image"] for r in records], [r["report"] for r in records]
  log(f"{manifest}: {len(records)} pairs")
  image_emb, text_emb = model.embed_images(images), model.embed_texts(reports)
  sims = image_emb @ text_emb.T
  matches = match_matrix([r["id"] for r in records])
  i2t, t2i = sims, sims.T
  if itm_top_k > 0:
    ids, mask = model.tokenize(reports)
    i2t = rerank_top_k(sims, itm_top_k, lambda top: image_query_logits(model, images, ids, mask, top))
    t2i = rerank_top_k(sims.T, itm_top_k, lambda top: report_query_logits(model, images, ids, mask, top))
  result = {"pairs": len(records), "itm_top_k": itm_top_k,
            "image_to_report": ranking_metrics(i2t, matches), "report_to_image": ranking_metrics(t2i, matches.T)}
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
  p.add_argument("--itm-top-k", type=int, default=0)
  api.run_command(p, argv, lambda model, a: run(model, a.manifest, a.workdir, a.itm_top_k))


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
