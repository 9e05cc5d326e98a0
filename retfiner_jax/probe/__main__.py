"""Linear probe of one or more frozen encoders on one or more ImageFolder datasets.

  python -m retfiner_jax.probe --config=configs/probe.py --config.encoder=runs/retfound \
      --config.data.root=data/OCTID,data/OCTDL --workdir=runs/probe
"""
import functools

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "probe config: a name in configs/ or a path (default: "
                                          "probe)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (results, audit logs, feature cache); "
                               "overrides config.workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from retfiner_jax.errors import run_reporting_user_errors
  from retfiner_jax.probe.run import run
  from retfiner_jax.runs import compile_cache
  config = _CONFIG.value
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  log = functools.partial(print, flush=True)
  compile_cache.enable(config.compile_cache, log)
  run_reporting_user_errors(run, config, log)


def cli():
  """The console script's entry point."""
  from retfiner_jax import cli as command_line
  command_line.run(main, default_config="probe")


if __name__ == "__main__":
  cli()
