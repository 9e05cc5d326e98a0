"""The training run, in three parts: `setup` (mesh, data, model and weights, optimizer, sharded step,
checkpoints), `train_loop` (steps, progress, signals), `end_of_epoch` (validation, best checkpoint, early
stopping); `run` calls them and `finish` exports and writes the summary.

A run restarted with the same workdir resumes from its last checkpoint by itself (parameters, optimizer
state, step, data iterator, early-stopping state), and then produces the same losses step for step as an
uninterrupted run: the step RNG is fold_in(seed, step) and the Grain iterator continues on the next batch.
SIGTERM/SIGINT save a checkpoint and return normally; checkpoints are also written every
`checkpoint.every_steps` steps, so a SIGKILL loses at most that many. A non-finite loss, gradient, parameter or
validation loss stops the run naming the step; nothing non-finite is ever saved. One run at a time per workdir
(runs/workdir_lock.py).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from retfiner_jax.data import pipeline
from retfiner_jax.errors import ConfigError, NonFiniteLoss
from retfiner_jax.models.attention import ATTENTION_KERNELS
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import RetFiner, init_params
from retfiner_jax.refine import aot, inputs
from retfiner_jax.metrics.embeddings import COLLAPSED_COSINE
from retfiner_jax.refine.objectives import ITM_PRIOR_LOSS, ObjectiveSettings, chance_values, make_loss_fn
from retfiner_jax.refine.step import (ShardedStep, check_batch_divides, model_config, objective_settings,
                                      sharded_train_step)
from retfiner_jax.refine.validation import evaluate, make_embed_fn
from retfiner_jax.runs import compile_options, sharding, targets, whole_files
from retfiner_jax.runs.checkpoints import RunCheckpoints
from retfiner_jax.runs.run_log import RunLog, losses_line, plot_run
from retfiner_jax.runs.signals import signals_requesting_stop
from retfiner_jax.runs.workdir import check_resume_config, prepare_workdir
from retfiner_jax.runs.workdir_lock import WorkdirLock
from retfiner_jax.weights import exports
from retfiner_jax.weights import files as weight_files
from retfiner_jax.weights import sizes as weight_sizes


# What a run says at start-up about a tower that starts from random weights.
RANDOM_TOWER_WARNINGS = {
    "vision_encoder": "warning: the vision encoder starts from random weights (config.weights.vision is empty); "
                      "RetFiner refines an FM: give its checkpoint with --config.weights.vision=PATH",
    "text_encoder": "warning: the text encoder starts from random weights (config.weights.text is empty). RetFiner "
                    "expects a pretrained BERT (the original loads bert-base-uncased): a random BERT gives every "
                    "report nearly the same [CLS] output, so ITC and ITM cannot start and stay at their chance "
                    "values while the FM takes their noise. Give one with --config.weights.text=DIR (a Hugging Face "
                    "BERT folder, or a converted one: tools/convert_weights.py)",
}


def check_settings(config):
  """Settings that cannot work, each named with its fix, before anything is built."""
  at_least = [("train.batch_size", 1), ("train.micro_batches", 1), ("train.epochs", 1), ("train.log_every", 1),
              ("train.patience", 1), ("checkpoint.keep", 1), ("checkpoint.every_steps", 0),
              ("data.num_workers", 0)]
  for key, low in at_least:
    value = config[key.split(".")[0]][key.split(".")[1]]
    if value < low:
      raise ConfigError(f"config.{key} must be at least {low}, got {value}: set --config.{key}=N with N >= {low}")
  # Export formats that cannot be written here are an error now, not at the end of the run.
  exports.parse_formats(config.export.formats, config.tokenizer or config.weights.text or config.weights.retfiner)
  if not config.train.learning_rate > 0:
    raise ConfigError(f"config.train.learning_rate must be above 0, got {config.train.learning_rate}")
  if config.data.image_dtype not in pipeline.IMAGE_DTYPES:
    raise ConfigError(f"config.data.image_dtype must be one of {sorted(pipeline.IMAGE_DTYPES)}, got "
                      f"{config.data.image_dtype!r}")


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
  step_fn: Callable  # (state, batch, seed) -> (state, metrics), jitted and sharded; compiled before the loop.
  compile_step: Callable  # () -> the compiled step (compile_step), run on a thread of its own (start_compile).
  compiling: concurrent.futures.Future | None  # That thread's (compiled step, seconds), started by `setup`.
  seed: Any  # The step's seed argument: config.seed on the devices (ShardedStep.seed).
  eval_loss_fn: Callable
  embed_fn: Callable
  param_shardings: Any
  abstract_params: Any
  log: Callable = print
  timings: Timings | None = None  # Set by `run`.
  step_reached: int | None = None  # The last step the loop reached (train_loop).

  def global_batch(self, batch):
    return sharding.global_batch(self.mesh, batch)

  def save(self, step):
    progress = dataclasses.asdict(self.progress) | {"seed": self.config.seed}
    self.checkpoints.save(step, self.state, self.train_iter, progress)


# Settings a resumed run may change: how long it runs, how it reports and saves, how it reads and shards.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.log_every", "train.patience", "checkpoint.",
                     "data.num_workers", "data.image_dtype", "compile_cache", "compiled_step", "mesh.", "eval.recall_at",
                     "export.", "model.remat")  # model.remat recomputes the same values.


def setup(config, workdir, log=print, explicit_model_keys=(), timings: Timings | None = None) -> Run:
  """Builds the run (data, sharded step, parameters or the checkpoint's state) and starts compiling the step
  alongside (Run.compiling) where steps remain to train; each part timed as a start-up phase when `timings` is
  given."""
  phase = timings.phase if timings is not None else lambda name: contextlib.nullcontext()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  weight_sizes.resolve_model_sizes(config, explicit_model_keys, log)  # Before the config is saved or compared.
  check_resume_config(config, workdir, RESUMABLE_CHANGES, log)
  cfg, settings = model_config(config), objective_settings(config)
  with phase("backend and mesh"):
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  check_batch_divides(config, mesh)
  log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es)")
  with phase("manifests, checks and tokenising"):  # Data first: the pipeline's checks are fast and fail early.
    data = inputs.setup_data(config, cfg, mesh, log, workdir)
  with phase("the sharded step's shapes"):
    built = sharded_train_step(config, cfg, settings, mesh)
    seed = built.seed(config.seed)  # Checked here, before any parameter is made or loaded.
  log(f"random bits of the step (dropout, drop-path, masks, negatives): {built.prng} (config.train.prng="
      f"{config.train.prng})")
  log(f"attention kernel: {ATTENTION_KERNELS[built.model.cfg.attention]} (config.model.attention="
      f"{config.model.attention}); rematerialisation: {built.model.cfg.remat} (config.model.remat="
      f"{config.model.remat})")
  model, abstract_params, param_sh = built.model, built.abstract_params, built.param_shardings
  abstract_state, state_sh = built.abstract_state, built.state_shardings
  with phase("checkpoint manager"):
    checkpoints = RunCheckpoints(workdir, config.checkpoint.keep, log)
  # The step is compiled from its shapes alone, so its compile runs alongside the parameters and the first batch.
  compile_fn = functools.partial(compile_step, config, built, log)
  fresh = checkpoints.latest_step() is None
  if fresh:  # Its weights must be there before the compile starts (XLA cannot stop a compile).
    weight_files.configured_weights(config)
  compiling = start_compile(compile_fn) if training_remains(checkpoints, data[5]) else None
  try:
    if fresh:
      for tower in randomly_initialised(config):
        log(RANDOM_TOWER_WARNINGS[tower])
      with phase("parameters (initialised, pretrained weights loaded)"):
        params = initial_params(config, cfg, log, shardings=param_sh)
        state, progress = jax.jit(built.init_state, out_shardings=state_sh)(params), Progress()
        jax.block_until_ready(state)  # Made on the devices asynchronously: the phase waits for them.
    else:
      with phase("parameters (restored)"):
        state, saved, resume_step = checkpoints.restore(with_shardings(abstract_state, state_sh), data[0])
        jax.block_until_ready(state)
      saved_seed = saved.pop("seed")
      if saved_seed != config.seed:
        raise ConfigError(f"{workdir} was trained with seed {saved_seed}, config.seed is {config.seed}: resume "
                         f"with the same seed, or use a new workdir")
      progress = Progress(**saved)
      log(f"resumed from {workdir / 'checkpoints'} at step {resume_step} (epoch {progress.epoch})")
  except BaseException:
    if compiling is not None and not compiling.done():
      log("(the train step's compile, running alongside, has to end before this process exits: XLA cannot stop "
          "a compile)")
    raise

  return Run(config, workdir, cfg, settings, mesh, model, *data, state=state, progress=progress,
             checkpoints=checkpoints, step_fn=built.step_fn, compile_step=compile_fn, compiling=compiling,
             seed=seed, eval_loss_fn=jax.jit(sharding.traced_on(
                 mesh, make_loss_fn(model, settings, token_groups=sharding.batch_shards(mesh)))),
             embed_fn=make_embed_fn(model, mesh), param_shardings=param_sh, abstract_params=abstract_params, log=log)


def initial_params(config, cfg: ModelConfig, log=print, shardings=None) -> dict:
  """The parameters a fresh run starts from, on the devices (`shardings`: the run's parameter shardings; None:
  JAX's default device): the model's initialisation from config.seed, made where it will live (no copy through
  the host; the values do not depend on the sharding), with the configured pretrained weights put in
  (weights/files.py, load_pretrained), which alone travel from the host."""
  params = jax.jit(lambda r: init_params(cfg, r), out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  params = weight_files.load_pretrained(config, cfg, params, log)
  return jax.device_put(params, shardings)  # The loaded leaves (numpy); the others are already in place.


# ---------------------------------------------------------------------------------------------------------
# The loop.

# The one start-up phase that runs alongside others (on its own thread, from the checkpoint manager's end): the
# other phases, one after the other, add up to the time to the first step.
COMPILE_PHASE = "compile (alongside the parameters and the first batch)"


@dataclasses.dataclass
class Timings:
  """A run's time, each part under its own name in summary.json (`Timings.summary`)."""
  launched: float  # When the command started (main's first line), else when `run` was called.
  first_step_seconds: float | None = None  # From launch to the first step's result.
  steady_from: tuple | None = None  # (time, step) at the end of the first logged interval.
  steady_to: tuple | None = None  # (time, step) when the last step's result was in.
  paused: float = 0.0  # Validation and checkpoint writes after steady_from.
  input: Any = None  # The loop's InputWait.
  # {phase: seconds} up to the first step, in order; all but COMPILE_PHASE one after the other.
  startup: dict = dataclasses.field(default_factory=dict)

  @contextlib.contextmanager
  def phase(self, name: str):
    """Times one start-up phase (logged once, with the others, when the first step is done)."""
    started = time.time()
    try:
      yield
    finally:
      self.startup[name] = time.time() - started

  @property
  def compile_seconds(self) -> float:
    return self.startup.get(COMPILE_PHASE, 0.0)

  def startup_line(self) -> str:
    return ("start-up: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.startup.items())
            + f"; the first step's result {self.first_step_seconds:.1f} s after launch")

  @contextlib.contextmanager
  def pause(self):
    started = time.time()
    try:
      yield
    finally:
      if self.steady_from is not None:
        self.paused += time.time() - started

  def summary(self, batch_size: int) -> dict:
    """time_to_first_step_seconds (launch to the first step's result: set-up, compile and that step),
    compile_seconds, startup_seconds (each start-up phase's seconds, `phase`), steady_samples_per_second (from
    the end of the first logged interval to the last step,
    validation and checkpoint writes left out; None with fewer than two logged points),
    input_wait_seconds_per_step (the loop's wait for batches, averaged over the steps)."""
    wait = self.input
    steady = None
    if self.steady_from and self.steady_to and self.steady_to[1] > self.steady_from[1]:
      seconds = self.steady_to[0] - self.steady_from[0] - self.paused
      steady = (self.steady_to[1] - self.steady_from[1]) * batch_size / max(seconds, 1e-9)
    return {"time_to_first_step_seconds": self.first_step_seconds, "compile_seconds": self.compile_seconds,
            "startup_seconds": dict(self.startup),
            "steady_samples_per_second": steady,
            "input_wait_seconds_per_step": wait.total_seconds / max(wait.total_steps, 1) if wait else None}


class InputWait:
  """Time the loop spends waiting for batches, reported per step and as a share of wall time since the last
  report."""

  def __init__(self):
    self.total_seconds, self.total_steps = 0.0, 0  # The run's totals (summary.json).
    self.reset()

  def reset(self):
    self.seconds, self.since, self.steps = 0.0, time.time(), 0

  def next(self, iterator, to_global):
    started = time.time()
    batch = to_global(next(iterator))
    waited = time.time() - started
    self.seconds += waited
    self.total_seconds += waited
    self.total_steps += 1
    return batch

  def report(self) -> dict:
    wall = max(time.time() - self.since, 1e-9)
    out = {"input_wait_s": self.seconds / max(self.steps, 1), "input_wait_fraction": self.seconds / wall}
    self.reset()
    return out


def compile_step(config, built: ShardedStep, log=print):
  """The step compiled for this run's batches from the shapes and shardings of its arguments alone
  (ShardedStep.abstract_args: no array is needed), or loaded from `config.compiled_step` (saved by
  `python -m retfiner_jax.aot --save`, refused unless it is this very program for these devices). Running out
  of device memory while compiling is one error with XLA's figures (aot.DeviceMemoryExceeded)."""
  started = time.time()
  cfg = built.model.cfg
  lowered = built.step_fn.lower(*built.abstract_args(config.train.batch_size, cfg.max_text_length, cfg.image_size,
                                                     jax.process_count() > 1, config.data.image_dtype))
  devices = list(built.mesh.devices.flat)
  if config.compiled_step:
    step_fn = aot.load_compiled(config.compiled_step, lowered, devices)
    log(f"loaded the compiled train step from {config.compiled_step} in {time.time() - started:.1f} s")
    return step_fn
  options = compile_options.for_train_step(devices)
  log(f"compiling the train step{compile_options.described(options)} ...")
  try:
    step_fn = lowered.compile(options)
  except Exception as e:  # noqa: BLE001 (XLA's errors have no narrower public type)
    if targets.is_out_of_memory(e):
      raise aot.out_of_memory(e, devices) from None
    raise
  log(f"compiled the train step in {time.time() - started:.1f} s")
  return step_fn


def start_compile(compile_fn: Callable) -> concurrent.futures.Future:
  """Runs `compile_fn` (compile_step) on a thread of its own; the future gives (its result, its seconds). XLA
  compiles without holding Python's lock, so the thread that started it goes on with other work meanwhile."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
  started = time.time()
  future = pool.submit(lambda: (compile_fn(), time.time() - started))
  pool.shutdown(wait=False)  # The thread ends with the compile.
  return future


def training_remains(checkpoints: RunCheckpoints, total_steps: int) -> bool:
  """Whether the run's latest checkpoint leaves steps to train (none: a fresh run). A rerun that only writes the
  exports of a finished or early-stopped run compiles nothing."""
  latest = checkpoints.latest_step()
  if latest is None:
    return True
  if latest >= total_steps:
    return False
  try:
    return not checkpoints.saved_progress(latest).get("stopped_early", False)
  except Exception:  # noqa: BLE001 - a damaged checkpoint: the restore names it, and an older one may train on.
    return True


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
  # ITC's chance is ln(rows) of the validation batches (the last may be smaller), weighted as the loss is.
  losses = losses_line(val, ("loss_itc", "loss_itm"),
                      {"loss_itc": val.get("chance_loss_itc"), "loss_itm": ITM_PRIOR_LOSS})
  r.log(f"validation {when}: loss {val.get('loss', float('nan')):.4f}  {losses}  " +
        "  ".join(f"{k} {v:.3f}" for k, v in val.items() if k.startswith("recall") and k.endswith(("_at_1", "_at_5"))))
  for side in ("text", "image"):
    cosine = val.get(f"{side}_embedding_cosine")
    if cosine is not None and cosine > COLLAPSED_COSINE:
      r.log(f"warning: the {side} embeddings are collapsed: mean pairwise cosine {cosine:.5f} over the "
            f"{int(val['examples'])} validation pairs (above {COLLAPSED_COSINE}); every {'report' if side == 'text' else 'image'} "
            f"gets nearly the same contrastive embedding, so ITC cannot learn"
            + (" (is the text tower pretrained? config.weights.text)" if side == "text" else ""))
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
  step = r.step_reached = int(jax.device_get(r.state["step"]))
  pending, batch, several, timings = None, None, jax.process_count() > 1, r.timings

  def to_global(local):
    if several:  # Each row says whether this process was signalled; the step reports the maximum.
      local = dict(local, stop=np.full(len(local["pair_ids"]), stop["signal"] is not None, np.int32))
    return r.global_batch(local)
  if step < r.total_steps and not r.progress.stopped_early:
    # The compile started at set-up (unless the latest checkpoint had stopped early and an older one was
    # restored); the first batch loads (the workers start) while it goes on, and goes to the devices after it.
    compiling = r.compiling or start_compile(r.compile_step)
    with timings.phase("first batch"):
      local = next(r.train_iter)
    with timings.phase("waiting for the compile"):
      r.step_fn, timings.startup[COMPILE_PHASE] = compiling.result()
    batch = to_global(local)
  wait = timings.input = InputWait()  # Waits for the batches of steps (not the one fetched before the compile).
  while step < r.total_steps and not r.progress.stopped_early:
    batch = wait.next(r.train_iter, to_global) if batch is None else batch
    r.state, metrics = r.step_fn(r.state, batch, r.seed)
    if timings.first_step_seconds is None:  # Waits for the first step alone, once.
      with timings.phase("first step"):
        jax.block_until_ready(metrics["loss"])
      timings.first_step_seconds = time.time() - timings.launched
      r.log(timings.startup_line())
    batch, step, wait.steps = None, step + 1, wait.steps + 1
    r.step_reached = step
    requested = check_finite(r, *pending) if pending is not None else False
    pending = (step, metrics)
    if step % r.config.train.log_every == 0 or step == r.total_steps:
      check_finite(r, step, metrics)
      host = dict(jax.device_get(metrics), **wait.report())
      host.pop("stop_requested", None)
      run_log.write("train", step, host, epoch=r.progress.epoch + 1)  # The epoch in progress, counted from 1.
      run_log.progress(r.progress.epoch + 1, step, host)
      timings.steady_to = (time.time(), step)
      if timings.steady_from is None:  # Steady throughput leaves the compile and the first interval out.
        timings.steady_from = timings.steady_to
    if step % r.steps_per_epoch == 0:
      check_finite(r, step, metrics)
      with timings.pause():
        end_of_epoch(r, step, run_log)
    elif r.config.checkpoint.every_steps > 0 and step % r.config.checkpoint.every_steps == 0:
      check_finite(r, step, metrics)
      with timings.pause():
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
    if timings.steady_to is None or timings.steady_to[1] != step:
      timings.steady_to = (time.time(), step)
    if r.progress.best_step < 0 and step % r.steps_per_epoch:  # Ended within the first epoch: validate once.
      validate(r, step, run_log, f"at the end (step {step}, within epoch {r.progress.epoch + 1})")
    if r.checkpoints.latest_step() != step:
      r.save(step)
  return "finished", step


def run(config, workdir, log=print, explicit_model_keys=(), launched: float | None = None) -> dict:
  """Trains; returns a summary dict (also written to workdir/summary.json). The model's sizes come from the
  configured weights except the `config.model` keys named in `explicit_model_keys` (the command line's).
  `launched`: when the command started (time.time()), so that start-up is timed from there."""
  check_settings(config)
  workdir = prepare_workdir(workdir)
  primary = jax.process_index() == 0  # Writes the run's files; every process trains and saves checkpoints.
  with WorkdirLock(workdir, log) if primary else contextlib.nullcontext():
    timings = Timings(launched=launched or time.time())
    if launched:
      timings.startup["launch to set-up (imports, flags, config)"] = time.time() - launched
    r = setup(config, workdir, log, explicit_model_keys, timings)
    r.timings = timings
    start_step, start_time = int(jax.device_get(r.state["step"])), time.time()
    rows = config.train.batch_size // config.train.micro_batches  # ITC and ITM see a micro-batch at a time.
    chance = chance_values(rows)
    log(f"chance values (nothing learnt), for batches of {rows}: "
        f"ITC loss ln B = {chance['loss_itc']:.4f} (accuracy {100 * chance['itc_i2t_accuracy']:.1f}%), ITM loss "
        f"{chance['loss_itm']:.4f} (the 1:2 prior, accuracy {100 * chance['itm_accuracy']:.1f}% by always saying "
        f"'no match')")
    run_log = RunLog(r.workdir, r.total_steps, config.train.batch_size, log, start_step=start_step,
                     primary=primary, chance=chance)
    try:
      with signals_requesting_stop() as stop:
        status, step = train_loop(r, run_log, stop)
    except Exception as e:  # The step it happened at, for the lost-host line (runs/lost_peer.py).
      e.retfiner_step = r.step_reached
      raise
    finally:
      run_log.close()
      r.train_iter.close()  # Stops Grain's worker processes and frees their shared memory, also on a signal.
    # A signal now (another host's preemption reaching this one seconds later) does not cut the exports short.
    with signals_requesting_stop():
      return finish(r, status, step, (step - start_step) * config.train.batch_size, time.time() - start_time)


def finish(r: Run, status: str, step: int, samples: int, seconds: float) -> dict:
  """Exports the best (or last) parameters of a finished run, waits for the checkpoint writes, writes
  summary.json."""
  p = r.progress
  skipped = pipeline.skipped_records(r.train_source) + pipeline.skipped_records(r.val_source)
  summary = {"status": status, "steps": step, "epochs": p.epoch,
             "best_val_loss": p.best_val_loss if np.isfinite(p.best_val_loss) else None,  # Strict JSON.
             "best_step": p.best_step, "stopped_early": p.stopped_early, "train_seconds": seconds,
             # Samples over the whole loop's wall time, compile, validation and checkpoint writes included; the
             # training speed is steady_samples_per_second (Timings.summary).
             "wall_samples_per_second": samples / max(seconds, 1e-9), **r.timings.summary(r.config.train.batch_size),
             "records_skipped_while_loading": skipped, "initialised_randomly": randomly_initialised(r.config)}
  t = summary
  if t["time_to_first_step_seconds"] is not None:
    r.log(f"time to the first step {t['time_to_first_step_seconds']:.1f} s (compile {t['compile_seconds']:.1f} s); "
          + (f"steady {t['steady_samples_per_second']:.1f} samples/s (compile, the first logged interval, "
             f"validation and checkpoints left out); " if t["steady_samples_per_second"] else "")
          + f"input wait {t['input_wait_seconds_per_step']:.3f} s a step")
  if skipped:
    r.log(f"skipped {skipped} records that failed to load (config.data.skip_bad_records)")
  primary = jax.process_index() == 0
  end = summary["end_of_run_seconds"] = {}  # Each part after the last step, in order.
  if status == "finished":
    # The final checkpoint is complete before any export starts: a kill during the exports leaves it intact, and
    # a rerun with the same workdir resumes at the last step and writes the exports without training again.
    started = time.time()
    r.checkpoints.wait()
    end["final checkpoint"] = time.time() - started
    r.log(f"final checkpoint written in {end['final checkpoint']:.1f} s")
    started = time.time()
    best, _ = r.checkpoints.restore_best(with_shardings(r.abstract_params, r.param_shardings))
    final = sharding.to_host(best if best is not None else r.state["params"])  # Every process takes part.
    if primary:
      text_source = r.config.weights.text or r.config.weights.retfiner
      summary["exported"] = exports.export_model(
          r.cfg, final, r.workdir / "export", inputs.tokenizer_path(r.config),
          weight_files.source_pooler(text_source) if text_source else None, p.epoch, step, r.log,
          formats=r.config.export.formats)
      plot_run(r.workdir)
    end["exports (best parameters read, every format written)"] = time.time() - started
  started = time.time()
  r.checkpoints.close()  # Waits for the asynchronous checkpoint writes.
  end["checkpoint writes"] = time.time() - started
  r.log(f"checkpoint writes finished in {end['checkpoint writes']:.1f} s")
  if primary:
    whole_files.write_json(r.workdir / "summary.json", summary, allow_nan=False)
  return summary


def randomly_initialised(config) -> list[str]:
  """The towers no pretrained weights are configured for."""
  w = config.weights
  if w.retfiner:
    return []
  return [name for name, path in (("vision_encoder", w.vision), ("text_encoder", w.text)) if not path]
