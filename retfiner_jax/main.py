"""The main command: RetFiner refinement (or, with configs/demo.py, the self-contained demo).

  python -m retfiner_jax.main --config=configs/retfound.py --workdir=runs/retfound [--config.x=value ...]
"""
import functools

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file in configs/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, exports; reused to resume")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host "
                                  "GPU clusters, TPU pods)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO.
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  log = functools.partial(print, flush=True)
  config = _CONFIG.value
  from retfiner_jax import compile_cache
  compile_cache.enable(config.compile_cache, log)
  if "demo" in config:
    from retfiner_jax import demo
    demo.run(config, _WORKDIR.value, log)
  else:
    from retfiner_jax import train
    train.run(config, _WORKDIR.value, log)


if __name__ == "__main__":
  app.run(main)
