"""`python -m retfiner_jax.mae`: MAE pretraining of a vision encoder on B-scans alone (mae/trainer.py).

  python -m retfiner_jax.mae --config=configs/mae_demo.py --workdir=runs/mae [--config.x=value ...]
"""
from __future__ import annotations

import functools

from absl import app, flags, logging
from ml_collections import config_flags


def main(argv, config_flag, workdir_flag):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if workdir_flag.value is None:
    raise app.UsageError("give --workdir")
  from retfiner_jax.errors import run_reporting_user_errors
  from retfiner_jax.mae import trainer
  from retfiner_jax.runs import compile_cache
  logging.set_verbosity(logging.WARNING)
  log = functools.partial(print, flush=True)
  compile_cache.enable(config_flag.value.compile_cache, log)
  run_reporting_user_errors(trainer.run, config_flag.value, workdir_flag.value, log)


def cli():
  """The command's entry point. Its flags are defined here, not on import: the demo imports this module
  beside its own --config flag."""
  from retfiner_jax import cli as command_line
  config = config_flags.DEFINE_config_file("config", None, "an MAE config (e.g. mae_demo, in configs/)",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, export; reused to resume")
  command_line.run(functools.partial(main, config_flag=config, workdir_flag=workdir), default_config="mae_demo")


if __name__ == "__main__":
  cli()
