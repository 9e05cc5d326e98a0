"""The main command as a user runs it, measured: configs/retfound.py on the synthetic corpus.

  python benchmarks/main_run.py prepare --out DIR [--images 1200] [--height 224]
  python benchmarks/main_run.py train --out DIR [--steps 30] [--compile-cache DIR] [-- --config.x=value ...]

`prepare` writes the synthetic OCT-report corpus and a WordPiece vocabulary. `train` starts
`python -m retfiner_jax.main --config=configs/retfound.py` (8 Grain workers, a fresh workdir, no compilation
cache unless --compile-cache names one: run twice with the same folder for a cold then a warm start) and prints
a JSON line as each milestone appears in its output (compile start and end, the start-up line, the first
progress line), then one with summary.json (time to the first step, each start-up phase, compile seconds, steady
samples/s, input wait, each end-of-run part's seconds) and the per-interval input wait from metrics.jsonl (the
first logged interval left out). The command's own output goes to stderr as it comes, so that a failure shows why.
"""
import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(record):
  print(json.dumps(record), flush=True)


def prepare(a):
  from retfiner_jax.data import synthetic
  from retfiner_jax.data.vocab import build_vocab
  out = Path(a.out)
  start = time.perf_counter()
  synthetic.generate(out / "data", a.images, 0, a.height, a.height, log=lambda *x: None)
  with (out / "data" / "manifest_train.csv").open() as f:
    build_vocab([r["report"] for r in csv.DictReader(f)], 600, out / "vocab.txt")
  emit({"phase": "prepare", "images": a.images, "height": a.height, "seconds": time.perf_counter() - start})


def train(a, overrides):
  out = Path(a.out)
  workdir = out / f"run_{int(time.time())}"
  cmd = [sys.executable, "-m", "retfiner_jax.main", "--config=configs/retfound.py", f"--workdir={workdir}",
         f"--config.tokenizer={out / 'vocab.txt'}", "--config.model.vocab_size=600",
         f"--config.data.train_manifest={out / 'data' / 'manifest_train.csv'}",
         f"--config.data.val_manifest={out / 'data' / 'manifest_val.csv'}", f"--config.train.max_steps={a.steps}",
         "--config.train.log_every=5", f"--config.data.num_workers={a.workers}",
         f"--config.compile_cache={a.compile_cache or 'off'}",
         *overrides]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  milestones = {r"^compiling the train step": "compile_start", r"^compiled the train step": "compile_end",
                 r"^start-up: ": "startup_line", r"^epoch +\d+ +step": "first_progress_line",
                 r"^checkpoint writes finished": "checkpoint_writes"}
  seen = set()
  for line in proc.stdout:
    sys.stderr.write(line)  # The command's own output, whole (gpu.sh keeps it in the phase's .err file).
    for pattern, name in milestones.items():
      if re.search(pattern, line) and name not in seen:
        seen.add(name)
        record = {"phase": "main", "milestone": name, "seconds_since_start": time.perf_counter() - start}
        number = re.search(r"in ([0-9.]+) s", line)
        if number:
          record["reported_s"] = float(number.group(1))
        emit(record)
  rc = proc.wait()
  wall = time.perf_counter() - start
  if rc:
    emit({"phase": "main", "rc": rc, "seconds": wall})
    sys.exit(rc)
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["kind"] == "train"][1:]  # The first interval holds the first step.
  summary = json.loads((workdir / "summary.json").read_text())
  emit({"benchmark": "main", "steps": a.steps, "wall_s": wall, "compile_cache": a.compile_cache or None,
        "summary": summary,
        "input_wait_fraction": [round(r["input_wait_fraction"], 4) for r in train],
        "input_wait_s_per_step": [round(r["input_wait_s"], 4) for r in train]})


def main():
  argv = sys.argv[1:]
  overrides = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser()
  p.add_argument("what", choices=["prepare", "train"])
  p.add_argument("--out", required=True)
  p.add_argument("--images", type=int, default=1200)
  p.add_argument("--height", type=int, default=224)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--workers", type=int, default=8)
  p.add_argument("--compile-cache", default="", help="a persistent compilation cache folder (default: none)")
  a = p.parse_args(argv)
  prepare(a) if a.what == "prepare" else train(a, overrides)


if __name__ == "__main__":
  main()
