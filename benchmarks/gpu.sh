#!/usr/bin/env bash
# Every GPU measurement in one run (under 8 minutes on one H100/H200), for a 15-minute device slot.
# Needs only what travels with the checkout plus the GPU image's JAX, PyTorch and transformers; no network.
#
#   bash benchmarks/gpu.sh            # on the GPU machine; JSON lines to stdout and to $OUT (default: .)
#   bash benchmarks/gpu.sh --tiny     # the same script with tiny sizes (CPU check)
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-.}"
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--tiny" ]; then
  LARGE=(--vision tiny --text tiny --batch 8 --steps 2)
  SMALL=(--vision tiny --text tiny --batch 4 --steps 2)
  PROBE=(--vision tiny --images 120 --timed-epochs 1)
else
  LARGE=(--vision vit_l16 --text bert_base --batch 128 --steps 5)
  SMALL=(--vision vit_b16 --text bert_base --batch 32 --steps 5)
  PROBE=(--vision vit_b16 --images 1000 --timed-epochs 2)
fi
"$PY" -c "import jax; print('devices:', jax.devices())"
# ViT-L/16 + BERT-base, batch 128, bfloat16 (remat for memory) against the original's way in float16 autocast.
"$PY" step.py "${LARGE[@]}" --dtype bfloat16 --remat dots | tee "$OUT/gpu_step_large.jsonl"
# ViT-B/16 + BERT-base in float32 and bfloat16, ours only (no second PyTorch run to save time).
"$PY" step.py "${SMALL[@]}" --dtype bfloat16 --no-torch | tee "$OUT/gpu_step_small.jsonl"
# The 5-seed probe protocol against the epoch-loop probe.
"$PY" probe.py "${PROBE[@]}" | tee "$OUT/gpu_probe.jsonl"
