"""Report <-> B-scan retrieval with the refined model: recall@1/5/10 and the median rank both ways.

  python -m retfiner_jax.retrieval --model=runs/retfound --manifest=test.csv --workdir=runs/retrieval [--itm-top-k=16]

Every image is ranked against every report of the manifest by the ITC similarity; with --itm-top-k K the top K
of each ranking are re-ordered by BLIP's score (its train_retrieval.py evaluation): the ITM head's "match" logit
plus the ITC similarity. Logits, not probabilities: a float32 probability is 1.0 for every pair whose logits
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
    pixels = model.preprocess(images)
    ids, mask = model.tokenize(reports)
    # Image queries: each image with its k reports in one pass of the image. Report queries: pair by pair (the
    # k images differ from report to report).
    i2t = rerank_top_k(sims, itm_top_k, lambda top: model.match_logits_groups(pixels, ids[top], mask[top])[..., 1])
    t2i = rerank_top_k(sims.T, itm_top_k, lambda top: model.match_logits_prepared(
        pixels[top.reshape(-1)], np.repeat(ids, top.shape[1], 0), np.repeat(mask, top.shape[1], 0))[:, 1]
        .reshape(top.shape))
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
