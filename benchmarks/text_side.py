"""Zero-shot and retrieval scoring over many B-scans, once their embeddings exist (the issue's target: 10,000
B-scans, all scores under 10 s on the CPU). Embeddings are random unit vectors of the model's width: the
timing is of the scoring, which does not depend on their values.

  python benchmarks/text_side.py [--images 10000] [--classes 7] [--prompts 3] [--dim 512]

Prints one JSON line per phase.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retfiner_jax.probe.metrics import classification_metrics  # noqa: E402
from retfiner_jax.textside import retrieval  # noqa: E402


def unit(rng, n, dim):
  x = rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=10000)
  p.add_argument("--classes", type=int, default=7)
  p.add_argument("--prompts", type=int, default=3)
  p.add_argument("--dim", type=int, default=512)
  a = p.parse_args(argv)
  rng = np.random.default_rng(0)
  images, reports = unit(rng, a.images, a.dim), unit(rng, a.images, a.dim)
  prompts, labels = unit(rng, a.classes * a.prompts, a.dim), rng.integers(0, a.classes, a.images)

  classification_metrics(labels[:20] % 2, np.eye(2)[labels[:20] % 2])  # Imports scikit-learn before timing.
  started = time.perf_counter()  # Zero-shot: class embeddings, similarities, softmax, the probe's metrics.
  classes = prompts.reshape(a.classes, a.prompts, a.dim).mean(1)
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  logits = images @ classes.T / 0.07
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  classification_metrics(labels, probs)
  zero_shot = time.perf_counter() - started
  print(json.dumps({"phase": "zero_shot", "images": a.images, "classes": a.classes, "seconds": zero_shot}),
        flush=True)

  started = time.perf_counter()  # Retrieval: every image against every report, both ways.
  codes = retrieval.match_codes([f"p{i // 2}" for i in range(a.images)])  # Pairs of rows share a report id.
  retrieval.short_lists(images, reports, codes, codes, 0)
  retrieval.short_lists(reports, images, codes, codes, 0)
  seconds = time.perf_counter() - started
  print(json.dumps({"phase": "retrieval", "images": a.images, "seconds": seconds}), flush=True)
  print(json.dumps({"phase": "all_scores", "seconds": zero_shot + seconds, "target_seconds": 10}), flush=True)


if __name__ == "__main__":
  main()
