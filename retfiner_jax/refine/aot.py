"""Ahead-of-time compilation of the refinement's train step for an accelerator this machine may not have: does
a config fit, where does the memory go, which settings would make it fit; and the compiled step saved for `main`.

The step is the one `main` runs (`step.sharded_train_step`: the config's model, mesh, shardings, donation and
micro-batches), lowered from shapes alone, so no parameter is ever made. Memory figures are XLA's own for the
target (`Compiled.memory_analysis`); FLOPs are counted from the model's sizes (flops.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import pickle
import time
from pathlib import Path

import jax
import numpy as np

from retfiner_jax.errors import ConfigError, UserError
from retfiner_jax.refine.flops import step_flops
from retfiner_jax.refine.step import check_batch_divides, model_config, objective_settings, sharded_train_step
from retfiner_jax.runs import compile_options, sharding, targets, whole_files

GIB = targets.GIB
SAVED_FORMAT = "retfiner-jax compiled train step, version 1"

# --fit tries these in order, each on top of the config as given, and stops at the first that fits. Each rung
# keeps what the rungs before it added: recompute inside each layer's backward pass (activations saved only at
# the matmuls, then only at the layer's input), then parameters and optimizer state split over every device
# (FSDP), then the batch split into 2, 4, 8 sequential micro-batches (gradients accumulated).
FIT_LADDER = (
    ("remat dots", {"model.remat": "dots"}),
    ("remat full", {"model.remat": "full"}),
    ("remat full, FSDP over all devices", {"model.remat": "full", "mesh.data": 1, "mesh.fsdp": -1}),
    ("remat full, FSDP, 2 micro-batches", {"model.remat": "full", "mesh.data": 1, "mesh.fsdp": -1,
                                            "train.micro_batches": 2}),
    ("remat full, FSDP, 4 micro-batches", {"model.remat": "full", "mesh.data": 1, "mesh.fsdp": -1,
                                            "train.micro_batches": 4}),
    ("remat full, FSDP, 8 micro-batches", {"model.remat": "full", "mesh.data": 1, "mesh.fsdp": -1,
                                            "train.micro_batches": 8}),
)


class DeviceMemoryExceeded(UserError, RuntimeError):
  """The train step does not fit in the devices' memory (found when compiling)."""

  def __init__(self, message: str, needed: int | None = None, available: int | None = None):
    super().__init__(message)
    self.needed, self.available = needed, available


def _gib(n) -> float | None:
  return None if n is None else round(n / GIB, 3)


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of shapes laid out by `shardings` (the largest shard of each leaf)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return total


def settings_of(config) -> dict:
  return {"batch_size": config.train.batch_size, "remat": config.model.remat,
          "mesh": {"data": config.mesh.data, "fsdp": config.mesh.fsdp}, "micro_batches": config.train.micro_batches,
          "dtype": config.model.dtype}


def with_overrides(config, overrides: dict, devices: int):
  """A copy of `config` with dotted keys set (`mesh.fsdp: -1` = every device)."""
  out = copy.deepcopy(config)
  for key, value in overrides.items():
    block, name = key.split(".")
    out[block][name] = devices if value == -1 else value
  return out


def lower_step(config, devices, cfg, settings):
  """config (and the model config and objective settings made from it) + devices -> (ShardedStep, lowered step,
  its abstract arguments, lower seconds)."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)  # A ConfigError names the key.
  check_batch_divides(config, mesh)
  built = sharded_train_step(config, cfg, settings, mesh)
  args = built.abstract_args(config.train.batch_size, cfg.max_text_length, cfg.image_size,
                             image_dtype=config.data.image_dtype)
  started = time.perf_counter()
  lowered = built.step_fn.lower(*args)
  return built, lowered, args, time.perf_counter() - started


# XLA's GPU fusion autotuner off (on by default from JAX 0.11): compiler_options' and benchmarks/step.py's
# --fusion-autotuner off.
FUSION_AUTOTUNER_OFF = {"xla_gpu_experimental_enable_fusion_autotuner": False}


def compiler_options(devices) -> dict:
  """XLA options for compiling without the device: XLA cannot autotune Triton's matmul tilings without a GPU, and
  one default tiling fails on the step's fused transposed matmul, so GPU matmuls go to cuBLAS (a difference of
  megabytes, not gigabytes, in memory). XLA's fusion autotuner (on by default from JAX 0.11) compiles every
  candidate of every fusion but, with nothing to time them on, keeps the defaults: off, the shipped step for an
  H200 compiled in 24.5 s instead of 54.6 s here, to the same optimised program (benchmarks/README.md). Beside
  them, what `main` compiles its step with (runs/compile_options.py)."""
  options = compile_options.for_train_step(devices)
  if devices[0].platform in ("cuda", "gpu"):
    options.update({"xla_gpu_enable_triton_gemm": False, **FUSION_AUTOTUNER_OFF})
  return options


def fingerprint(lowered, devices) -> dict:
  """What a saved step must agree with to be run: the program (its StableHLO), the devices' kind and count, and
  JAX's version."""
  return {"program_sha256": hashlib.sha256(lowered.as_text().encode()).hexdigest(),
          "platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
          "jax": jax.__version__}


def compile_report(config, target: targets.Target, devices, log=print, save: str = "", hlo: str = "") -> dict:
  """Lowers and compiles the config's train step for `devices`; returns the JSON report (see README: "Where it
  fits"). A step that XLA refuses for lack of memory is reported as not fitting, with the figures XLA gives.
  `hlo`: a file for XLA's optimised program (text), to read which kernels and buffers it holds."""
  cfg, settings = model_config(config), objective_settings(config)
  built, lowered, (state, batch, _), lower_s = lower_step(config, devices, cfg, settings)
  report = {"target": target.name, "devices": target.devices, "device_kind": devices[0].device_kind,
            "settings": dict(settings_of(config), remat=built.model.cfg.remat,  # 'auto' resolved for the target.
                             mesh={k: int(v) for k, v in built.mesh.shape.items()}),
            "lower_s": round(lower_s, 2), "attention": built.model.cfg.attention}
  flop = step_flops(cfg, config.train.batch_size, settings=settings)
  report["tflop_per_step"] = round(flop / 1e12, 3)
  if target.chip.peak_bf16_tflops:
    at_peak = flop / (target.devices * target.chip.peak_bf16_tflops * 1e12)
    report["step_s_estimate"] = {"at_peak": float(f"{at_peak:.4g}"), "at_50_mfu": float(f"{at_peak / 0.5:.4g}"),
                                 "at_40_mfu": float(f"{at_peak / 0.4:.4g}")}
  params = per_device_bytes(built.abstract_params, built.param_shardings)
  state_bytes = per_device_bytes(state, jax.tree.map(lambda a: a.sharding, state))
  batch_bytes = per_device_bytes(batch, jax.tree.map(lambda a: a.sharding, batch))
  capacity = target.capacity_bytes if np.isfinite(target.chip.memory_gib) else None
  started = time.perf_counter()
  try:
    compiled = lowered.compile(compiler_options(devices))
  except Exception as e:  # noqa: BLE001 (XLA's errors have no narrower public type)
    if not targets.is_out_of_memory(e):
      raise
    figures = targets.out_of_memory_figures(str(e))
    needed, available = figures if figures else (None, capacity)
    arguments, temporaries = state_bytes + batch_bytes, None
    if needed is not None and targets.out_of_memory_counts_temporaries_only(str(e)):
      temporaries, needed = needed, needed + arguments
    report.update(fits=False, compile_s=round(time.perf_counter() - started, 2),
                  gib_per_device={"arguments": _gib(arguments), "temporaries": _gib(temporaries),
                                  "total": _gib(needed), "capacity": _gib(available)},
                  error=str(e).strip().splitlines()[0][:400])
    return report
  compile_s = time.perf_counter() - started
  program = compiled.as_text() or ""
  if hlo:
    Path(hlo).write_text(program)
    report["hlo"] = str(hlo)
  # cuDNN's fused attention, forward and backward calls (config.model.attention).
  report["fused_attention_calls"] = program.count('custom_call_target="__cudnn$fmha')
  m = compiled.memory_analysis()
  arguments, temporaries = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
  outputs, aliased = int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  total = max(peak, arguments + temporaries + outputs - aliased)
  fits = capacity is None or total <= capacity
  report.update(fits=fits, compile_s=round(compile_s, 2),
                gib_per_device={"arguments": _gib(arguments), "temporaries": _gib(temporaries),
                                "total": _gib(total), "capacity": _gib(capacity)},
                memory_split_gib={"parameters": _gib(params), "optimizer_state": _gib(state_bytes - params),
                                  "batch": _gib(batch_bytes),
                                  "activations_and_workspace": _gib(temporaries),
                                  "outputs_not_donated": _gib(max(outputs - aliased, 0)),
                                  "generated_code": _gib(int(m.generated_code_size_in_bytes))})
  if save and fits:
    save_compiled(compiled, lowered, devices, save, report)
    report["saved"] = str(save)
    log(f"saved the compiled step to {save}")
  elif save:
    log(f"not saved to {save}: the step does not fit")
  return report


def save_compiled(compiled, lowered, devices, path, report: dict):
  from jax.experimental import serialize_executable
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  record = {"format": SAVED_FORMAT, "fingerprint": fingerprint(lowered, devices), "settings": report["settings"],
            "target": report["target"], "executable": payload, "in_tree": in_tree, "out_tree": out_tree}
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  whole_files.make_whole(path, lambda partial: partial.write_bytes(pickle.dumps(record)))


def load_compiled(path, lowered, devices):
  """A step saved by `--save`, checked against the step this run would compile: the same program for the same
  devices, or one error naming what differs."""
  try:
    record = pickle.loads(Path(path).read_bytes())
  except FileNotFoundError:
    raise ConfigError(f"config.compiled_step = {path}: file not found") from None
  except Exception as e:  # noqa: BLE001 (a damaged or foreign file)
    raise ConfigError(f"config.compiled_step = {path}: not a compiled step saved by retfiner_jax.aot ({e})") from None
  if not isinstance(record, dict) or record.get("format") != SAVED_FORMAT:
    raise ConfigError(f"config.compiled_step = {path}: not a compiled step saved by retfiner_jax.aot --save")
  want, have = fingerprint(lowered, devices), record["fingerprint"]
  differs = [k for k in want if want[k] != have.get(k)]
  if differs:
    named = {"program_sha256": "the program (model, batch, mesh, micro-batches or optimizer)"}
    detail = "; ".join(named.get(k, f"{k}: {have.get(k)!r} there, {want[k]!r} here") for k in differs)
    raise ConfigError(f"config.compiled_step = {path} was compiled for another step ({detail}). It was saved for "
                      f"{record['target']} with {json.dumps(record['settings'])}: compile it again with "
                      f"python -m retfiner_jax.aot ... --save={path}, or leave config.compiled_step empty")
  from jax.experimental import serialize_executable
  return serialize_executable.deserialize_and_load(record["executable"], record["in_tree"], record["out_tree"],
                                                   execution_devices=devices)


def fit(config, target: targets.Target, devices, log=print, save: str = "", hlo: str = "") -> tuple[dict, list[dict]]:
  """The config as given, then FIT_LADDER's rungs until one fits (each setting compiled once; the one that fits
  is the one saved). Returns (the first report that fits, or the last one tried; every report)."""
  tried = []
  for name, overrides in (("as configured", {}),) + FIT_LADDER:
    candidate = with_overrides(config, overrides, target.devices)
    micro = candidate.train.micro_batches
    if overrides and candidate.train.batch_size % (target.devices * micro):  # As configured: an error says so.
      log(f"{name}: skipped (batch {candidate.train.batch_size} is not divisible by {target.devices} devices x "
          f"{micro} micro-batches)")
      continue
    tried.append(dict(compile_report(candidate, target, devices, log, save=save, hlo=hlo), rung=name))
    log(describe(tried[-1]))
    if tried[-1]["fits"]:
      break
  return tried[-1], tried


def describe(report: dict) -> str:
  """One readable line for a report."""
  g, s = report["gib_per_device"], report["settings"]
  mesh = f"data {s['mesh']['data']} x fsdp {s['mesh']['fsdp']}"
  head = (f"{report['target']} ({report['devices']} x {report['device_kind']}): batch {s['batch_size']}, remat "
          f"{s['remat']}, mesh {mesh}, {s['micro_batches']} micro-batch(es): ")
  cap = f"{g['capacity']:.2f}" if g["capacity"] is not None else "?"
  if g["total"] is None:
    need = "an unknown amount"
  else:
    need = f"{g['total']:.2f} GiB"
  if report["fits"]:
    line = (f"FITS: {need} per device of {cap} GiB (arguments {g['arguments']:.2f}, temporaries "
            f"{g['temporaries']:.2f})")
  else:
    line = f"DOES NOT FIT: needs {need} per device, {cap} GiB available"
  line += f"; lower {report['lower_s']:.1f} s, compile {report['compile_s']:.1f} s; {report['tflop_per_step']} TFLOP/step"
  est = report.get("step_s_estimate")
  if est and report["fits"]:
    line += f", est. {est['at_50_mfu']:.4g} s/step at 50 % MFU ({est['at_40_mfu']:.4g} s at 40 %)"
  return head + line


def memory_lines(report: dict) -> list[str]:
  split = report.get("memory_split_gib")
  if not split:
    return []
  return ["  where the memory goes (GiB per device): " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}"
                                                                    for k, v in split.items())]


def as_json(report: dict) -> str:
  return json.dumps(report, allow_nan=False)



def out_of_memory(error: BaseException, devices) -> DeviceMemoryExceeded:
  """XLA's out-of-memory error while compiling the step -> one message with the figures it names."""
  figures = targets.out_of_memory_figures(str(error))
  where = f"{len(devices)} x {devices[0].device_kind}"
  if figures:
    needed, available = figures
    part = " for its temporaries" if targets.out_of_memory_counts_temporaries_only(str(error)) else ""
    text = f"needs {needed / GIB:.2f} GiB per device{part}, {available / GIB:.2f} GiB available on {where}"
  else:
    needed = available = None
    text = f"XLA: {str(error).strip().splitlines()[0][:300]} ({where})"
  return DeviceMemoryExceeded(f"the train step does not fit in device memory: {text}", needed, available)


def fit_command(argv, devices) -> str:
  """The `python -m retfiner_jax.aot ... --fit` command for a command line's config flags (`argv`, without the
  program) and the devices a run found."""
  kept = [a for a in argv if a.startswith("--config")]
  kind, count = devices[0].device_kind, len(devices)
  if "H100" in kind or "H200" in kind:
    where = f"--target={count}x{'h100' if 'H100' in kind else 'h200'}"
  elif devices[0].platform == "tpu":
    where = "--topology=<this slice, e.g. v5e:2x4>"
  else:
    where = "--target=<the accelerator>"
  return " ".join(["python -m retfiner_jax.aot", *kept, where, "--fit"])
