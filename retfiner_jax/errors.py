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


class DiskFull(UserError, OSError):
  """A checkpoint or export that would not fit in the free disk space, refused before anything is written."""


class NonFiniteLoss(RuntimeError):
  """A training step or validation gave a non-finite loss, gradient or parameter: the run stops naming the step
  and its last good checkpoint (nothing non-finite is ever saved)."""


def run_reporting_user_errors(fn, *args, prefix: str = "", **kwargs):
  """Calls fn; a UserError becomes `error: ...` on stderr and exit status 2 (`prefix`: e.g. which process)."""
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)

