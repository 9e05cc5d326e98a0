"""The training run, in three parts: `setup` (mesh, data, model and weights, optimizer, sharded step,
checkpoints), `train_loop` (steps, progress, signals), `end_of_epoch` (validation, best checkpoint, early
stopping); `run` calls them and `finish` exports and writes the summary.

A run restarted with the same workdir resumes from its last checkpoint by itself (parameters, optimizer
state, step, data iterator, early-stopping state), and then produces the same losses step for step as an
uninterrupted run: the step RNG is fold_in(seed, step) and the Grain iterator continues on the next batch.
SIGTERM/SIGINT save a checkpoint and return normally; checkpoints are also written every
`checkpoint.every_steps` steps, so a SIGKILL loses at most that many. A non-finite loss, gradient, parameter or
validation loss stops the run naming the step; nothing non-finite is ever saved. One run at a time per workdir
(workdir_lock.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from retfiner_jax import exports, sharding, weight_sizes, weights
from retfiner_jax.checkpoints import RunCheckpoints
from retfiner_jax.data import check, pipeline
from retfiner_jax.data.manifest import Columns, read_manifest
from retfiner_jax.errors import ConfigError, MissingInput
from retfiner_jax.evaluate import evaluate, make_embed_fn
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import RetFiner, init_params
from retfiner_jax.objectives import ObjectiveSettings, make_loss_fn
from retfiner_jax.run_log import RunLog, plot_run
from retfiner_jax.train_step import make_optimizer, make_train_step
from retfiner_jax.workdir_lock import WorkdirLock


class NonFiniteLoss(RuntimeError):
  pass


def objective_settings(config) -> ObjectiveSettings:
  return ObjectiveSettings(**config.train.objectives)


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict(), source="config.model")


def check_settings(config):
  """Settings that cannot work, each named with its fix, before anything is built."""
  at_least = [("train.batch_size", 1), ("train.micro_batches", 1), ("train.epochs", 1), ("train.log_every", 1),
              ("train.patience", 1), ("checkpoint.keep", 1), ("checkpoint.every_steps", 0),
              ("data.num_workers", 0)]
  for key, low in at_least:
    value = config[key.split(".")[0]][key.split(".")[1]]
    if value < low:
      raise ConfigError(f"config.{key} must be at least {low}, got {value}: set --config.{key}=N with N >= {low}")
  if not config.train.learning_rate > 0:
    raise ConfigError(f"config.train.learning_rate must be above 0, got {config.train.learning_rate}")


# ---------------------------------------------------------------------------------------------------------
# Data.

def tokenizer_path(config) -> str:
  if config.tokenizer:
    return config.tokenizer
  text = Path(config.weights.text) if config.weights.text else None
  if text is not None and (text / "vocab.txt").exists():
    return str(text)
  raise ConfigError("no tokenizer: set config.tokenizer to a vocab.txt (or a BERT folder holding one), or "
                   "config.weights.text to a Hugging Face BERT folder with its vocab.txt")


def tfds_split(value: str, which: str) -> tuple[str, str]:
  """A manifest setting -> (path, split): a built dataset folder is read at split `which` ("train", "val"), or
  at the split named after a colon (`DIR:validation`)."""
  head, sep, tail = str(value).rpartition(":")
  if sep and tail and "/" not in tail and Path(head).is_dir():
    return head, tail
  return str(value), which


def load_split(config, which: str, log=print, report_dir=None):
  manifest = config.data[f"{which}_manifest"]
  if not manifest:
    raise ConfigError(f"config.data.{which}_manifest is empty: give a CSV/TSV/JSONL/Parquet manifest of "
                     f"image paths and reports (check it first with python -m retfiner_jax.data.check FILE)")
  folder, split = tfds_split(manifest, which)
  if not Path(folder).exists():
    raise MissingInput(f"config.data.{which}_manifest = {manifest}: file not found")
  if Path(folder).is_dir():  # A dataset built by data/tfds_builders.py.
    from retfiner_jax.data import tfds_builders
    records = tfds_builders.pairs_records(folder, split)
  else:
    d = config.data
    columns = Columns(image=d.image_column, report=d.report_column, id=d.id_column, slice=d.slice_column)
    records = read_manifest(manifest, columns)
  # Every row is checked before anything else reads it (a report that is not UTF-8 cannot be tokenised).
  bad = check.check_records(records, log=log if len(records) > 5000 else None)
  if bad:
    report = None if report_dir is None else Path(report_dir) / f"bad_rows_{which}.csv"
    table = check.problem_table(records, bad, report_path=report)
    if not config.data.skip_bad_records:
      raise ConfigError(f"{manifest}: {len(bad)} rows have problems; fix them, or set "
                       f"config.data.skip_bad_records=True to leave them out:\n{table}")
    log(f"{which}: leaving out {len(bad)} bad rows (config.data.skip_bad_records):\n{table}")
    records = [r for r in records if r["row"] not in bad]
    if not records:
      raise ConfigError(f"{manifest}: no usable rows left")
  records, truncated = pipeline.tokenise_records(records, tokenizer_path(config), config.model.max_text_length)
  top = max(int(np.max(r["input_ids"])) for r in records)
  if top >= config.model.vocab_size:  # An embedding lookup past the table would silently read its last row.
    raise ConfigError(f"the tokenizer {tokenizer_path(config)} gives token id {top}, but the text encoder has "
                      f"config.model.vocab_size = {config.model.vocab_size} embeddings: use the text weights' own "
                      f"vocabulary (config.tokenizer)")
  log(f"{which}: {len(records)} pairs from {manifest}"
      + (f" ({truncated} reports truncated to {config.model.max_text_length} tokens)" if truncated else ""))
  return records, manifest


# ---------------------------------------------------------------------------------------------------------
# Set-up.

def with_shardings(abstract_tree, shardings):
  """Shapes/dtypes plus target shardings: what Orbax restores onto."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


@dataclasses.dataclass
class Progress:
  epoch: int = 0
  best_val_loss: float = float("inf")
  best_step: int = -1
  bad_epochs: int = 0
  stopped_early: bool = False


@dataclasses.dataclass
class Run:
  """What `setup` builds and the loop uses."""
  config: Any
  workdir: Path
  cfg: ModelConfig
  settings: ObjectiveSettings
  mesh: Any
  model: RetFiner
  train_iter: Any
  train_source: str
  val_batches: Callable  # () -> a fresh iterator over the validation batches.
  val_source: str
  steps_per_epoch: int
  total_steps: int
  state: dict
  progress: Progress
  checkpoints: RunCheckpoints
  step_fn: Callable  # (state, batch) -> (state, metrics), jitted and sharded.
  eval_loss_fn: Callable
  embed_fn: Callable
  param_shardings: Any
  abstract_params: Any
  log: Callable = print

  def global_batch(self, batch):
    return sharding.global_batch(self.mesh, batch)

  def save(self, step):
    progress = dataclasses.asdict(self.progress) | {"seed": self.config.seed}
    self.checkpoints.save(step, self.state, self.train_iter, progress)


def setup_data(config, cfg: ModelConfig, mesh, log, workdir=None):
  """-> (train iterator, train source, val-batches factory, val source, steps per epoch, total steps)."""
  batch_size = config.train.batch_size
  train_records, train_source = load_split(config, "train", log, workdir)
  val_records, val_source = load_split(config, "val", log, workdir)
  spec = pipeline.ImageSpec(cfg.image_size, cfg.backbone, config.data.intensity, config.data.augment)
  steps_per_epoch = len(train_records) // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"{train_source}: {len(train_records)} pairs, fewer than one batch of {batch_size}")
  if len(train_records) % batch_size:
    log(f"train: an epoch is {steps_per_epoch} full batches of {batch_size} (static shapes): "
        f"{len(train_records) % batch_size} of the {len(train_records)} pairs do not fit in an epoch's batches "
        f"(the original keeps a last, smaller batch); the stream runs on, so they open the next epoch")
  total_steps = steps_per_epoch * config.train.epochs
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  pidx, pcount = jax.process_index(), jax.process_count()
  train_iter = iter(pipeline.train_dataset(train_records, spec, batch_size, config.seed, train_source,
                                           config.data.num_workers, config.data.skip_bad_records, pidx, pcount))
  eval_batch = min(batch_size, (len(val_records) // mesh.size) * mesh.size) or mesh.size

  def val_batches():
    return pipeline.eval_dataset(val_records, spec, eval_batch, val_source, 0, config.data.skip_bad_records,
                                 pidx, pcount)
  return train_iter, train_source, val_batches, val_source, steps_per_epoch, total_steps


# Settings a resumed run may change: how long it runs, how it reports and saves, how it reads and shards.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.log_every", "train.patience", "checkpoint.",
                     "data.num_workers", "compile_cache", "mesh.", "eval.recall_at")


def _flat(d: dict, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resume_config(config, workdir: Path, log=print):
  """A workdir with checkpoints resumes only with the model and data it was trained with: any other change is
  refused, listing the keys. The saved config.json is written by a fresh run only and never overwritten."""
  saved_path = workdir / "config.json"
  new = json.loads(config.to_json_best_effort())
  if not (workdir / "checkpoints").is_dir() or not any((workdir / "checkpoints").iterdir()) \
      or not saved_path.exists():
    if jax.process_index() == 0:  # One writer on a shared workdir.
      saved_path.write_text(json.dumps(new, indent=1))
    return
  old, now = _flat(json.loads(saved_path.read_text())), _flat(new)
  changed = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
  refused = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
  if refused:
    raise ConfigError(f"{workdir} was trained with other settings; resuming would mix two runs. Changed: "
                      + "; ".join(f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in refused)
                      + ". Use a new --workdir, or the saved settings (" + str(saved_path) + ")")
  if changed:
    log("resuming with changed settings: " + "; ".join(f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in changed))


def setup(config, workdir, log=print, explicit_model_keys=()) -> Run:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  weight_sizes.resolve_model_sizes(config, explicit_model_keys, log)  # Before the config is saved or compared.
  check_resume_config(config, workdir, log)
  cfg, settings = model_config(config), objective_settings(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.train.batch_size % (mesh.size * config.train.micro_batches):
    raise ConfigError(f"config.train.batch_size {config.train.batch_size} must be divisible by the {mesh.size} "
                     f"devices times config.train.micro_batches {config.train.micro_batches}")
  log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es)")
  data = setup_data(config, cfg, mesh, log, workdir)  # Data first: the pipeline's checks are fast and fail early.

  model, tx = RetFiner(cfg), make_optimizer(config)
  abstract_params = weights.abstract_params(cfg)
  param_sh = sharding.tree_shardings(mesh, abstract_params)
  checkpoints = RunCheckpoints(workdir, config.checkpoint.keep, log)

  def init_state(params):
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract_state = jax.eval_shape(init_state, abstract_params)
  state_sh = sharding.tree_shardings(mesh, abstract_state)
  if checkpoints.latest_step() is None:
    for tower in randomly_initialised(config):
      key = "vision" if tower == "vision_encoder" else "text"
      log(f"warning: the {tower.replace('_', ' ')} starts from random weights (config.weights.{key} is empty)")
    params = jax.tree.map(np.asarray, jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(config.seed)))
    params = jax.device_put(weights.load_pretrained(config, cfg, params, log), param_sh)
    state, progress = jax.jit(init_state, out_shardings=state_sh)(params), Progress()
  else:
    state, saved, resume_step = checkpoints.restore(with_shardings(abstract_state, state_sh), data[0])
    saved_seed = saved.pop("seed")
    if saved_seed != config.seed:
      raise ConfigError(f"{workdir} was trained with seed {saved_seed}, config.seed is {config.seed}: resume with "
                       f"the same seed, or use a new workdir")
    progress = Progress(**saved)
    log(f"resumed from {workdir / 'checkpoints'} at step {resume_step} (epoch {progress.epoch})")

  step_fn = jax.jit(make_train_step(model, settings, tx, config.seed, config.train.micro_batches),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  return Run(config, workdir, cfg, settings, mesh, model, *data, state=state, progress=progress,
             checkpoints=checkpoints, step_fn=step_fn, eval_loss_fn=jax.jit(make_loss_fn(model, settings)),
             embed_fn=make_embed_fn(model), param_shardings=param_sh, abstract_params=abstract_params, log=log)


# ---------------------------------------------------------------------------------------------------------
# The loop.

class InputWait:
  """Time the loop spends waiting for batches, reported per step and as a share of wall time since the last
  report."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.seconds, self.since, self.steps = 0.0, time.time(), 0

  def next(self, iterator, to_global):
    started = time.time()
    batch = to_global(next(iterator))
    self.seconds += time.time() - started
    return batch

  def report(self) -> dict:
    wall = max(time.time() - self.since, 1e-9)
    out = {"input_wait_s": self.seconds / max(self.steps, 1), "input_wait_fraction": self.seconds / wall}
    self.reset()
    return out


def check_finite(r: Run, step, metrics) -> bool:
  """Stops the run if step `step` gave a non-finite loss, gradient or parameters. Every checkpoint is written
  after this check, so the latest one is always finite. Returns whether any process asked to stop (a signal,
  carried through the step so that every process sees it at the same step)."""
  # One transfer for the scalars (this runs every step).
  loss, grad_norm, params_finite, stop_requested = map(float, jax.device_get(
      (metrics["loss"], metrics["grad_norm"], metrics["params_finite"], metrics.get("stop_requested", 0.0))))
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    problem = f"non-finite loss {loss} (gradient norm {grad_norm}) at step {step}"
  elif not params_finite:
    problem = f"non-finite parameters after step {step} (loss {loss}, gradient norm {grad_norm})"
  else:
    return bool(stop_requested)
  raise NonFiniteLoss(f"{problem}; stopping. The last good checkpoint is {r.workdir / 'checkpoints'} step "
                      f"{r.checkpoints.latest_step()}")


def validate(r: Run, step: int, run_log: RunLog, when: str) -> bool:
  """Validation losses and recalls, logged; the best checkpoint if they improved. Returns whether they did."""
  progress, config = r.progress, r.config
  val = evaluate(r.model, r.state["params"], r.val_batches(), r.settings, config.eval.seed, r.global_batch,
                 tuple(config.eval.recall_at), r.eval_loss_fn, r.embed_fn,
                 epoch=None if config.eval.fixed_sampling else progress.epoch)
  run_log.write("val", step, val, epoch=progress.epoch)
  r.log(f"validation {when}: loss {val.get('loss', float('nan')):.4f}  " +
        "  ".join(f"{k} {v:.3f}" for k, v in val.items() if k.startswith("recall") and k.endswith(("_at_1", "_at_5"))))
  val_loss = val.get("loss", float("nan"))
  if not np.isfinite(val_loss):
    raise NonFiniteLoss(f"non-finite validation loss {val_loss} {when} (step {step}); stopping. The last good "
                        f"checkpoint is {r.workdir / 'checkpoints'} step {r.checkpoints.latest_step()}")
  if val_loss < progress.best_val_loss:
    progress.best_val_loss, progress.best_step = val_loss, step
    r.checkpoints.save_best(step, r.state["params"], {"val_loss": val_loss, "epoch": progress.epoch})
    return True
  return False


def end_of_epoch(r: Run, step: int, run_log: RunLog):
  """Validation, the best checkpoint, early stopping, and the epoch's checkpoint."""
  progress, config = r.progress, r.config
  progress.epoch += 1
  if validate(r, step, run_log, f"after epoch {progress.epoch}"):
    progress.bad_epochs = 0
  else:
    progress.bad_epochs += 1
    if progress.bad_epochs >= config.train.patience:
      progress.stopped_early = True
      r.log(f"early stopping: no validation improvement for {progress.bad_epochs} epochs")
  r.save(step)


def train_loop(r: Run, run_log: RunLog, stop: dict) -> tuple[str, int]:
  """Steps until the end, early stopping or a signal (`stop["signal"]`); returns (status, step). The loss is
  checked one step late so that the host never waits for the device between steps."""
  step, wait = int(jax.device_get(r.state["step"])), InputWait()
  pending, batch = None, None
  several = jax.process_count() > 1

  def to_global(local):
    if several:  # Each row says whether this process was signalled; the step reports the maximum.
      local = dict(local, stop=np.full(len(local["pair_ids"]), stop["signal"] is not None, np.int32))
    return r.global_batch(local)
  if step < r.total_steps:  # Compiled on the first batch, timed apart from the first step.
    batch = wait.next(r.train_iter, to_global)
    r.log("compiling the train step ...")
    started = time.time()
    r.step_fn = r.step_fn.lower(r.state, batch).compile()
    r.log(f"compiled the train step in {time.time() - started:.1f} s")
    wait.reset()
  while step < r.total_steps and not r.progress.stopped_early:
    batch = wait.next(r.train_iter, to_global) if batch is None else batch
    r.state, metrics = r.step_fn(r.state, batch)
    batch, step, wait.steps = None, step + 1, wait.steps + 1
    requested = check_finite(r, *pending) if pending is not None else False
    pending = (step, metrics)
    if step % r.config.train.log_every == 0 or step == r.total_steps:
      check_finite(r, step, metrics)
      host = dict(jax.device_get(metrics), **wait.report())
      host.pop("stop_requested", None)
      run_log.write("train", step, host, epoch=r.progress.epoch + 1)  # The epoch in progress, counted from 1.
      run_log.progress(r.progress.epoch + 1, step, host)
    if step % r.steps_per_epoch == 0:
      check_finite(r, step, metrics)
      end_of_epoch(r, step, run_log)
    elif r.config.checkpoint.every_steps > 0 and step % r.config.checkpoint.every_steps == 0:
      check_finite(r, step, metrics)
      r.save(step)
    # One process: at once. Several: when the step before this one says a process was signalled, so that all
    # of them save the same step.
    if (requested if several else stop["signal"]):
      check_finite(r, step, metrics)
      r.save(step)
      r.log(f"{stop['signal'] or 'another process was signalled'}: saved a checkpoint at step {step}; rerun "
            f"with the same workdir to resume")
      return "interrupted", step
  if pending is not None:
    check_finite(r, *pending)
    if r.progress.best_step < 0 and step % r.steps_per_epoch:  # Ended within the first epoch: validate once.
      validate(r, step, run_log, f"at the end (step {step}, within epoch {r.progress.epoch + 1})")
    if r.checkpoints.latest_step() != step:
      r.save(step)
  return "finished", step


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


def prepare_workdir(workdir) -> Path:
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"workdir {workdir} is a file; give a folder (it is created if missing)")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def run(config, workdir, log=print, explicit_model_keys=()) -> dict:
  """Trains; returns a summary dict (also written to workdir/summary.json). The model's sizes come from the
  configured weights except the `config.model` keys named in `explicit_model_keys` (the command line's)."""
  check_settings(config)
  workdir = prepare_workdir(workdir)
  primary = jax.process_index() == 0  # Writes the run's files; every process trains and saves checkpoints.
  with WorkdirLock(workdir, log) if primary else contextlib.nullcontext():
    r = setup(config, workdir, log, explicit_model_keys)
    start_step, start_time = int(jax.device_get(r.state["step"])), time.time()
    run_log = RunLog(r.workdir, r.total_steps, config.train.batch_size, log, start_step=start_step,
                     primary=primary)
    try:
      with signals_requesting_stop() as stop:
        status, step = train_loop(r, run_log, stop)
    finally:
      run_log.close()
      r.train_iter.close()  # Stops Grain's worker processes and frees their shared memory, also on a signal.
    return finish(r, status, step, (step - start_step) * config.train.batch_size, time.time() - start_time)


def finish(r: Run, status: str, step: int, samples: int, seconds: float) -> dict:
  """Exports the best (or last) parameters of a finished run, waits for the checkpoint writes, writes
  summary.json."""
  p = r.progress
  skipped = pipeline.skipped_records(r.train_source) + pipeline.skipped_records(r.val_source)
  summary = {"status": status, "steps": step, "epochs": p.epoch,
             "best_val_loss": p.best_val_loss if np.isfinite(p.best_val_loss) else None,  # Strict JSON.
             "best_step": p.best_step, "stopped_early": p.stopped_early, "train_seconds": seconds,
             "samples_per_second": samples / max(seconds, 1e-9), "records_skipped_while_loading": skipped,
             "initialised_randomly": randomly_initialised(r.config)}
  if skipped:
    r.log(f"skipped {skipped} records that failed to load (config.data.skip_bad_records)")
  primary = jax.process_index() == 0
  if status == "finished":
    best, _ = r.checkpoints.restore_best(with_shardings(r.abstract_params, r.param_shardings))
    final = sharding.to_host(best if best is not None else r.state["params"])  # Every process takes part.
    if primary:
      text_source = r.config.weights.text or r.config.weights.retfiner
      summary["exported"] = exports.export_model(
          r.cfg, final, r.workdir / "export", tokenizer_path(r.config),
          weights.source_pooler(text_source) if text_source else None, p.epoch, step, r.log)
      plot_run(r.workdir)
  started = time.time()
  r.checkpoints.close()  # Waits for the asynchronous checkpoint writes.
  r.log(f"checkpoint writes finished in {time.time() - started:.1f} s")
  if primary:
    (r.workdir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
  return summary


def randomly_initialised(config) -> list[str]:
  """The towers no pretrained weights are configured for."""
  w = config.weights
  if w.retfiner:
    return []
  return [name for name, path in (("vision_encoder", w.vision), ("text_encoder", w.text)) if not path]
