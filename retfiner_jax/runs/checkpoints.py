"""Orbax checkpoints of a training run (the one place that touches Orbax's manager API).

`workdir/checkpoints/<step>`: the last N full states (parameters, optimizer state, step, RNG seed) with the
Grain iterator state and the loop's progress (epoch, early stopping); `workdir/best/<step>`: the parameters
with the best validation loss so far.

Saves are asynchronous: `save` returns once the arrays are copied off the devices (and the iterator state
taken), and the files are written while training goes on. `wait` blocks until every save is on disk; `close`
waits too, so a run that exits (also on SIGTERM) never leaves a half-written checkpoint behind.

Saving a step that is already saved does nothing (a resumed run reaches again the step it was killed at; a
signal at an epoch's end asks for the epoch's step twice). Restoring takes the newest checkpoint that restores:
one that fails while an older one restores is damaged (a truncated or missing file, bad metadata) and is moved
aside to `workdir/damaged_checkpoints/`, never deleted; if none restores, nothing is moved and the errors are
reported (a changed model config fails on every checkpoint alike).

Before each save the free disk space is compared with the checkpoint's size: a save that cannot fit stops the
run with one message (`DiskFull`) instead of failing in the background writer, and the earlier checkpoints stay
as they are.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from retfiner_jax.disk_space import shortfall, size_text, tree_nbytes
from retfiner_jax.errors import DiskFull, UserError


class NoRestorableCheckpoint(UserError, RuntimeError):
  pass


class ResumeMismatch(UserError, RuntimeError):
  pass


class RunCheckpoints:
  def __init__(self, workdir, keep: int = 2, log=print):
    self.workdir = Path(workdir).absolute()
    self.log = log
    # Several processes: each manager's barriers get their own names (both save the epoch's step at once).
    self.last = ocp.CheckpointManager(self.workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="last")))
    self.best = ocp.CheckpointManager(self.workdir / "best", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="best")))

  def latest_step(self):
    return self.last.latest_step()

  def saved_progress(self, step: int) -> dict:
    """The loop's progress saved with checkpoint `step` (epoch, early stopping), read without the arrays."""
    return dict(self.last.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))["progress"])

  def save(self, step: int, state, data_iterator, progress: dict) -> bool:
    """Saves the step unless it is saved already; returns whether it saved."""
    if step in self.last.all_steps():
      return False
    self._check_space(tree_nbytes(state), f"checkpoint {step}")
    self.last.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=grain.checkpoint.CheckpointSave(data_iterator),
                                                 progress=ocp.args.JsonSave(progress)), force=True)
    return True

  def _restore_step(self, step, abstract_state, data_iterator):
    out = self.last.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          data=grain.checkpoint.CheckpointRestore(data_iterator),
                                                          progress=ocp.args.JsonRestore()))
    return out["state"], out["progress"]

  def restore(self, abstract_state, data_iterator):
    """Restores the newest checkpoint that restores onto `abstract_state` (shapes + shardings) and into the
    iterator; returns (state, progress, step). Newer checkpoints that failed are moved aside, each named with
    its error."""
    self._check_process_count()
    failed = []
    for step in sorted(self.last.all_steps(), reverse=True):
      try:
        state, progress = self._restore_step(step, abstract_state, data_iterator)
      except Exception as e:  # noqa: BLE001 - which errors mean "damaged" is decided by the older checkpoints.
        failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]))
        continue
      for bad, why in failed:
        self._move_aside(bad, why, step)
      return state, progress, step
    raise NoRestorableCheckpoint(
        f"{self.workdir / 'checkpoints'}: no checkpoint restores (did the model config change since they were "
        f"written?):\n  " + "\n  ".join(f"step {s}: {why}" for s, why in failed))

  def _check_process_count(self):
    """Each process's data position is saved apart (`data/process_<i>-of-<n>.json`): a resume needs the same n."""
    latest = self.last.latest_step()
    if latest is None:
      return
    saved = {int(m.group(1)) for f in (self.workdir / "checkpoints" / str(latest) / "data").glob("process_*-of-*.json")
             if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
    if saved and saved != {jax.process_count()}:
      raise ResumeMismatch(
          f"{self.workdir / 'checkpoints'} step {latest} was written by {max(saved)} process(es), this run has "
          f"{jax.process_count()}: each process's position in the data is saved apart, so resume with "
          f"{max(saved)} processes (or train afresh in a new workdir)")

  def _move_aside(self, step: int, why: str, fallback: int):
    aside = self.workdir / "damaged_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:  # One mover on a shared workdir; the others wait for it.
      aside.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.workdir / "checkpoints" / str(step)), str(aside))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
    self.last.reload()
    self.log(f"checkpoint {step} is damaged ({why}); resuming from checkpoint {fallback} instead. The damaged "
             f"one is kept in {aside}")

  def save_best(self, step: int, params, metrics: dict) -> bool:
    """Saves the best parameters unless this step is saved already (a resumed run validating it again)."""
    if step in self.best.all_steps():
      return False
    self._check_space(tree_nbytes(params), f"best checkpoint {step}")
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 metrics=ocp.args.JsonSave(metrics)), force=True)
    return True

  def _check_space(self, nbytes: int, what: str):
    short = shortfall(self.workdir, nbytes)  # Arrays plus metadata and the iterator state.
    if short:
      (need, free), latest = short, self.last.latest_step()
      raise DiskFull(
          f"not enough disk space in {self.workdir} for {what}: it needs about {size_text(need)}, "
          f"{size_text(free)} are free. Free some space (or set --config.checkpoint.keep=1, or use a workdir on "
          f"a larger disk) and rerun the same command: it resumes from "
          + (f"step {latest}" if latest is not None else "the start (no checkpoint was written yet)"))

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
