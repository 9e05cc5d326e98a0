"""Grain pipelines of OCT–report pairs: seeded shuffle, repeat, load + preprocess, batch, workers, sharding.

Reports are tokenised once when the pipeline is built (the fast WordPiece tokeniser does a whole manifest in
seconds); images are read and preprocessed in the Grain map to one channel at the model's size, in [0, 1]
(float32, or bfloat16 on request): the model repeats it to three channels and normalises it on the device
(models/common.py, model_images), so a batch carries a third of the bytes or less; each record's augmentation is
seeded by its position in the stream, so the batches are the same for any number of worker processes. A training stream
is one global shuffled, repeated sequence; process p of P takes elements p, p+P, ...; evaluation keeps every
example and pads the last batch, marking real rows with `valid`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import grain
import ml_dtypes
import numpy as np

from retfiner_jax.data.images import ImageError, preprocess_gray, read_image
from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
from retfiner_jax.errors import ConfigError

log = logging.getLogger(__name__)

# Records skipped while loading (config.data.skip_bad_records), per manifest. Counted in the process that
# loads them: exact with 0 workers; worker processes log each skipped record instead.
_SKIPPED: dict = {}


def skipped_records(source: str) -> int:
  return _SKIPPED.get(source, 0)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """How images become model inputs (set by the FM's config)."""
  image_size: int = 224
  backbone: str = "retfound"
  intensity: str = "bit_depth"
  augment: bool = False
  augment_kw: tuple = ()  # e.g. (("flip", True), ("intensity_jitter", 0.1), ("crop_scale", (0.8, 1.0)))
  image_dtype: str = "float32"  # The shipped channel's: float32 (exact) or bfloat16 (half the bytes, ~3 digits).

  def __post_init__(self):
    if self.image_dtype not in IMAGE_DTYPES:
      raise ConfigError(f"config.data.image_dtype must be one of {sorted(IMAGE_DTYPES)}, got {self.image_dtype!r}")


IMAGE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def tokenise_records(records, vocab, max_length):
  """Adds input_ids/attention_mask/pair_id to each record. Returns (records, number of truncated reports)."""
  out = tokenize(load_tokenizer(vocab), [r["report"] for r in records], max_length)
  ids = {}
  tokenised = []
  for i, r in enumerate(records):
    pair_key = r["id"] if r.get("id") is not None else f"row:{r['row']}"
    tokenised.append(dict(r, input_ids=out["input_ids"][i], attention_mask=out["attention_mask"][i],
                          pair_id=ids.setdefault(pair_key, len(ids))))
  return tokenised, out["truncated"]


def train_batch_shapes(batch_size: int, image_size: int, text_length: int, several_processes: bool = False,
                       image_dtype: str = "float32") -> dict:
  """{key: (shape, dtype)} of a global training batch as `train_dataset` gives it (LoadPair's rows, stacked);
  with several processes the trainer adds `stop` (which process was signalled)."""
  shapes = {"images": ((batch_size, image_size, image_size), IMAGE_DTYPES[image_dtype]),
            "input_ids": ((batch_size, text_length), np.int32),
            "attention_mask": ((batch_size, text_length), np.int32),
            "pair_ids": ((batch_size,), np.int32)}
  if several_processes:
    shapes["stop"] = ((batch_size,), np.int32)
  return shapes


class LoadPair(grain.transforms.RandomMap):
  """record -> {images (S, S) one channel, input_ids, attention_mask, pair_ids}; None (skipped) for a bad file
  under skip_bad."""

  def __init__(self, spec: ImageSpec, source: str, skip_bad: bool = False):
    self.spec, self.source, self.skip_bad = spec, source, skip_bad

  def random_map(self, record, rng: np.random.Generator):
    image = self.load_image(record, rng)
    if image is None:
      return None
    return {"images": image, "input_ids": record["input_ids"], "attention_mask": record["attention_mask"],
            "pair_ids": np.int32(record["pair_id"])}

  def load_image(self, record, rng: np.random.Generator):
    try:
      pixels = read_image(record["image"], record.get("slice"))
      image = preprocess_gray(pixels, self.spec.image_size, self.spec.intensity,
                              rng if self.spec.augment else None, dict(self.spec.augment_kw))
      if not np.isfinite(image).all():
        raise ImageError("non_finite", f"{record['image']}: not finite after preprocessing")
      image = image.astype(IMAGE_DTYPES[self.spec.image_dtype], copy=False)
    except Exception as e:  # noqa: BLE001 - any failure to load one file is that record's problem: named below.
      if not isinstance(e, ImageError):
        e = ImageError("undecodable", f"{record['image']}: {type(e).__name__}: {e}")
      message = f"{self.source} row {record['row']}: {e}"
      if self.skip_bad:
        _SKIPPED[self.source] = _SKIPPED.get(self.source, 0) + 1
        log.warning("skipped bad record: %s", message)
        return None
      raise ImageError(e.kind, message) from e
    return image


class LoadImage(LoadPair):
  """record -> {images} (image-only pretraining: no report is read)."""

  def random_map(self, record, rng: np.random.Generator):
    image = self.load_image(record, rng)
    return None if image is None else {"images": image}


def _ensure_absl_flags_parsed():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _die_with_parent(worker_index: int, worker_count: int):
  """Grain worker start-up: the worker exits when the process that started it is gone (a SIGKILLed run must not
  leave workers behind, re-parented and holding memory). A watch thread rather than a parent-death signal,
  which would fire when the starting *thread* ends."""
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(1.0)
      if os.getppid() != parent:
        os._exit(1)
  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    _ensure_absl_flags_parsed()  # Grain's worker processes read absl flags.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_die_with_parent)
  return ds


class ProcessShare(grain.MapDataset):
  """This process's rows of each global batch of `parent`, in order: local item k is global position
  (k // L) * B + p * L + k % L (B the global batch, L = B / processes, p this process), so that the global
  batches, row for row, are the same for any number of processes."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._global, self._local, self._index = global_batch, global_batch // process_count, process_index

  def position(self, index: int) -> int:
    return (index // self._local) * self._global + self._index * self._local + index % self._local

  def __len__(self):
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.position(index)]

  def __str__(self):
    return f"ProcessShare(process {self._index}, {self._local} of every {self._global})"


def _check_share(batch_size: int, process_count: int):
  if batch_size % process_count:
    raise ConfigError(f"config.train.batch_size {batch_size} (the global batch) must be divisible by the "
                      f"{process_count} processes")


def train_dataset(records, spec: ImageSpec, batch_size: int, seed: int, source: str = "manifest",
                  num_workers: int = 0, skip_bad: bool = False, process_index: int = 0, process_count: int = 1,
                  images_only: bool = False):
  """Infinite stream of this process's share of the global batches (drops incomplete batches). Shuffling and
  the random augmentation follow the global position, so the global batches do not depend on the number of
  processes. `images_only`: batches of images alone (MAE pretraining; the records need no tokens)."""
  _check_share(batch_size, process_count)
  if len(records) < batch_size:
    raise ConfigError(f"{source}: {len(records)} records, fewer than one batch of {batch_size}: give more, or a "
                      f"smaller config.train.batch_size")
  ds = grain.MapDataset.source(list(records)).shuffle(seed=seed).repeat(None)
  ds = ds.random_map((LoadImage if images_only else LoadPair)(spec, source, skip_bad), seed=seed)
  ds = ProcessShare(ds, batch_size, process_index, process_count)
  options = grain.ReadOptions(num_threads=2 if num_workers == 0 else 1, prefetch_buffer_size=4)
  local = batch_size // process_count
  if skip_bad:
    # A skipped record's place goes to the next one, so rows are gathered one at a time: workers load single
    # examples (interleaved back in stream order) and the batches are stacked after them.
    return _with_workers(ds.to_iter_dataset(options), num_workers).batch(local, drop_remainder=True)
  # Batch k is the stream's positions k*L ... (k+1)*L - 1 whatever the worker count; each worker loads and stacks
  # whole batches, so this process receives one array per batch instead of one per image.
  return _with_workers(ds.batch(local, drop_remainder=True).to_iter_dataset(options), num_workers)


class LocalEvalBatch(grain.transforms.Map):
  """Global batch j -> this process's rows of it, stacked and padded to the share's size (`valid` False on
  padding rows and on records skipped as bad)."""

  def __init__(self, loaded: grain.MapDataset, batch_size: int, process_index: int, process_count: int):
    self.loaded, self.batch_size, self.per_process = loaded, batch_size, batch_size // process_count
    self.first = process_index * self.per_process

  def map(self, j):
    start = j * self.batch_size + self.first
    rows = [self.loaded[i] for i in range(start, min(start + self.per_process, len(self.loaded)))]
    rows = [r for r in rows if r is not None]
    if not rows:  # None of the last batch's rows are this process's: all padding, shaped as a loaded row.
      row = next(r for r in (self.loaded[i] for i in range(len(self.loaded))) if r is not None)
      return {**{k: np.zeros((self.per_process,) + np.shape(v), np.asarray(v).dtype) for k, v in row.items()},
              "valid": np.zeros(self.per_process, bool)}
    return PadBatch(self.per_process).map({k: np.stack([r[k] for r in rows]) for k in rows[0]})


class PadBatch(grain.transforms.Map):
  """Pads the last (short) evaluation batch to full size; `valid` marks the real rows."""

  def __init__(self, size: int):
    self.size = size

  def map(self, batch):
    n = len(batch["pair_ids"])
    valid = np.zeros(self.size, bool)
    valid[:n] = True
    padded = {k: np.concatenate([v, np.zeros((self.size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    return dict(padded, valid=valid)


def eval_dataset(records, spec: ImageSpec, batch_size: int, source: str = "manifest", num_workers: int = 0,
                 skip_bad: bool = False, process_index: int = 0, process_count: int = 1):
  """Every record once, in order, in global batches of `batch_size` of which this process gives its share;
  the last batch padded (`valid` False on padding rows)."""
  _check_share(batch_size, process_count)
  loaded = grain.MapDataset.source(list(records)).random_map(
      LoadPair(dataclasses.replace(spec, augment=False), source, skip_bad), seed=0)
  batches = grain.MapDataset.range(-(-len(records) // batch_size))
  ds = batches.map(LocalEvalBatch(loaded, batch_size, process_index, process_count))
  return _with_workers(ds.to_iter_dataset(), num_workers)


def load_pairs(manifest, vocab, max_length, columns=None):
  """Reads a manifest and tokenises its reports: -> (records, truncated count)."""
  from retfiner_jax.data.manifest import Columns, read_manifest
  return tokenise_records(read_manifest(manifest, columns or Columns()), vocab, max_length)
