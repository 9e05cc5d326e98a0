"""The settings every run config shares, with the original RetFiner's values (SPEC.md) as defaults.

Config files in configs/ call `base_config(variant)` and change what differs. Configs are locked: an
unknown key given on the command line (`--config.train.lr=...`) is an error.
"""
from __future__ import annotations

import ml_collections

from retfiner_jax.models.config import get_variant


def base_config(variant: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compile_cache = ""  # XLA compilation cache: '' = ~/.cache/retfiner_jax/xla, 'off', or a folder.
  # Model sizes (ModelConfig fields); mixed precision by default, BERT's dropout as in training.
  c.model = ml_collections.ConfigDict(get_variant(variant).to_dict())
  c.model.dtype = "bfloat16"
  c.model.text_dropout = 0.1
  c.model.remat = "none"  # none | full | dots (jax.checkpoint_policies by name)
  # Pretrained weights: a converted folder (tools/convert_weights.py) or a PyTorch file converted on the fly.
  c.weights = ml_collections.ConfigDict()
  c.weights.vision = ""  # The FM: RETFound / VisionFM / UrFound checkpoint.
  c.weights.text = ""  # A BERT folder (bert-base-uncased).
  c.weights.retfiner = ""  # A whole RetFiner model to start from (overrides the two above).
  c.weights.format = ""  # Force a checkpoint format ('' = detect).
  c.tokenizer = ""  # vocab.txt or a folder with it; '' = the BERT folder of weights.text.
  c.data = ml_collections.ConfigDict()
  c.data.train_manifest = ""
  c.data.val_manifest = ""
  c.data.image_column = "image"
  c.data.report_column = "report"
  c.data.id_column = "id"
  c.data.slice_column = "slice"
  c.data.intensity = "bit_depth"  # bit_depth | minmax
  c.data.augment = False
  c.data.num_workers = 0
  c.data.skip_bad_records = False
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # Global batch.
  c.train.micro_batches = 1  # Gradient accumulation: batch_size / micro_batches per forward pass.
  c.train.epochs = 20
  c.train.patience = 3  # Early stopping on the validation loss.
  c.train.learning_rate = 1e-4
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, mlm=1.0, gm=1.0))  # 0 = off.
  c.train.mlm_probability = 0.15
  c.train.gm_probability = 0.6
  c.train.fused_passes = True
  # Vocabulary logits only at target positions: room for this fraction of the batch's positions (a batch with
  # more targets takes the exact all-positions path, so results never depend on it).
  c.train.mlm_target_fraction = 0.3
  c.train.gm_target_fraction = 0.75
  c.train.log_every = 10
  c.train.max_steps = -1  # Stop after this many steps (-1: epochs decide).
  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 1234
  # True: the same masks and negatives every epoch (validation losses comparable across epochs, a steadier
  # signal for early stopping); False: redrawn every epoch, as the original's Lightning validation does.
  c.eval.fixed_sampling = True
  c.eval.recall_at = (1, 5, 10)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2))
  return c


def tiny_model(c: ml_collections.ConfigDict, image_size=32):
  """Shrinks a config's model to test sizes (used by the smoke tests of every real config)."""
  tiny = get_variant(f"tiny-{c.model.backbone}").to_dict()
  for key, value in tiny.items():
    if key not in ("dtype", "text_dropout"):
      c.model[key] = value
  c.model.image_size = image_size
  return c
