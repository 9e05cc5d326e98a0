"""Retrieval's ranking at scale: seconds and peak memory of ranking N B-scans against N reports both ways, with
the ITM short lists of the top K, from synthetic embeddings (the model's passes are not what is measured here).

  python benchmarks/retrieval_scale.py [--sizes 10000 100000] [--k 128] [--dim 256]

Each size runs in a fresh process, so its peak resident memory (ru_maxrss) is its own; one JSON line per size.
The ITM logits are random numbers standing in for the fusion encoder's (which, at K = 128, scores 2 x N x K pairs:
the accelerator's work). `full_matrix_gib` is what one N x N float32 score matrix alone would take, as the
ranking held it before it was streamed.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_size(n: int, k: int, dim: int) -> dict:
  from retfiner_jax.textside import retrieval
  rng = np.random.default_rng(0)
  base = rng.normal(size=(n // 2 + 1, dim)).astype(np.float32)  # Two B-scans per report id (a patient's eyes).
  images = base[np.arange(n) // 2] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
  reports = base[np.arange(n) // 2] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  reports /= np.linalg.norm(reports, axis=1, keepdims=True)
  codes = retrieval.match_codes([f"p{i // 2}" for i in range(n)])
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  out = {"n": n, "k": k, "dim": dim}
  start = time.perf_counter()
  for name, queries, gallery in (("image_to_report", images, reports), ("report_to_image", reports, images)):
    short = retrieval.short_lists(queries, gallery, codes, codes, k)
    logits = rng.normal(size=short["top"].shape)
    ranks = retrieval.reranked_ranks(short, logits)
    out[name] = {"recall_at_1": float((ranks <= 1).mean()), "median_rank": float(np.median(ranks))}
  out["seconds"] = time.perf_counter() - start
  out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  out["peak_rss_gib_before_ranking"] = before
  out["full_matrix_gib"] = n * n * 4 / 2 ** 30
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
  p.add_argument("--k", type=int, default=128)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # A size, in this process (the child's entry).
  a = p.parse_args()
  if a.one:
    print(json.dumps(one_size(a.one, a.k, a.dim)), flush=True)
    return
  for n in a.sizes:
    done = subprocess.run([sys.executable, __file__, f"--one={n}", f"--k={a.k}", f"--dim={a.dim}"],
                          capture_output=True, text=True)
    if done.returncode:
      sys.exit(f"size {n} failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
  main()
