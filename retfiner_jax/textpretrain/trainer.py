"""Pretrains a RetFiner model's text tower on reports alone (objectives.py: SimCSE on [CLS] beside MLM) and
exports it as a converted folder that `config.weights.text` takes.

The demo runs it before refinement when it has no pretrained BERT to start from (configs/demo.py,
`demo.text_tower`). The run is short (seconds to a minute for the demo's tower); it keeps nothing between runs but
its result: an interrupted run starts again, a finished one (summary.json) is not repeated.

Writes OUT/text_flax/ (model.json + params/: the text encoder) and OUT/summary.json, with the [CLS] spread (mean
pairwise cosine over held-out reports) before and after.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retfiner_jax.data.manifest import Columns, read_manifest
from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
from retfiner_jax.errors import ConfigError, NonFiniteLoss
from retfiner_jax.metrics.embeddings import mean_pairwise_cosine
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import RetFiner, init_params
from retfiner_jax.runs import step_seed, whole_files
from retfiner_jax.textpretrain.objectives import TextPretrainSettings, make_loss_fn
from retfiner_jax.weights import files as weight_files


def read_reports(manifest, report_column: str = "report") -> list[str]:
  reports = [r["report"] for r in read_manifest(manifest, Columns(report=report_column), expand_volumes=False)]
  empty = [n for n, r in enumerate(reports, 1) if not r.strip()]
  if empty:
    raise ConfigError(f"{manifest}: {len(empty)} empty report(s), first at row {empty[0]}")
  return reports


def cls_outputs(model: RetFiner, text_params, ids, mask, batch: int = 256) -> np.ndarray:
  """The text-only [CLS] output of each row, in eval mode (no dropout); `text_params`: the text encoder's."""
  encode = jax.jit(lambda p, i, m: model.apply({"params": {"text_encoder": p}}, i, m, method=RetFiner.text_only)[:, 0])
  return np.concatenate([np.asarray(encode(text_params, ids[s:s + batch], mask[s:s + batch]))
                         for s in range(0, len(ids), batch)])


def make_optimizer(learning_rate: float, weight_decay: float, total_steps: int, warmup_steps: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), max(total_steps, 2))
  return optax.adamw(schedule, weight_decay=weight_decay)


def run(cfg: ModelConfig, train_manifest, val_manifest, tokenizer, out_dir, *, seed: int, epochs: int,
        batch_size: int, learning_rate: float, weight_decay: float = 0.01, warmup_fraction: float = 0.1,
        settings: TextPretrainSettings = TextPretrainSettings(), log_every: int = 50, log=print) -> dict:
  """Trains the text encoder of a RetFiner model of `cfg` from its random initialisation (seed `seed`) on the
  reports of `train_manifest`; the [CLS] spread is measured on `val_manifest`'s reports. Returns the summary."""
  out_dir = Path(out_dir)
  done = out_dir / "summary.json"
  if done.exists():
    return json.loads(done.read_text())
  # The step's key seed is an input, not a constant (runs/step_seed.py): every seed's tower shares one program.
  key_seed = jnp.asarray(step_seed.checked(seed + 1), jnp.int32)
  tok = load_tokenizer(tokenizer)
  train = tokenize(tok, read_reports(train_manifest), cfg.max_text_length)
  val = tokenize(tok, read_reports(val_manifest), cfg.max_text_length)
  if len(train["input_ids"]) < batch_size:
    raise ConfigError(f"{train_manifest}: {len(train['input_ids'])} reports, fewer than one batch of {batch_size}")
  model = RetFiner(cfg)
  params = jax.tree.map(np.asarray, jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(seed)))
  text = params["text_encoder"]  # Drawn with the whole model's init, as the refinement's init draws it.
  spread_before = mean_pairwise_cosine(cls_outputs(model, text, val["input_ids"], val["attention_mask"]))
  steps_per_epoch = len(train["input_ids"]) // batch_size
  total = steps_per_epoch * epochs
  tx = make_optimizer(learning_rate, weight_decay, total, int(warmup_fraction * total))
  grad_fn = jax.value_and_grad(make_loss_fn(model, settings), has_aux=True)

  @jax.jit
  def step(text, opt, batch, n, key_seed):
    (_, metrics), grads = grad_fn(text, batch, jax.random.fold_in(jax.random.PRNGKey(key_seed), n))
    updates, opt = tx.update(grads, opt, text)
    return optax.apply_updates(text, updates), opt, metrics

  log(f"text tower pretraining (SimCSE on [CLS] x {settings.sentence_weight}, MLM x {settings.mlm_weight}) on "
      f"{len(train['input_ids'])} reports: {epochs} epochs of {steps_per_epoch} steps, batch {batch_size}; [CLS] "
      f"mean pairwise cosine at random init {spread_before['mean']:.4f}")
  opt, order_rng = tx.init(text), np.random.default_rng(seed)
  started, n, history = time.time(), 0, []
  for epoch in range(epochs):
    order = order_rng.permutation(len(train["input_ids"]))
    for s in range(steps_per_epoch):
      rows = order[s * batch_size:(s + 1) * batch_size]
      batch = {k: train[k][rows] for k in ("input_ids", "attention_mask")}
      text, opt, metrics = step(text, opt, batch, n, key_seed)
      n += 1
      if n % log_every == 0 or n == total:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(host["loss"]):
          raise NonFiniteLoss(f"text tower pretraining: non-finite loss {host['loss']} at step {n}")
        history.append({"step": n, **host})
        log(f"text tower step {n}/{total}  " + "  ".join(f"{k} {v:.4f}" for k, v in host.items()))
  spread_after = mean_pairwise_cosine(cls_outputs(model, text, val["input_ids"], val["attention_mask"]))
  log(f"text tower pretrained in {time.time() - started:.0f} s: [CLS] mean pairwise cosine over "
      f"{len(val['input_ids'])} held-out reports {spread_before['mean']:.4f} -> {spread_after['mean']:.4f}")
  export = out_dir / "text_flax"
  whole_files.make_whole(export, lambda folder: weight_files.save_converted(
      folder, cfg, {"text_encoder": jax.tree.map(np.asarray, text)}, {"source_format": "textpretrain", "steps": n}))
  summary = {"status": "finished", "steps": n, "seconds": time.time() - started, "exported": str(export),
             "cls_cosine_before": spread_before, "cls_cosine_after": spread_after, "history": history,
             "settings": {**settings.__dict__, "epochs": epochs, "batch_size": batch_size,
                          "learning_rate": learning_rate, "weight_decay": weight_decay, "seed": seed}}
  whole_files.write_json(done, summary)
  return summary
