"""The refinement's data: image-report pairs from a manifest or a built TFDS folder, every row checked and
tokenised, then the Grain pipelines for training and validation."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from retfiner_jax.data import check, pipeline
from retfiner_jax.data.manifest import Columns, read_manifest, tfds_split
from retfiner_jax.errors import ConfigError, MissingInput
from retfiner_jax.models.config import ModelConfig



def tokenizer_path(config) -> str:
  if config.tokenizer:
    return config.tokenizer
  text = Path(config.weights.text) if config.weights.text else None
  if text is not None and (text / "vocab.txt").exists():
    return str(text)
  raise ConfigError("no tokenizer: set config.tokenizer to a vocab.txt (or a BERT folder holding one), or "
                   "config.weights.text to a Hugging Face BERT folder with its vocab.txt")


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


def setup_data(config, cfg: ModelConfig, mesh, log, workdir=None):
  """-> (train iterator, train source, val-batches factory, val source, steps per epoch, total steps)."""
  batch_size = config.train.batch_size
  train_records, train_source = load_split(config, "train", log, workdir)
  val_records, val_source = load_split(config, "val", log, workdir)
  spec = pipeline.ImageSpec(cfg.image_size, cfg.backbone, config.data.intensity, config.data.augment,
                            image_dtype=config.data.image_dtype)
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
