"""JAX's persistent compilation cache: a resumed run, a second probe or a rerun benchmark loads its compiled
programs from disk instead of compiling them again.

`setting` is a config value (`config.compile_cache`): '' = the default folder ($XDG_CACHE_HOME or ~/.cache,
then retfiner_jax/xla), 'off' = no cache, anything else = that folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

OFF = "off"


def default_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "retfiner_jax" / "xla"


def enable(setting: str = "", log=None) -> Path | None:
  """Points JAX's compilation cache at the chosen folder (or leaves it off); returns the folder or None."""
  if setting == OFF:
    if log:
      log("compilation cache: off")
    return None
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    # Seen with jax 0.10 and gloo: a resumed pair of CPU processes whose programs came from the cache hung in
    # their first cross-process collective after the train step (the validation); compiled afresh they run.
    if log:
      log("compilation cache: off (several CPU processes: cached programs hung in their collectives)")
    return None
  folder = Path(setting).expanduser() if setting else default_dir()
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Cache every program that took noticeable time to compile, whatever its size.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if log:
    log(f"compilation cache: {folder}")
  return folder
