"""One writer per workdir: an OS lock (`flock`) on a lock file that also names its holder (host, PID, start time).

The kernel holds the lock for the process and releases it when the process ends, however it ends (SIGKILL, a
crash, a zombie waiting to be reaped), so a lock is never stale and no PID is ever compared: a rerun right after a
kill takes the lock at once, and a new process that happens to get the old holder's PID (a restarted container)
is not mistaken for it. A second run while the first one lives stops with `WorkdirLocked` naming the holder from
the file. The lock is released when the run ends (`with WorkdirLock(...)`).

On NFS, `flock` is carried by the server's byte-range locks (Linux clients, NFSv4 or lockd); some network file
systems (GCS FUSE, some SMB mounts) ignore locks, and there nothing stops two runs on one workdir: give each run
its own workdir.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from retfiner_jax.errors import UserError

LOCK_NAME = ".retfiner_lock"


class WorkdirLocked(UserError, RuntimeError):
  pass


class WorkdirLock:
  def __init__(self, workdir, log=print):
    self.path = Path(workdir) / LOCK_NAME
    self.log = log
    self.fd: int | None = None

  @property
  def held(self) -> bool:
    return self.fd is not None

  def holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def acquire(self):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(10):
      fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirLocked(f"{self.path.parent} is in use by another run ({self._describe(self.holder())}); "
                            f"wait for it to end or use another workdir") from None
      # The file may have been unlinked by a holder releasing it between our open and our lock: then this lock is
      # on a file nobody else will open; take the one at the path instead.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = self.holder()
      if previous and previous.get("pid") is not None:
        self.log(f"{self.path}: taking over the lock left by {self._describe(previous)} (no longer running)")
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps(me).encode())
      os.fsync(fd)
      self.fd = fd
      return self
    raise WorkdirLocked(f"{self.path}: could not take the lock")

  @staticmethod
  def _describe(holder: dict | None) -> str:
    if not holder:
      return "an unreadable lock file"
    return f"PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"

  def release(self):
    if self.fd is not None:
      self.path.unlink(missing_ok=True)  # While still locked: a waiting run then opens a new file.
      os.close(self.fd)  # Closing the descriptor releases the lock.
      self.fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
