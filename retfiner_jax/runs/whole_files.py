"""Files and folders that are either whole or absent under their name: each is made under a `.partial` name and
renamed when complete (a rename within a folder is atomic), so a process killed while writing never leaves a
half-written file where a later run, or a user, expects a finished one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def partial_path(path) -> Path:
  """Where `path` is made before it is complete."""
  path = Path(path)
  return path.with_name(path.name + ".partial")


def remove(path):
  """Deletes a file, link or folder tree at `path`, if there is one."""
  path = Path(path)
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif path.exists() or path.is_symlink():
    path.unlink()


def make_whole(path, write):
  """Calls `write(partial)` to make a file or folder at `path`'s partial name (any earlier leftover removed
  first), then puts it in place of what `path` held. Until then an earlier `path` stays as it was."""
  path = Path(path)
  partial = partial_path(path)
  remove(partial)
  write(partial)
  if path.is_dir() and not path.is_symlink():  # A file is replaced by the rename itself; a folder is not.
    remove(path)
  partial.replace(path)
  return path


def write_text(path, text: str):
  return make_whole(path, lambda p: p.write_text(text))


def write_json(path, obj, **dumps_kw):
  """`obj` as JSON (indent 1 unless given), whole or not at all."""
  return write_text(path, json.dumps(obj, **{"indent": 1, **dumps_kw}))
