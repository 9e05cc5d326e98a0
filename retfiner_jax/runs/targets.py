"""Accelerators to compile for without having them: TPU topologies and NVIDIA GPUs as compile-only devices, their
memory and peak bfloat16 rate, and what XLA says when a program does not fit.

TPU: libtpu (`pip install "jax[tpu]==0.10.2"`) describes a slice by name (`v5e:2x4`, `v4:2x2x1`); v4 and v5p are
described in megacore mode, one device per chip, as the real hardware presents itself to JAX. GPU: the CUDA plugin
and the nvcc wheel (`pip install jax-cuda12-plugin==0.10.2 nvidia-cuda-nvcc-cu12`) compile for a GPU described by
an XLA `GpuTargetConfigProto` in text form; `gpu_description` writes one from the chip's public figures (below), or
a file exported by XLA (`xla/backends/gpu/target_config/specs/`) is used as given. Both need `JAX_PLATFORMS=cpu` on
a machine without the accelerator (set by `compile_only_devices` when it is not set).

This module knows no model: it turns a target name into devices, capacities and rates.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from retfiner_jax.errors import ConfigError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  memory_gib: float  # Memory per device that a program may use.
  peak_bf16_tflops: float  # Dense bfloat16 matmul peak per device.
  note: str = ""


# TPU chips (per chip, one JAX device each): HBM per chip and the dense bf16 peak, from Google's data sheets.
# libtpu's own check at compile time is the final word: a program that does not fit fails to compile, and its
# message names the usable figure (v5e: 15.75 of the 16 GiB).
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32.0, 275.0, "32 GiB HBM; megacore: one device per chip"),
    "v5e": Chip("TPU v5e", 15.75, 197.0, "16 GiB HBM, 15.75 GiB usable (libtpu)"),
    "v5p": Chip("TPU v5p", 95.0, 459.0, "95 GiB HBM; megacore: one device per chip"),
    "v6e": Chip("TPU v6e", 32.0, 918.0, "32 GiB HBM"),
}
MEGACORE = ("v4", "v5p")

# NVIDIA GPUs: the figures a GpuTargetConfigProto needs (SXM parts; from the vendors' data sheets).
GPU_CHIPS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory_bytes=84942979072, bandwidth=3352320000000,
                 peak_bf16_tflops=989.0),
    "h200": dict(name="NVIDIA H200 141GB HBM3e", memory_bytes=151397597184, bandwidth=4800000000000,
                 peak_bf16_tflops=989.0),
}
# JAX's GPU client takes this share of the memory at start-up (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75):
# what a training process can use.
DEFAULT_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for: `name` as the user gave it, the platform, the devices' count and chip."""
  name: str
  platform: str  # "tpu", "cuda" or "cpu".
  devices: int
  chip: Chip
  topology: str = ""  # TPU: libtpu's topology name. GPU: hosts x devices per host ("1x8").
  gpu_key: str = ""

  @property
  def capacity_bytes(self) -> int:
    return int(self.chip.memory_gib * GIB)


def tpu_target(topology: str) -> Target:
  """`v5e:2x4`, `v4:2x2x1`, `v5p:2x2x1`, `v6e:2x4` -> a Target (devices = the product of the chip grid)."""
  kind, sep, grid = topology.partition(":")
  if kind not in TPU_CHIPS or not sep or not re.fullmatch(r"\d+(x\d+){1,2}", grid):
    raise ConfigError(f"--topology={topology}: expected <chip>:<grid> with chip one of {sorted(TPU_CHIPS)} and a "
                      f"grid like 2x4 or 2x2x1 (e.g. v5e:2x4, v5p:2x2x1)")
  devices = 1
  for n in grid.split("x"):
    devices *= int(n)
  return Target(topology, "tpu", devices, TPU_CHIPS[kind], topology=topology)


def gpu_target(name: str) -> Target:
  """`h100`, `h200`, `8xh100`, `h100x8`, `2x8xh100` (hosts x per host) -> a Target."""
  m = re.fullmatch(r"(?:(\d+)x)?(?:(\d+)x)?(h100|h200)(?:x(\d+))?", name.lower())
  if not m:
    raise ConfigError(f"--target={name}: expected h100 or h200, optionally with a count: 8xh100 (8 on one host), "
                      f"2x8xh100 (2 hosts of 8), h100x8")
  a, b, key, after = m.groups()
  hosts, per_host = (int(a), int(b)) if b else (1, int(a or after or 1))
  spec = GPU_CHIPS[key]
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEMORY_FRACTION))
  chip = Chip(spec["name"], spec["memory_bytes"] * fraction / GIB, spec["peak_bf16_tflops"],
              f"{fraction:.0%} of {spec['memory_bytes'] / GIB:.1f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)")
  return Target(name, "cuda", hosts * per_host, chip, topology=f"{hosts}x{per_host}", gpu_key=key)


def cpu_target() -> Target:
  """This machine's own CPU devices (for saving an executable that `main` loads here, and for tests)."""
  import jax
  devices = jax.devices("cpu")
  return Target("cpu", "cpu", len(devices), Chip("CPU", float("inf"), 0.0, "host memory"))


def parse_target(topology: str | None, target: str | None, memory_gib: float | None = None) -> Target:
  """The command line's --topology or --target; `memory_gib` replaces the chip's usable memory per device (a GPU
  shared with other work, a smaller part)."""
  if bool(topology) == bool(target):
    raise ConfigError("give exactly one of --topology (a TPU slice, e.g. v5e:2x4) or --target (h100, 8xh100, "
                      "h200, cpu)")
  out = tpu_target(topology) if topology else cpu_target() if target == "cpu" else gpu_target(target)
  if memory_gib is not None:
    if not memory_gib > 0:
      raise ConfigError(f"--memory_gib must be above 0, got {memory_gib}")
    out = dataclasses.replace(out, chip=dataclasses.replace(out.chip, memory_gib=memory_gib,
                                                            note=f"{memory_gib} GiB per device (--memory_gib)"))
  return out


def gpu_description(key: str) -> str:
  """An XLA GpuTargetConfigProto (text form) for an H100/H200 SXM: Hopper (compute capability 9.0), 132 SMs at
  1.98 GHz, 50 MiB L2, 228 KiB shared memory per SM (227 KiB to one block), and the chip's memory and bandwidth."""
  spec = GPU_CHIPS[key]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec['bandwidth']}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {spec['memory_bytes']}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{spec['name']}"
"""


INSTALL = {"tpu": "libtpu", "cuda": "the CUDA plugin and ptxas"}


# What compiling for a platform needs, as (importable module, file inside it) pairs; any one set is enough. CUDA:
# XLA's CUDA plugin and ptxas, from jax 0.10's CUDA 12 wheels (requirements-aot.txt) or from the CUDA 13 wheels a
# GPU machine's `jax[cuda13]` brings (jax-cuda13-pjrt, nvidia-cuda-nvcc and nvidia-nvvm, under nvidia/cu13).
COMPILER_SETS = {"tpu": [[("libtpu", "")]],
                 "cuda": [[("jax_plugins.xla_cuda12", ""), ("nvidia.cuda_nvcc", "bin/ptxas")],
                          [("jax_plugins.xla_cuda13", ""), ("nvidia.cu13", "bin/ptxas")]]}


def missing_compiler(platform: str) -> str | None:
  """Why this platform cannot be compiled for here (a missing package, with the command that installs it), or
  None."""
  import importlib.util

  def found(module, inside):
    try:
      spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
      return False
    if spec is None:
      return False
    return not inside or any((Path(d) / inside).is_file() for d in spec.submodule_search_locations or ())
  if any(all(found(*need) for need in needs) for needs in COMPILER_SETS[platform]):
    return None
  return (f"compiling for {platform.upper()} needs {INSTALL[platform]} (requirements-aot.txt): pip install "
          f"--no-deps --target=.aot-compilers -r requirements-aot.txt (in the checkout or the working directory, where the "
          f"aot command finds it; or give its folder with --compilers=DIR)")


def compile_only_devices(target: Target, gpu_target_config: str = ""):
  """The target's devices, compile-only (TPU, GPU) or this machine's (CPU). `gpu_target_config`: a
  GpuTargetConfigProto text file to use instead of `gpu_description`."""
  import jax
  if target.platform == "cpu":
    return jax.devices("cpu")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Else the CUDA plugin's driver check (or libtpu) fails first.
  # Compiling takes no TPU: several processes may use libtpu at once (its lock file is for a host's real chips).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  missing = missing_compiler(target.platform)
  if missing:
    raise ConfigError(f"{target.name}: {missing}")
  from jax.experimental import topologies
  try:
    if target.platform == "tpu":
      kw = {"chip_config_name": "megacore"} if target.topology.split(":")[0] in MEGACORE else {}
      devices = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kw).devices
    else:
      text = gpu_description(target.gpu_key)
      if gpu_target_config:
        with open(gpu_target_config) as f:
          text = f.read()
      hosts, per_host = target.topology.split("x")
      devices = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                             target_config=text).devices
      answer_cudnn_checks_for(text)
  except (RuntimeError, ValueError, ImportError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"{target.name}: no compile-only devices: {message}")
  if len(devices) != target.devices:
    raise ConfigError(f"{target.name}: libtpu/XLA describes {len(devices)} devices, expected {target.devices}")
  return devices


def answer_cudnn_checks_for(description: str):
  """Makes JAX's cuDNN fused-attention checks answer for the described GPU instead of this machine, which has
  none: they ask the local GPU's compute capability and the loaded cuDNN's version while tracing. The answers come
  from the GpuTargetConfigProto text (cuda_compute_capability, dnn_version_info); XLA then compiles the cuDNN call
  for that GPU as it compiles everything else. Used only for compile-only GPU devices."""
  def field(block, name):
    found = re.search(block + r"\s*\{([^}]*)\}", description)
    value = found and re.search(name + r":\s*(\d+)", found.group(1))
    return int(value.group(1)) if value else 0
  capability = (field("cuda_compute_capability", "major"), field("cuda_compute_capability", "minor"))
  cudnn = (field("dnn_version_info", "major") * 10000 + field("dnn_version_info", "minor") * 100
           + field("dnn_version_info", "patch"))
  if capability[0] == 0 or cudnn == 0:
    raise ConfigError("the GPU description names no cuda_compute_capability or no dnn_version_info: the fused "
                      "attention's checks cannot be answered for it")
  from jax._src.cudnn import fused_attention_stablehlo as checks
  as_tuple = lambda text: tuple(int(x) for x in text.split("."))
  checks.check_cudnn_version = lambda: cudnn
  checks.check_compute_capability = lambda wanted: capability >= as_tuple(wanted)
  checks.is_cuda_compute_capability_equal = lambda wanted: capability == as_tuple(wanted)


# What XLA says when a program does not fit (TPU: at compile time; GPU: the rematerialisation pass's warning or a
# failed allocation).
_OOM_PATTERNS = (
    # XLA:TPU (libtpu 0.0.42): "... the total memory required for HLO temporaries (37.29G) exceeds available HBM
    # (15.75G)" -- the temporaries alone; the arguments come on top.
    re.compile(r"memory required for [\w ]+? \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"),
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),  # XLA:TPU, older wording
    re.compile(r"can't reduce memory use below ([\d.]+)([KMGT])iB .*?only reduced to ([\d.]+)([KMGT])iB",
               re.IGNORECASE),  # XLA:GPU's rematerialisation pass
    re.compile(r"(?:allocat\w+|Out of memory).*?([\d.]+)([KMGT])i?B.*?(?:of|free:?) ([\d.]+)([KMGT])i?B"),
)
_UNIT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def out_of_memory_figures(message: str) -> tuple[int, int] | None:
  """(bytes needed, bytes available) from an XLA out-of-memory message, if it names them."""
  for i, pattern in enumerate(_OOM_PATTERNS):
    m = pattern.search(message)
    if m:
      a, b = float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]
      return (int(b), int(a)) if i == 2 else (int(a), int(b))  # The GPU pass names the limit first.
  return None


def out_of_memory_counts_temporaries_only(message: str) -> bool:
  """Whether the message's "needed" figure is the temporaries alone (XLA:TPU's current wording)."""
  return _OOM_PATTERNS[0].search(message) is not None


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()
