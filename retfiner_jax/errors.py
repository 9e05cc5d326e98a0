"""Errors that are the user's to fix: a missing file, a bad setting, a locked workdir, a damaged input.

The commands print them as one `error: ...` message and exit with status 2, without a traceback; every other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys


class UserError(Exception):
  pass


class ConfigError(UserError, ValueError):
  """A setting that cannot work; the message names the config key and the fix."""


class MissingInput(UserError, FileNotFoundError):
  """A file or folder the settings name does not exist."""


def run_reporting_user_errors(fn, *args, **kwargs):
  """Calls fn; a UserError becomes `error: ...` on stderr and exit status 2."""
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: a config key that does not exist (the
  config files are locked; one line with ml_collections' "did you mean"), a value of the wrong type or a missing
  flag is one `error: ...` line and exit status 2, not a traceback."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # A missing flag, a value of the wrong type.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    option = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                   and not _config_key_exists(a.split("=")[0][len("--config."):])), "--config.?")
    hint = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").split("\n")[-1]
    print(f"error: {option}: no such config key. {hint}".rstrip(), file=sys.stderr, flush=True)
    sys.exit(2)


def _config_key_exists(dotted: str) -> bool:
  from absl import flags
  config = flags.FLAGS["config"].value
  for part in dotted.split("."):
    if config is None or not hasattr(config, "keys") or part not in config:
      return False
    config = config[part]
  return True
