"""The main command: RetFiner refinement of a foundation model with paired reports.

  python -m retfiner_jax.main --config=configs/retfound.py --workdir=runs/retfound [--config.x=value ...]

The self-contained demo has its own command: python -m retfiner_jax.demo --workdir=runs/demo
"""
import functools
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config: a name in configs/ (retfound, visionfm, "
                                          "urfound) or a path", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, exports; reused to resume")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host "
                                  "GPU clusters, TPU pods)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if "demo" in config:
    raise app.UsageError("this is the demo's config: run python -m retfiner_jax.demo --workdir=DIR")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO.
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  log = functools.partial(print, flush=True)
  from retfiner_jax import compile_cache, train
  from retfiner_jax.errors import run_reporting_user_errors
  compile_cache.enable(config.compile_cache, log)
  # Model sizes set on the command line win over the weights' own (train.run takes the rest from the weights).
  explicit = [a.split("=")[0][len("--config.model."):] for a in sys.argv[1:] if a.startswith("--config.model.")]
  run_reporting_user_errors(train.run, config, _WORKDIR.value, log, explicit_model_keys=explicit)


def cli():
  """The console script's entry point."""
  from retfiner_jax import cli as command_line
  command_line.run(main)


if __name__ == "__main__":
  cli()
