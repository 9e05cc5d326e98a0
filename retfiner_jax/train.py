"""The training loop: mesh -> data -> model and weights -> optimizer -> sharded step -> checkpoints -> loop.

A run restarted with the same workdir resumes from its last checkpoint by itself (parameters, optimizer
state, step, data iterator, early-stopping state), and then produces the same losses step for step as an
uninterrupted run: the step RNG is fold_in(seed, step) and the Grain iterator continues on the next batch.
SIGTERM/SIGINT save a checkpoint and return normally. A non-finite loss stops the run naming the step; the
last checkpoint written before it is left as it was.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retfiner_jax import convert, sharding, weights
from retfiner_jax.checkpoints import RunCheckpoints
from retfiner_jax.data import check, pipeline
from retfiner_jax.data.manifest import Columns
from retfiner_jax.evaluate import evaluate, make_embed_fn
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.objectives import ObjectiveSettings, make_loss_fn
from retfiner_jax.train_step import make_optimizer, make_train_step
from retfiner_jax.run_log import RunLog, plot_run


class NonFiniteLoss(RuntimeError):
  pass


def objective_settings(config) -> ObjectiveSettings:
  w = config.train.loss_weights
  return ObjectiveSettings(weights=(("itc", w.itc), ("itm", w.itm), ("mlm", w.mlm), ("gm", w.gm)),
                           mlm_probability=config.train.mlm_probability,
                           gm_probability=config.train.gm_probability, fused=config.train.fused_passes,
                           mlm_target_fraction=config.train.mlm_target_fraction,
                           gm_target_fraction=config.train.gm_target_fraction)


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict(), source="config.model")


# ---------------------------------------------------------------------------------------------------------
# Weights.

def _overlay(params: dict, loaded: dict, where: str, cfg: ModelConfig) -> dict:
  """Replaces the subtrees of `params` that `loaded` holds; every shape must match (pos_embed is resampled)."""
  flat = convert.flatten(params)
  new = convert.flatten(convert.to_layer_layout(loaded, cfg.scan_layers))
  problems = []
  for path, value in new.items():
    if path not in flat:
      problems.append(f"{'/'.join(path)} is not a parameter of the configured model")
      continue
    value = np.asarray(value)
    if path[-1] == "pos_embed" and value.shape != flat[path].shape:
      value = convert.resample_pos_embed(value, cfg.grid_size)
    if value.shape != tuple(flat[path].shape):
      problems.append(f"{'/'.join(path)}: weights {value.shape}, configured model {tuple(flat[path].shape)}")
      continue
    flat[path] = value
  if problems:
    raise ValueError(f"{where} does not fit config.model:\n  " + "\n  ".join(problems))
  return convert.unflatten(flat)


def load_pretrained(config, cfg: ModelConfig, params: dict, log=print) -> dict:
  """Puts the configured pretrained weights (FM, BERT, or a whole RetFiner model) into `params` (numpy)."""
  fmt = config.weights.format or None
  sources = ([("retfiner", config.weights.retfiner, None)] if config.weights.retfiner else
             [(n, p, n) for n, p in (("vision", config.weights.vision), ("text", config.weights.text)) if p])
  for name, path, part in sources:
    if not Path(path).exists():
      raise FileNotFoundError(
          f"config.weights.{name} = {path}: not found. Give a converted folder (python tools/convert_weights.py "
          f"--input CHECKPOINT --output DIR) or the PyTorch checkpoint itself.")
    _, loaded, meta = weights.load_weights(path, fmt=fmt, model_config=cfg, log=log)
    if part == "vision":
      if "vision_encoder" not in loaded:
        raise ValueError(f"config.weights.vision = {path} holds no vision encoder")
      source = meta.get("source_format")
      if source in ("retfound", "visionfm", "urfound") and source != cfg.backbone:
        raise ValueError(f"config.weights.vision = {path} is a {source} checkpoint but config.model.backbone is "
                         f"{cfg.backbone!r}; use configs/{source}.py or set --config.model.backbone={source}")
      loaded = {"vision_encoder": loaded["vision_encoder"]}
    elif part == "text":
      if "text_encoder" not in loaded:
        raise ValueError(f"config.weights.text = {path} holds no text encoder")
      loaded = {"text_encoder": loaded["text_encoder"]}
    params = _overlay(params, loaded, f"config.weights.{name} = {path}", cfg)
    log(f"loaded {', '.join(sorted(loaded))} from {path}")
  return params


# ---------------------------------------------------------------------------------------------------------
# Data.

def tokenizer_path(config) -> str:
  if config.tokenizer:
    return config.tokenizer
  text = Path(config.weights.text) if config.weights.text else None
  if text is not None and (text / "vocab.txt").exists():
    return str(text)
  raise ValueError("no tokenizer: set config.tokenizer to a vocab.txt (or a BERT folder holding one), or "
                   "config.weights.text to a Hugging Face BERT folder with its vocab.txt")


def load_split(config, which: str, log=print):
  manifest = config.data[f"{which}_manifest"]
  if not manifest:
    raise ValueError(f"config.data.{which}_manifest is empty: give a CSV/TSV/JSONL/Parquet manifest of "
                     f"image paths and reports (check it first with python -m retfiner_jax.data.check FILE)")
  if not Path(manifest).exists():
    raise FileNotFoundError(f"config.data.{which}_manifest = {manifest}: file not found")
  d = config.data
  columns = Columns(image=d.image_column, report=d.report_column, id=d.id_column, slice=d.slice_column)
  records, truncated = pipeline.load_pairs(manifest, tokenizer_path(config), config.model.max_text_length, columns)
  log(f"{which}: {len(records)} pairs from {manifest}"
      + (f" ({truncated} reports truncated to {config.model.max_text_length} tokens)" if truncated else ""))
  bad = check.check_records(records, log=log if len(records) > 5000 else None)
  if bad:
    table = check.problem_table(records, bad)
    if not config.data.skip_bad_records:
      raise ValueError(f"{manifest}: {len(bad)} rows have problems; fix them, or set "
                       f"config.data.skip_bad_records=True to leave them out:\n{table}")
    log(f"{which}: leaving out {len(bad)} bad rows (config.data.skip_bad_records):\n{table}")
    records = [r for r in records if r["row"] not in bad]
  return records, manifest


# ---------------------------------------------------------------------------------------------------------
# The run.

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


def run(config, workdir, log=print) -> dict:
  """Trains; returns a summary dict (also written to workdir/summary.json)."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  cfg = model_config(config)
  settings = objective_settings(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  batch_size = config.train.batch_size
  if batch_size % (mesh.size * config.train.micro_batches):
    raise ValueError(f"config.train.batch_size {batch_size} must be divisible by the {mesh.size} devices times "
                     f"config.train.micro_batches {config.train.micro_batches}")
  log(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es)")

  # Data first: the pipeline's checks are fast and fail early.
  train_records, train_source = load_split(config, "train", log)
  val_records, val_source = load_split(config, "val", log)
  spec = pipeline.ImageSpec(cfg.image_size, cfg.backbone, config.data.intensity, config.data.augment)
  steps_per_epoch = len(train_records) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{train_source}: {len(train_records)} pairs, fewer than one batch of {batch_size}")
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

  # Model, weights, optimizer, shardings.
  model = RetFiner(cfg, deterministic=cfg.text_dropout == 0 and cfg.drop_path == 0)
  eval_model = RetFiner(cfg, deterministic=True)
  tx = make_optimizer(config)
  abstract_params = weights.abstract_params(cfg)
  param_sh = sharding.tree_shardings(mesh, abstract_params)
  checkpoints = RunCheckpoints(workdir, config.checkpoint.keep)

  def init_state(params):
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract_state = jax.eval_shape(init_state, abstract_params)
  state_sh = sharding.tree_shardings(mesh, abstract_state)
  resume_step = checkpoints.latest_step()
  if resume_step is None:
    from retfiner_jax.models.retfiner import init_params
    params = jax.tree.map(np.asarray, jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(config.seed)))
    params = load_pretrained(config, cfg, params, log)
    params = jax.device_put(params, param_sh)
    state = jax.jit(init_state, out_shardings=state_sh)(params)
    progress = Progress()
  else:
    state, saved = checkpoints.restore(with_shardings(abstract_state, state_sh), train_iter)
    saved_seed = saved.pop("seed")
    if saved_seed != config.seed:
      raise ValueError(f"{workdir} was trained with seed {saved_seed}, config.seed is {config.seed}: resume with "
                       f"the same seed, or use a new workdir")
    progress = Progress(**saved)
    log(f"resumed from {workdir / 'checkpoints'} at step {resume_step} (epoch {progress.epoch})")

  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(model, settings, tx, config.seed, config.train.micro_batches),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  eval_loss_fn = jax.jit(make_loss_fn(eval_model, settings))
  embed_fn = make_embed_fn(eval_model)
  to_global = lambda b: sharding.global_batch(mesh, b)
  run_log = RunLog(workdir, total_steps, batch_size, log)

  stop = {"signal": None}

  def on_signal(signum, _frame):
    stop["signal"] = signal.Signals(signum).name
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  def progress_json():
    return dataclasses.asdict(progress) | {"seed": config.seed}

  def check_finite(step, metrics):
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      raise NonFiniteLoss(f"non-finite loss {loss} (gradient norm {grad_norm}) at step {step}; stopping. The "
                          f"last good checkpoint is {workdir / 'checkpoints'} step {checkpoints.latest_step()}")

  step = int(jax.device_get(state["step"]))
  start_time, start_step = time.time(), step
  pending = None  # (step, metrics) of the previous step, checked one step late to keep the device busy.
  status = "finished"
  waited = {"input_s": 0.0, "since": time.time(), "steps": 0}  # Time spent waiting for batches since the last log.

  def next_batch():
    started = time.time()
    batch = to_global(next(train_iter))
    waited["input_s"] += time.time() - started
    return batch

  def input_wait_metrics():
    wall = max(time.time() - waited["since"], 1e-9)
    out = {"input_wait_s": waited["input_s"] / max(waited["steps"], 1), "input_wait_fraction": waited["input_s"] / wall}
    waited.update(input_s=0.0, since=time.time(), steps=0)
    return out

  try:
    batch = None
    if step < total_steps:  # Compiled on the first batch, timed apart from the first step.
      batch = next_batch()
      log("compiling the train step ...")
      started = time.time()
      step_fn = step_fn.lower(state, batch).compile()
      log(f"compiled the train step in {time.time() - started:.1f} s")
      waited.update(input_s=0.0, since=time.time())
    while step < total_steps and not progress.stopped_early:
      batch = next_batch() if batch is None else batch
      state, metrics = step_fn(state, batch)
      batch = None
      step += 1
      waited["steps"] += 1
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      if step % config.train.log_every == 0 or step == total_steps:
        check_finite(step, metrics)
        host = dict(jax.device_get(metrics), **input_wait_metrics())
        run_log.write("train", step, host, epoch=progress.epoch)
        run_log.progress(progress.epoch, step, host)
      if step % steps_per_epoch == 0:
        check_finite(step, metrics)
        progress.epoch += 1
        val = evaluate(eval_model, state["params"], val_batches(), settings, config.eval.seed, to_global,
                       tuple(config.eval.recall_at), eval_loss_fn, embed_fn,
                       epoch=None if config.eval.fixed_sampling else progress.epoch)
        run_log.write("val", step, val, epoch=progress.epoch)
        log(f"validation after epoch {progress.epoch}: loss {val.get('loss', float('nan')):.4f}  " +
            "  ".join(f"{k} {v:.3f}" for k, v in val.items() if k.startswith("recall") and k.endswith(("@1", "@5"))))
        val_loss = val.get("loss", float("nan"))
        if val_loss < progress.best_val_loss:
          progress.best_val_loss, progress.best_step, progress.bad_epochs = val_loss, step, 0
          checkpoints.save_best(step, state["params"], {"val_loss": val_loss, "epoch": progress.epoch})
        else:
          progress.bad_epochs += 1
          if progress.bad_epochs >= config.train.patience:
            progress.stopped_early = True
            log(f"early stopping: no validation improvement for {progress.bad_epochs} epochs")
        checkpoints.save(step, state, train_iter, progress_json())
      if stop["signal"]:
        check_finite(step, metrics)
        checkpoints.save(step, state, train_iter, progress_json())
        log(f"{stop['signal']}: saved a checkpoint at step {step}; rerun with the same workdir to resume")
        status = "interrupted"
        break
    if status == "finished" and pending is not None:
      check_finite(*pending)
      if checkpoints.latest_step() != step:
        checkpoints.save(step, state, train_iter, progress_json())
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    run_log.close()
    train_iter.close()  # Stops Grain's worker processes and frees their shared memory, also on a signal.

  seconds = time.time() - start_time
  summary = {"status": status, "steps": step, "epochs": progress.epoch, "best_val_loss": progress.best_val_loss,
             "best_step": progress.best_step, "stopped_early": progress.stopped_early,
             "train_seconds": seconds, "samples_per_second": (step - start_step) * batch_size / max(seconds, 1e-9),
             "records_skipped_while_loading": pipeline.skipped_records(train_source)
             + pipeline.skipped_records(val_source)}
  if summary["records_skipped_while_loading"]:
    log(f"skipped {summary['records_skipped_while_loading']} records that failed to load "
        f"(config.data.skip_bad_records)")
  if status == "finished":
    best, _ = checkpoints.restore_best(with_shardings(abstract_params, param_sh))
    final = best if best is not None else state["params"]
    summary["exported"] = export_vision(cfg, jax.device_get(final), workdir / "export", log)
    plot_run(workdir)
  started = time.time()
  checkpoints.close()  # Waits for the asynchronous checkpoint writes.
  log(f"checkpoint writes finished in {time.time() - started:.1f} s")
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def export_vision(cfg: ModelConfig, params, out, log=print) -> dict:
  """The refined vision encoder: a converted (Flax) folder and a state_dict in the FM's own key layout."""
  from safetensors.numpy import save_file
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  flax_dir = out / "vision_flax"
  if (flax_dir / "params").exists():
    import shutil
    shutil.rmtree(flax_dir)
  vision = {"vision_encoder": jax.tree.map(np.asarray, params["vision_encoder"])}
  weights.save_converted(flax_dir, cfg, vision, {"source": "retfiner_jax training", "source_format": cfg.backbone,
                                                 "contents": ["vision_encoder"]})
  state = weights.export_vision_state_dict(cfg, vision)
  st_path = out / f"vision_{cfg.backbone}.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(st_path))
  paths = {"flax": str(flax_dir), "safetensors": str(st_path)}
  try:
    weights.save_torch_state_dict(state, out / f"vision_{cfg.backbone}.pth")
    paths["pytorch"] = str(out / f"vision_{cfg.backbone}.pth")
  except ImportError:
    log("torch not installed: the PyTorch state_dict is in the .safetensors file "
        "(safetensors.torch.load_file gives the state_dict)")
  log(f"exported the refined vision encoder: {paths}")
  return paths
