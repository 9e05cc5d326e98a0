"""MAE pretraining of a vision encoder on B-scans alone (no reports): how RETFound and UrFound made their FMs.

  python -m retfiner_jax.mae --config=configs/mae_demo.py --workdir=runs/mae [--config.x=value ...]

Reads the images of `config.data.train_manifest` (a CSV/TSV/JSONL/Parquet manifest, a report column not
needed, or a built TFDS folder), trains a masked autoencoder (models/mae.py: 75 % of the patches masked at
random, a small decoder, normalised-pixel loss) with AdamW (betas 0.9/0.95, weight decay 0.05 on the weights
and the class/mask tokens, never biases or norms: DECAYED; learning-rate warm-up then half-cosine, per step, as
MAE does), saves a checkpoint every epoch (and on SIGTERM/SIGINT: rerun the same command to resume), and exports
to WORKDIR/export/:
  vision_flax/              the encoder as a converted folder, an FM like any other (`config.weights.vision`
                            of the RetFiner configs, the probe's `--encoder`)
  vision_<backbone>.pth / .safetensors   the encoder in the FM's PyTorch key layout (.pth: {"model": state_dict},
                            as RETFound's and MAE's checkpoints)
  mae_flax/                 encoder and decoder: `config.init` of a run that continues pretraining
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retfiner_jax.data import pipeline
from retfiner_jax.data.manifest import Columns, read_manifest, tfds_split
from retfiner_jax.mae.masking import sample_patch_masks
from retfiner_jax.errors import ConfigError, MissingInput, NonFiniteLoss
from retfiner_jax.models.common import model_images
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.mae import MaeSettings, MaskedAutoencoder, reconstruction_loss, sincos_pos_embed
from retfiner_jax.runs import sharding, step_seed, whole_files
from retfiner_jax.runs.checkpoints import RunCheckpoints
from retfiner_jax.runs.run_log import RunLog, read_metrics
from retfiner_jax.weights import exports
from retfiner_jax.weights import files as weight_files
from retfiner_jax.runs.signals import signals_requesting_stop
from retfiner_jax.runs.workdir import check_resume_config, prepare_workdir
from retfiner_jax.runs.workdir_lock import WorkdirLock

# Settings a resumed run may change: how long it runs, how it reports and saves, how it reads.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.log_every", "checkpoint.", "data.num_workers",
                     "compile_cache")
FROZEN = ("pos_embed", "decoder_pos_embed")  # MAE's fixed sin-cos positions: never updated.


def model_config(config) -> ModelConfig:
  """The encoder's config (its text-side fields unused, kept for the refinement that takes the FM up)."""
  return ModelConfig.from_dict(config.model.to_dict(), source="config.model")


def settings(config) -> MaeSettings:
  return MaeSettings(**config.mae.to_dict())


def read_images(config, log=print) -> list[dict]:
  manifest = config.data.train_manifest
  if not manifest:
    raise ConfigError("config.data.train_manifest is empty: give a manifest of image paths (or a TFDS folder)")
  folder, split = tfds_split(manifest, "train")  # A built TFDS folder may name its split: DIR:split.
  if not Path(folder).exists():
    raise MissingInput(f"config.data.train_manifest = {manifest}: not found")
  if Path(folder).is_dir():
    from retfiner_jax.data import tfds_builders
    records = tfds_builders.pairs_records(folder, split)
  else:
    records = read_manifest(folder, Columns(image=config.data.image_column, slice=config.data.slice_column),
                            need_reports=False)
  if len(records) < config.train.batch_size:
    raise ConfigError(f"{manifest}: {len(records)} images, fewer than one batch of {config.train.batch_size}")
  log(f"MAE pretraining on {len(records)} images from {manifest}")
  return records


def _initialised(cfg: ModelConfig, s: MaeSettings, rng) -> dict:
  n = cfg.grid_size ** 2
  keep = int(n * (1 - s.mask_ratio))
  dummy = (jnp.zeros((1, cfg.image_size, cfg.image_size, 3)), jnp.zeros((1, keep), jnp.int32),
           jnp.zeros((1, n), jnp.int32))
  return MaskedAutoencoder(cfg, s).init(rng, *dummy)["params"]


def abstract_params(cfg: ModelConfig, s: MaeSettings):
  return jax.eval_shape(lambda: _initialised(cfg, s, jax.random.PRNGKey(0)))


def maes_initialisation(params: dict, rng) -> dict:
  """MAE's `initialize_weights` on a parameter tree: every Linear weight xavier-uniform over PyTorch's
  (fan_in, fan_out), the patch embedding too (over its flattened p x p x 3 inputs), the class and mask tokens
  normal(0.02); biases 0 and LayerNorms 1/0 as the model already makes them. A scanned stack's leading layer axis
  is a stack of separately initialised layers, not a fan."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, x), key in zip(leaves, keys):
    names = [getattr(k, "key", "") for k in path]
    if names[-1] in ("cls_token", "mask_token"):
      x = 0.02 * jax.random.normal(key, x.shape, jnp.float32)
    elif names[-1] == "kernel":  # (in, out); (layers, in, out) when scanned; the patch conv (p, p, 3, D).
      fan_in = int(np.prod(x.shape[:3])) if x.ndim == 4 else x.shape[-2]
      limit = float(np.sqrt(6.0 / (fan_in + x.shape[-1])))
      x = jax.random.uniform(key, x.shape, jnp.float32, -limit, limit)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def init_params(cfg: ModelConfig, s: MaeSettings, seed: int) -> dict:
  """MAE's initialisation: `maes_initialisation`, and fixed sin-cos positions in the encoder and decoder."""
  rng, mae_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.jit(lambda r: _initialised(cfg, s, r))(rng)
  params = jax.tree.map(np.asarray, maes_initialisation(params, mae_rng))
  params["vision_encoder"]["pos_embed"] = sincos_pos_embed(cfg.vision_dim, cfg.grid_size)
  return params


# MAE decays what timm's add_weight_decay does in its main_pretrain.py: every parameter but biases and 1-D ones
# (LayerNorm scales): the Linear and Conv weights, and the class and mask tokens. By name, so that the rule is
# the same whether the layers are scanned (a leading layer axis makes biases 2-D) or not.
DECAYED = ("kernel", "cls_token", "mask_token")


def weight_decay_mask(params):
  return jax.tree.map_with_path(lambda path, _: getattr(path[-1], "key", None) in DECAYED, params)


def peak_learning_rate(config) -> tuple[float, str]:
  """MAE's rule: `blr x batch x accum_iter / 256` (main_pretrain.py's `lr = blr * eff_batch_size / 256`) unless
  `train.learning_rate` is set (above 0). Returns (the rate, how it was found) for the log."""
  t = config.train
  if t.learning_rate > 0:
    return float(t.learning_rate), f"{t.learning_rate:g} (config.train.learning_rate)"
  if not t.blr > 0:
    raise ConfigError("config.train.learning_rate and config.train.blr are both 0: set blr (MAE's base rate per "
                      "256 images, 1.5e-4) or learning_rate")
  effective = t.batch_size * t.accum_iter  # MAE's eff_batch_size: batch x accum_iter (x processes).
  lr = t.blr * effective / 256
  accumulated = f" x accum_iter {t.accum_iter}" if t.accum_iter > 1 else ""
  return lr, f"{lr:.4g} = blr {t.blr:g} x batch {t.batch_size}{accumulated} / 256 (MAE's rule)"


def make_optimizer(config, total_steps: int, steps_per_epoch: int):
  """AdamW with MAE's schedule over the run's updates; with `train.accum_iter` k > 1, MAE's gradient
  accumulation: the gradients of k steps are averaged and applied once (optax.MultiSteps), so the effective batch
  is batch_size x k. Returns (the optimizer, the learning rate as a function of the step)."""
  t = config.train
  accum = int(t.accum_iter)
  if accum < 1:
    raise ConfigError(f"config.train.accum_iter must be at least 1, got {accum}")
  peak, _ = peak_learning_rate(config)
  updates = max(total_steps // accum, 1)
  warmup = min(int(t.warmup_epochs * steps_per_epoch) // accum, max(updates - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(updates, warmup + 1),
                                                end_value=t.min_learning_rate)
  labels = lambda params: jax.tree.map_with_path(
      lambda path, _: "frozen" if getattr(path[-1], "key", None) in FROZEN else "trained", params)
  tx = optax.multi_transform({
      "trained": optax.adamw(schedule, t.b1, t.b2, weight_decay=t.weight_decay, mask=weight_decay_mask),
      "frozen": optax.set_to_zero()}, labels)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, lambda step: schedule(step // accum)


def make_train_step(model: MaskedAutoencoder, s: MaeSettings, tx, schedule, patch: int):
  """(state, images, seed) -> (state, metrics); `seed`: config.seed as an int32 scalar (runs/step_seed.py), so that
  runs differing only in their seed share one compiled step."""
  def step(state, images, seed):
    images = model_images(images, model.cfg.backbone)  # The pipeline's one channel: the target is normalised too.
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    mask_rng, dropout_rng = jax.random.split(rng)
    patches = model.cfg.grid_size ** 2
    visible, restore, mask = sample_patch_masks(mask_rng, images.shape[0], patches, s.mask_ratio)

    def loss_fn(params):
      pred = model.apply({"params": params}, images, visible, restore, train=True, rngs={"dropout": dropout_rng})
      return reconstruction_loss(pred, images, mask, patch, s.norm_pix_loss)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
  return step


def export(cfg: ModelConfig, s: MaeSettings, params: dict, out: Path, log=print) -> dict:
  """Writes the encoder as an FM (converted folder, PyTorch layout) and the whole autoencoder; returns paths."""
  out.mkdir(parents=True, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  meta = {"source": "retfiner_jax MAE pretraining", "source_format": cfg.backbone}
  paths = {}
  for name, part in (("vision_flax", {"vision_encoder": params["vision_encoder"]}), ("mae_flax", params)):
    whole_files.make_whole(out / name, lambda folder: weight_files.save_converted(
        folder, cfg, part, dict(meta, contents=sorted(part), mae=dataclasses.asdict(s))))
    paths[name] = str(out / name)
  vision = exports.vision_state_dict(cfg, params)
  whole_files.make_whole(out / f"vision_{cfg.backbone}.safetensors", lambda p: exports.save_safetensors(vision, p))
  paths["safetensors"] = str(out / f"vision_{cfg.backbone}.safetensors")
  try:
    whole_files.make_whole(out / f"vision_{cfg.backbone}.pth",  # {"model": ...}, as MAE saves it.
                           lambda p: exports.save_fm_checkpoint(vision, p))
    paths["pytorch"] = str(out / f"vision_{cfg.backbone}.pth")
  except ImportError:
    log("torch not installed: no .pth file (the .safetensors file holds the same tensors)")
  weight_files.readable_by_all(out)
  log(f"exported the MAE encoder to {out}: " + ", ".join(paths))
  return paths


def starting_params(config, cfg: ModelConfig, s: MaeSettings, log) -> dict:
  """A fresh MAE, or `config.init`: an earlier MAE run's export/mae_flax (or its workdir) to continue from."""
  if not config.init:
    return init_params(cfg, s, config.seed)
  folder = Path(config.init)
  if (folder / "export" / "mae_flax").exists():
    folder = folder / "export" / "mae_flax"
  if not (folder / "model.json").exists():
    raise MissingInput(f"config.init = {config.init}: not an MAE export (expected export/mae_flax or a folder "
                       f"with model.json)")
  _, params, meta = weight_files.load_converted(folder)
  if "decoder" not in params:
    raise ConfigError(f"config.init = {folder} has no MAE decoder (give an MAE run's export/mae_flax)")
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = shapes(abstract_params(cfg, s)), shapes(params)
  differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
  if differ:
    raise ConfigError(f"config.init = {folder} does not fit config.model / config.mae: "
                      + ", ".join(f"{k} {got.get(k, 'missing')} (config: {want.get(k, 'none')})" for k in differ[:5]))
  log(f"continuing MAE pretraining from {folder}")
  return params


def run(config, workdir, log=print) -> dict:
  """Pretrains; returns a summary (also WORKDIR/summary.json). Resumes from WORKDIR's latest checkpoint."""
  workdir = prepare_workdir(workdir)
  with WorkdirLock(workdir, log):  # One run at a time in a workdir.
    return _run(config, workdir, log)


def _run(config, workdir: Path, log) -> dict:
  cfg, s = model_config(config), settings(config)
  mesh = sharding.make_mesh()
  seed = step_seed.replicated_seed(mesh, config.seed)  # Checked before any image is read or parameter made.
  records = read_images(config, log)
  batch_size = config.train.batch_size
  steps_per_epoch = len(records) // batch_size
  total_steps = config.train.max_steps if config.train.max_steps > 0 else steps_per_epoch * config.train.epochs
  d = config.data
  augment_kw = (("flip", d.flip), ("intensity_jitter", d.intensity_jitter),
                ("crop_scale", tuple(d.crop_scale) if d.crop_scale else None),
                ("crop_ratio", tuple(d.crop_ratio) if d.crop_ratio else None))
  spec = pipeline.ImageSpec(cfg.image_size, cfg.backbone, d.intensity, d.augment, augment_kw)
  data = iter(pipeline.train_dataset(records, spec, batch_size, config.seed, source=config.data.train_manifest,
                                     num_workers=config.data.num_workers, skip_bad=config.data.skip_bad_records,
                                     images_only=True))
  model = MaskedAutoencoder(cfg, s)
  tx, schedule = make_optimizer(config, total_steps, steps_per_epoch)
  log(f"peak learning rate {peak_learning_rate(config)[1]}, after {config.train.warmup_epochs} warm-up epochs")
  check_resume_config(config, workdir, RESUMABLE_CHANGES, log)  # A resume takes the settings the run started with.
  checkpoints = RunCheckpoints(workdir, keep=config.checkpoint.keep, log=log)
  replicated = sharding.replicated(mesh)
  if checkpoints.latest_step() is not None:
    abstract = jax.eval_shape(lambda p: _state(tx, p), abstract_params(cfg, s))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    state, _, step = checkpoints.restore(abstract, data)
    log(f"resumed from {workdir / 'checkpoints'} step {step}")
  else:
    state = jax.device_put(_state(tx, starting_params(config, cfg, s, log)), replicated)
  step_fn = jax.jit(sharding.traced_on(mesh, make_train_step(model, s, tx, schedule, cfg.patch_size)),
                    donate_argnums=0)
  step = start = int(state["step"])
  run_log = RunLog(workdir, total_steps, batch_size, log, start_step=step)
  started, status = time.time(), "finished"

  def finite(metrics) -> dict:
    host = jax.device_get(metrics)
    if not (np.isfinite(host["loss"]) and np.isfinite(host["grad_norm"])):
      raise NonFiniteLoss(f"non-finite MAE loss {host['loss']} (gradient norm {host['grad_norm']}) at step "
                          f"{step}; stopping. The last good checkpoint is {workdir / 'checkpoints'} step "
                          f"{checkpoints.latest_step()}")
    return host

  def save():  # Every checkpoint follows a finite step.
    finite(metrics)
    checkpoints.save(step, state, data, {"epoch": step // steps_per_epoch})
  try:
    with signals_requesting_stop() as stop:
      while step < total_steps:
        images = sharding.global_batch(mesh, next(data))["images"]
        state, metrics = step_fn(state, images, seed)
        step += 1
        if step % config.train.log_every == 0 or step == total_steps:
          host = finite(metrics)
          run_log.write("train", step, host, epoch=(step - 1) // steps_per_epoch + 1)
          run_log.progress((step - 1) // steps_per_epoch + 1, step, host)
        if step % steps_per_epoch == 0 or step == total_steps:
          save()
        if stop["signal"]:
          save()
          log(f"{stop['signal']}: saved a checkpoint at step {step}; rerun with the same workdir to resume")
          status = "interrupted"
          break
  finally:
    run_log.close()
    checkpoints.close()
    data.close()  # Stops Grain's worker processes, also on a signal or an error.
  summary = {"status": status, "steps": step, "epochs": step / steps_per_epoch, "images_seen": step * batch_size,
             "train_seconds": time.time() - started,
             "images_per_second": (step - start) * batch_size / max(time.time() - started, 1e-9)}
  if status == "finished":
    logged = read_metrics(workdir / "metrics.jsonl")  # Also when a finished run is only exported again.
    summary["final_loss"] = logged[-1]["loss"] if logged else None
    summary["exported"] = export(cfg, s, jax.device_get(state["params"]), workdir / "export", log)
  whole_files.write_json(workdir / "summary.json", summary)
  return summary


def _state(tx, params) -> dict:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
