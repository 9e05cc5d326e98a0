"""One writer per workdir: a lock file naming its holder (host, PID, start time), created atomically.

A second run on the same workdir stops with `WorkdirLocked` naming the holder. A lock left by a process that no
longer runs on this host (killed with SIGKILL, a crashed machine's lock is the user's call) is taken over with a
message. The lock is released when the run ends, however it ends (`with WorkdirLock(...)`).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from retfiner_jax.errors import UserError

LOCK_NAME = ".retfiner_lock"


class WorkdirLocked(UserError, RuntimeError):
  pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # Signal 0: only checks. PermissionError: it exists, owned by someone else.
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


class WorkdirLock:
  def __init__(self, workdir, log=print):
    self.path = Path(workdir) / LOCK_NAME
    self.log = log
    self.held = False

  def holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def acquire(self):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self.holder()
        if other is None or (other.get("host") == me["host"] and not _alive(int(other.get("pid", -1)))):
          self.log(f"{self.path}: taking over a stale lock ({self._describe(other)}, no longer running)")
          self.path.unlink(missing_ok=True)
          continue
        raise WorkdirLocked(
            f"{self.path.parent} is in use by another run ({self._describe(other)}); wait for it to end or use "
            f"another workdir. If that process is gone (e.g. its machine crashed), delete {self.path}") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirLocked(f"{self.path}: could not take the lock")

  @staticmethod
  def _describe(holder: dict | None) -> str:
    if not holder:
      return "an unreadable lock file"
    return f"PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"

  def release(self):
    if self.held:
      holder = self.holder()
      if holder is not None and holder.get("pid") == os.getpid():
        self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
