"""XLA options a train step is compiled with beyond JAX's defaults, by platform: one place for `main`'s
refinement step, the AOT tool's compile of it and benchmarks/step.py, so that all three compile one program.

On CPU, up to JAX 0.10: XLA's elemental (pre-MLIR) fusion emitters. The refinement's full-size step
(ViT-L/16 + BERT-base, batch 128, bfloat16) spends most of its CPU compile emitting and code-generating about a
thousand fusion kernels; with these emitters it compiles in about 12.5 s instead of about 15 s on a 2-core CPU,
the step runs as fast, and float32 results differ from the default emitters' in the last bits
(benchmarks/README.md, "Compile time"). JAX 0.11 dropped the option (its XLA rejects it: "No such compile
option"), and its default emitters compile the same step in about 12 s, so nothing is set there.
"""
from __future__ import annotations

import jax

ELEMENTAL_CPU_FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
# The last JAX whose XLA has the option above.
LAST_JAX_WITH_EMITTER_OPTION = (0, 10)


def cpu_emitter_option_exists(version_info: tuple = jax.__version_info__) -> bool:
  return tuple(version_info[:2]) <= LAST_JAX_WITH_EMITTER_OPTION


def for_train_step(devices) -> dict:
  """Options for compiling a train step that runs on `devices` (a list of jax devices, real or compile-only)."""
  if devices[0].platform == "cpu" and cpu_emitter_option_exists():
    return dict(ELEMENTAL_CPU_FUSION_EMITTERS)
  return {}


def described(options: dict) -> str:
  """'' or ' (XLA options: a=b, ...)', for a log line."""
  if not options:
    return ""
  return " (XLA options: " + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
