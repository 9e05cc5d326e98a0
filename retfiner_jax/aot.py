"""Compile the refinement's train step for a TPU slice or GPUs this machine does not have, and say whether it fits.

  python -m retfiner_jax.aot --config=retfound --topology=v5e:2x4 [--fit] [--save=step.bin] [--config.x=value ...]
  python -m retfiner_jax.aot --config=retfound --target=h100        (also h200, 8xh100, 2x8xh100, cpu)

The config and its overrides are the main command's; the step is the one `python -m retfiner_jax.main` would run
with them. Prints a readable line (stderr) and one JSON line (stdout) with `target`, `devices`, `fits`,
`gib_per_device` (`arguments`, `temporaries`, `total`, `capacity`), `compile_s`, `tflop_per_step`,
`step_s_estimate` and `settings` (`batch_size`, `remat`, `mesh`, `micro_batches`), plus where the memory goes.
`--fit`: when the config does not fit, the settings of refine/aot.py's FIT_LADDER are tried in order and the
first that fits is printed (its JSON line lists what was tried). `--save=FILE` writes the compiled step, which
`main --config.compiled_step=FILE` runs without compiling. Exit status: 0 fits, 1 does not fit, 2 usage error.

Compiling for a TPU needs libtpu; for a GPU, the CUDA plugin and ptxas (requirements-aot.txt). Neither needs the
hardware. They are found in .aot-compilers beside the checkout or in the working directory (`pip install
--no-deps --target=.aot-compilers -r requirements-aot.txt`), or in --compilers=DIR; nothing else need be set.
"""
import functools
import os
import re
import sys
from pathlib import Path

COMPILERS_FOLDER = ".aot-compilers"  # requirements-aot.txt, installed with pip --target (the README's line).


def compilers_folder(argv) -> Path | None:
  """Where the TPU/GPU compilers are: --compilers=DIR, else .aot-compilers beside the checkout, else in the
  working directory; None when there is none."""
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--compilers=")]
  if given:
    return Path(given[-1]).absolute()
  for folder in (Path(__file__).resolve().parents[1] / COMPILERS_FOLDER, Path.cwd() / COMPILERS_FOLDER):
    if folder.is_dir():
      return folder
  return None


def check_compilers_match_jaxlib(folder: Path):
  """The CUDA plugin in the compilers' folder is built for one jaxlib; with another, JAX skips it with a warning and
  loading the folder's libraries can crash the process. Exits 2 naming both versions and the install line."""
  import importlib.metadata
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return  # JAX's own import names what is missing.
  for d in folder.glob("jax_cuda*_plugin-*.dist-info"):  # CUDA 12's (requirements-aot.txt) or 13's.
    match = re.fullmatch(r"jax_cuda\d+_plugin-(.+)\.dist-info", d.name)
    if match is None or match.group(1) == jaxlib:
      continue
    built_for = match.group(1)
    print(f"error: {folder} holds the compilers for jaxlib {built_for}, but this Python has jaxlib {jaxlib}: install "
          f"them again for it (pip install --no-deps --target={folder} -r requirements-aot.txt, with that file's "
          f"versions matched to jaxlib {jaxlib}), or give --compilers=DIR", file=sys.stderr)
    sys.exit(2)


def targets_this_cpu(argv) -> bool:
  """`--target=cpu` (or `--target cpu`), the last --target given and no --topology."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith("--target=")]
  values += [b for a, b in zip(argv, argv[1:]) if a == "--target"]
  return bool(values) and values[-1] == "cpu" and not any(a.startswith("--topology") for a in argv)


def prepare_environment(argv):
  """Before JAX is imported (the config file imports it while flags are parsed): the CPU as JAX's only platform,
  since the TPU and GPU devices are compile-only and the CUDA plugin's driver check would fail first, and the
  compilers' folder on the import path (also for processes this one starts)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compiling takes no TPU: several processes may.
  if targets_this_cpu(argv):
    return  # No compilers needed; a folder built for another jaxlib would only put its plugin in the way.
  folder = compilers_folder(argv)
  if folder is not None and folder.is_dir():
    check_compilers_match_jaxlib(folder)
  if folder is not None and str(folder) not in sys.path:
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)


prepare_environment(sys.argv)

from absl import flags, logging  # noqa: E402 (after the environment is set)
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a refinement config: a name in configs/ (retfound, "
                                          "visionfm, urfound) or a path", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "a TPU slice: v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, ...")
_TARGET = flags.DEFINE_string("target", None, "GPUs: h100, h200, 8xh100 (one host), 2x8xh100 (hosts x per host); "
                              "or cpu (this machine)")
_FIT = flags.DEFINE_bool("fit", False, "if it does not fit, try remat, FSDP and micro-batches in order and print "
                         "the first setting that fits")
_HLO = flags.DEFINE_string("hlo", "", "write XLA's optimised program (text) here: its kernels and buffers (with "
                           "--fit, the last setting compiled)")
_SAVE = flags.DEFINE_string("save", "", "write the compiled step (of the setting that fits, with --fit) here")
_MEMORY_GIB = flags.DEFINE_float("memory_gib", None, "usable memory per device in GiB, instead of the chip's "
                                  "(e.g. a GPU shared with other work)")
_COMPILERS = flags.DEFINE_string("compilers", "", "the folder requirements-aot.txt was installed in (pip install "
                                 "--no-deps --target=DIR); default: .aot-compilers beside the checkout, or in the "
                                 "working directory")
_GPU_TARGET_CONFIG = flags.DEFINE_string("gpu_target_config", "", "an XLA GpuTargetConfigProto text file to "
                                         "compile for instead of the built-in H100/H200 description")


def main(argv):
  if len(argv) > 1 or _CONFIG.value is None:
    print(f"error: unexpected arguments: {argv[1:]}" if len(argv) > 1 else "error: give --config", file=sys.stderr)
    sys.exit(2)  # 1 means "does not fit".
  logging.set_verbosity(logging.WARNING)
  from retfiner_jax.errors import ConfigError, run_reporting_user_errors
  from retfiner_jax.refine import aot
  from retfiner_jax.runs import targets
  from retfiner_jax.weights import sizes as weight_sizes
  say = functools.partial(print, file=sys.stderr, flush=True)
  config = _CONFIG.value

  def run():
    if "demo" in config:
      raise ConfigError("this is the demo's config: the demo runs on the CPU (python -m retfiner_jax.demo)")
    target = targets.parse_target(_TOPOLOGY.value, _TARGET.value, _MEMORY_GIB.value)
    explicit = [a.split("=")[0][len("--config.model."):] for a in sys.argv[1:] if a.startswith("--config.model.")]
    weight_sizes.resolve_model_sizes(config, explicit, say)
    devices = targets.compile_only_devices(target, _GPU_TARGET_CONFIG.value)
    say(f"compiling the train step for {target.name}: {len(devices)} x {devices[0].device_kind} "
        f"({target.chip.note}) ...")
    if _FIT.value:
      report, tried = aot.fit(config, target, devices, say, save=_SAVE.value, hlo=_HLO.value)
      report = dict(report, tried=[{"rung": r["rung"], "fits": r["fits"], "total_gib": r["gib_per_device"]["total"]}
                                   for r in tried])
      if report["fits"]:
        say(f"first setting that fits: {report['rung']}")
      else:
        say("no setting of the ladder fits: a smaller batch (config.train.batch_size) or more devices")
    else:
      report = aot.compile_report(config, target, devices, say, save=_SAVE.value, hlo=_HLO.value)
      say(aot.describe(report))
    for line in aot.memory_lines(report):
      say(line)
    print(aot.as_json(report), flush=True)
    return report["fits"]

  fits = run_reporting_user_errors(run)
  sys.exit(0 if fits else 1)


def cli():
  from retfiner_jax import cli as command_line
  command_line.run(main)


if __name__ == "__main__":
  cli()
