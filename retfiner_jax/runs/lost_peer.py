"""A lost host in a multi-process run: recognising it, and the one line each survivor prints before it exits.

When a peer process dies, the next collective fails at once on the survivors (gloo: "Connection reset by peer";
the coordination service: UNAVAILABLE), or, where a collective would hang instead, the distributed runtime's
heartbeat timeout ends the process. Left to itself, a survivor then waits in JAX's shutdown barrier for the
dead peer until the runtime aborts it with a core dump, minutes later and hundreds of lines long. `exit_on_lost_peer`
prints one line and leaves with `os._exit(1)`, skipping that barrier. Checkpoint writes in flight are abandoned:
Orbax writes a step under a temporary name and renames it only when complete, so an unfinished step is never
taken for a complete one, and the resume falls back to the last complete step as it does after any kill.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# Words of the runtime's errors when a peer is gone (gloo, the coordination service, gRPC).
LOST_PEER_SIGNS = ("connection reset by peer", "connection refused", "connection closed", "socket closed",
                   "gloo", "unavailable", "heartbeat", "coordination service", "broken pipe", "deadline_exceeded",
                   "task has been terminated", "failed to connect", "peer")


def is_lost_peer(error: BaseException) -> bool:
  """Whether an exception from a multi-process step looks like a peer gone: a runtime error (not a Python bug of
  ours) whose text carries one of the runtime's words for it."""
  if isinstance(error, (KeyboardInterrupt, SystemExit)):
    return False
  kind = type(error).__name__
  text = f"{kind}: {error}".lower()
  runtime = kind in ("JaxRuntimeError", "XlaRuntimeError") or "runtime" in kind.lower()
  return runtime and any(sign in text for sign in LOST_PEER_SIGNS)


def lost_process(error: BaseException) -> int | None:
  """The index of the lost process where the runtime's message names it (`/task:N`, `task N`), else None."""
  m = re.search(r"task[:_ ](\d+)", str(error))
  return int(m.group(1)) if m else None


def complete_checkpoints(workdir) -> list[int]:
  """The steps under WORKDIR/checkpoints that Orbax finished writing (a step's folder gets its plain numeric
  name only when complete)."""
  folder = Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def lost_peer_line(index: int, count: int, step, workdir, argv, error: BaseException) -> str:
  """What a survivor prints: process 0 the whole story, the others a short line."""
  lost = lost_process(error)
  who = f"process {lost}" if lost is not None and lost != index else "another process"
  at = f" at step {step}" if step is not None else ""
  if index != 0:
    return f"process {index}: lost contact with {who}{at}; stopping (process 0 says how to resume)"
  steps = complete_checkpoints(workdir)
  last = f"the last complete checkpoint is {Path(workdir) / 'checkpoints' / str(steps[-1])}" if steps else \
      "no checkpoint was complete yet (a rerun starts from the beginning)"
  # Each host's own command is this one with its own --process_id, where the command gives one.
  own = [a if not a.startswith("--process_id=") else "--process_id=<the host's own>" for a in argv]
  command = " ".join(["python", "-m", "retfiner_jax.main", *own])
  return (f"process 0 of {count}: lost {who}{at} ({type(error).__name__}: {first_line(error)}); {last}. To "
          f"resume, rerun on every host the command it ran: {command}")


def first_line(error: BaseException, limit: int = 160) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return text[:limit] + ("..." if len(text) > limit else "")


def exit_on_lost_peer(index: int, count: int, step, workdir, argv, error: BaseException):
  """Prints the line on stderr and exits with status 1 at once, skipping the shutdown barrier."""
  print(lost_peer_line(index, count, step, workdir, argv, error), file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)
