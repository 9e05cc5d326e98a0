"""Command-line plumbing shared by the commands: configs found by name or path from any working directory,
and flag mistakes reported as one line.

`--config=retfound`, `--config=retfound.py` and `--config=configs/retfound.py` all name configs/retfound.py of
this checkout, whatever the working directory; a path that exists is taken as given.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_path(value: str) -> str:
  """A --config value -> the file it names (ml_collections' `file.py:argument` form kept)."""
  path, sep, argument = value.partition(":")
  if Path(path).exists():
    return value
  name = Path(path).name
  for candidate in (CONFIGS / name, CONFIGS / f"{name}.py"):
    if candidate.is_file():
      return str(candidate) + sep + argument
  return value  # Left to ml_collections, whose error names the file.


def parse_flags(argv, default_config: str | None = None):
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`. Configs by name (above); a config key
  that does not exist (the configs are locked; one line with ml_collections' "did you mean"), a value of the
  wrong type or a missing flag is one `error: ...` line and exit status 2, not a traceback. `default_config`
  (a name in configs/) is used when no --config is given: a command's config flag has no default of its own,
  because ml_collections would apply the command line's overrides to a default while the module is imported,
  outside this error handling."""
  from absl import flags
  if default_config and not any(a.startswith("--config=") for a in argv[1:]):
    argv = [argv[0], f"--config={default_config}", *argv[1:]]
  argv = [f"--config={config_path(a[len('--config='):])}" if a.startswith("--config=") else a for a in argv]
  for value in (a[len("--config="):] for a in argv[1:] if a.startswith("--config=")):
    if not Path(value.partition(":")[0]).is_file():  # ml_collections would raise with a traceback.
      names = ", ".join(sorted(c.stem for c in CONFIGS.glob("*.py") if not c.name.startswith("_")))
      print(f"error: --config={value}: no such config file (a name in configs/: {names}; or a path)",
            file=sys.stderr, flush=True)
      sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # A missing flag, a value of the wrong type.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    # The flag's value is not set where an override failed: the config is loaded again to find the unknown key.
    config = flags.FLAGS["config"].value or _loaded_config(argv)
    option = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                   and not _config_key_exists(config, a.split("=")[0][len("--config."):])), "--config.?")
    hint = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").split("\n")[-1]
    print(f"error: {option}: no such config key. {hint}".rstrip(), file=sys.stderr, flush=True)
    sys.exit(2)


def _loaded_config(argv):
  """The config that argv's --config names, loaded as ml_collections loads it (`file.py:argument` passes the
  argument to get_config); None where that fails too (the error message then names no flag)."""
  value = next((a[len("--config="):] for a in argv[1:] if a.startswith("--config=")), None)
  if value is None:
    return None
  path, _, argument = value.partition(":")
  try:
    get_config = runpy.run_path(path)["get_config"]
    return get_config(argument) if argument else get_config()
  except Exception:  # Only for naming the flag in an error already being reported.
    return None


def _config_key_exists(config, dotted: str) -> bool:
  for part in dotted.split("."):
    if config is None or not hasattr(config, "keys") or part not in config:
      return False
    config = config[part]
  return True


def run(main, default_config: str | None = None):
  """Runs an absl `main` with the parsing above (the commands' `cli()` entry points)."""
  from absl import app
  app.run(main, flags_parser=lambda argv: parse_flags(argv, default_config))
