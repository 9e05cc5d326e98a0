"""A run's folder: created on first use, and resumed only with the settings it was started with."""
from __future__ import annotations

import json
from pathlib import Path

import jax

from retfiner_jax.errors import ConfigError
from retfiner_jax.runs import whole_files


def prepare_workdir(workdir) -> Path:
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"workdir {workdir} is a file; give a folder (it is created if missing)")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def _flat(d: dict, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resume_config(config, workdir: Path, resumable: tuple[str, ...], log=print):
  """A workdir with checkpoints resumes only with the model and data it was trained with: any other change is
  refused, listing the keys; keys starting with one of `resumable` (the
  trainer's own list) may change. The saved config.json is written by a fresh run only and never overwritten."""
  saved_path = workdir / "config.json"
  new = json.loads(config.to_json_best_effort())
  if not (workdir / "checkpoints").is_dir() or not any((workdir / "checkpoints").iterdir()) \
      or not saved_path.exists():
    if jax.process_index() == 0:  # One writer on a shared workdir.
      whole_files.write_json(saved_path, new)
    return
  old, now = _flat(json.loads(saved_path.read_text())), _flat(new)
  changed = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
  refused = [k for k in changed if not k.startswith(tuple(resumable))]
  if refused:
    raise ConfigError(f"{workdir} was trained with other settings; resuming would mix two runs. Changed: "
                      + "; ".join(f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in refused)
                      + ". Use a new --workdir, or the saved settings (" + str(saved_path) + ")")
  if changed:
    log("resuming with changed settings: " + "; ".join(f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in changed))
