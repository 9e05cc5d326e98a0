"""SIGTERM and SIGINT as requests to stop at the next step, so that a training loop saves and returns."""
from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def signals_requesting_stop():
  """Within: SIGTERM and SIGINT set `stop["signal"]` (the signal's name) instead of ending the process, so that a
  training loop saves a checkpoint and returns; yields `stop`. The earlier handlers come back on leaving."""
  stop = {"signal": None}

  def on_signal(signum, _frame):
    stop["signal"] = signal.Signals(signum).name
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
