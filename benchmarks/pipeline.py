"""Input-pipeline throughput: PNG B-scans (496x512) -> the model's size in one channel (float32 or bfloat16; the
model normalises it on the device), tokenised, batched, for 0/1/2 workers.

  python benchmarks/pipeline.py [--images 256] [--batches 24] [--batch 32] [--workers 0,1,2] [--size 224]
                                [--image-dtype float32]

Prints one JSON line per worker count: images/s after a warm-up batch (the workers' start), and a batch's bytes.
"""
import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retfiner_jax.data import pipeline, synthetic  # noqa: E402
from retfiner_jax.data.vocab import build_vocab  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batches", type=int, default=24)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--image-dtype", default="float32", choices=sorted(pipeline.IMAGE_DTYPES))
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    manifest = synthetic.generate(tmp / "data", a.images, 0, 496, 512, log=lambda *x: None)
    with manifest.open() as f:
      vocab = build_vocab([r["report"] for r in csv.DictReader(f)], 600, tmp / "vocab.txt")
    records, _ = pipeline.load_pairs(manifest, vocab, 30)
    spec = pipeline.ImageSpec(image_size=a.size, backbone="retfound", image_dtype=a.image_dtype)
    for workers in [int(w) for w in a.workers.split(",")]:
      it = iter(pipeline.train_dataset(records, spec, a.batch, seed=0, num_workers=workers))
      next(it)  # Warm-up: worker start and the first batch.
      start = time.perf_counter()
      for _ in range(a.batches):
        batch = next(it)
      seconds = time.perf_counter() - start
      print(json.dumps({"benchmark": "pipeline", "workers": workers, "batch": a.batch, "batches": a.batches,
                        "source": "PNG 496x512 uint8",
                        "output": f"{a.size}x{a.size} one channel {a.image_dtype} + 30 token ids",
                        "megabytes_per_batch": round(sum(v.nbytes for v in batch.values()) / 1e6, 2),
                        "images_per_second": round(a.batch * a.batches / seconds, 1)}), flush=True)


if __name__ == "__main__":
  main()
