"""Orbax checkpoints of a training run (the one place that touches Orbax's manager API).

`workdir/checkpoints/<step>`: the last N full states (parameters, optimizer state, step, RNG seed) with the
Grain iterator state and the loop's progress (epoch, early stopping); `workdir/best/<step>`: the parameters
with the best validation loss so far.

Saves are asynchronous: `save` returns once the arrays are copied off the devices (and the iterator state
taken), and the files are written while training goes on. `wait` blocks until every save is on disk; `close`
waits too, so a run that exits (also on SIGTERM) never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

from pathlib import Path

import grain
import orbax.checkpoint as ocp


class RunCheckpoints:
  def __init__(self, workdir, keep: int = 2):
    workdir = Path(workdir).absolute()
    self.last = ocp.CheckpointManager(workdir / "checkpoints",
                                      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(workdir / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                                             create=True))

  def latest_step(self):
    return self.last.latest_step()

  def save(self, step: int, state, data_iterator, progress: dict):
    self.last.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=grain.checkpoint.CheckpointSave(data_iterator),
                                                 progress=ocp.args.JsonSave(progress)), force=True)

  def restore(self, abstract_state, data_iterator):
    """Restores the latest checkpoint onto `abstract_state` (shapes + shardings) and into the iterator."""
    step = self.last.latest_step()
    out = self.last.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          data=grain.checkpoint.CheckpointRestore(data_iterator),
                                                          progress=ocp.args.JsonRestore()))
    return out["state"], out["progress"]

  def save_best(self, step: int, params, metrics: dict):
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 metrics=ocp.args.JsonSave(metrics)), force=True)

  def wait(self):
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def restore_best(self, abstract_params):
    self.wait()
    step = self.best.latest_step()
    if step is None:
      return None, None
    out = self.best.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                                          metrics=ocp.args.JsonRestore()))
    return out["params"], out["metrics"]

  def close(self):
    self.wait()
    self.last.close()
    self.best.close()
