"""The settings every run config shares, with the original RetFiner's values (SPEC.md) as defaults.

Config files in configs/ call `base_config(variant)` and change what differs. Configs are locked: an
unknown key given on the command line (`--config.train.lr=...`) is an error. The blocks that become dataclasses
(`model` -> ModelConfig, `train.objectives` -> ObjectiveSettings) are built from those dataclasses' own
defaults, so every setting has exactly one default.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from retfiner_jax.models.config import get_variant
from retfiner_jax.refine.objectives import ObjectiveSettings
from retfiner_jax.weights.exports import DEFAULT_FORMATS


def base_config(variant: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compile_cache = ""  # XLA compilation cache: '' = ~/.cache/retfiner_jax/xla, 'off', or a folder.
  # A train step compiled ahead of time (python -m retfiner_jax.aot --save=FILE): run it instead of compiling.
  c.compiled_step = ""
  # Every ModelConfig field (models/config.py): the variant's sizes, mixed precision, BERT's dropout 0.1.
  c.model = ml_collections.ConfigDict(get_variant(variant).to_dict())
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
  # The one image channel the pipeline ships (the model normalises it on the device): float32 equals the host-side
  # preprocessing; bfloat16 halves the bytes again, to ~3 significant digits.
  c.data.image_dtype = "float32"
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
  # Every ObjectiveSettings field (refine/objectives.py): weights (0 switches an objective off), masking rates, ...
  c.train.objectives = ml_collections.ConfigDict(dataclasses.asdict(ObjectiveSettings()))
  # The train step's random bits: auto (threefry on CPU, rbg on GPU/TPU) | threefry | rbg | unsafe_rbg
  # (refine/step.py, prng_impl). Streams differ between settings: a run repeats exactly only with the same one.
  c.train.prng = "auto"
  c.train.log_every = 10
  c.train.max_steps = -1  # Stop after this many steps (-1: epochs decide).
  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 1234
  # True: the same masks and negatives every epoch (validation losses comparable across epochs, a steadier
  # signal for early stopping); False: redrawn every epoch, as the original's Lightning validation does.
  c.eval.fixed_sampling = True
  c.eval.recall_at = (1, 5, 10)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Checkpoints at every epoch's end, and every `every_steps` steps between (0: only at epochs' ends): at most
  # that many steps are lost to a SIGKILL (500 steps of the full-size model: minutes on one GPU).
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, every_steps=500))
  # What a finished run writes to WORKDIR/export (weights/exports.py, EXPORT_FORMATS): comma-separated, or "all".
  c.export = ml_collections.ConfigDict(dict(formats=DEFAULT_FORMATS))
  return c


def mae_config(variant: str) -> ml_collections.ConfigDict:
  """MAE pretraining (retfiner_jax/mae/) of `variant`'s vision encoder, with MAE's settings (He et al. 2022,
  as RETFound pretrains): 75 % masking, decoder 512 wide and 8 deep, normalised-pixel loss, AdamW betas
  0.9/0.95, weight decay 0.05, base learning rate 1.5e-4 per 256 images, 40 warm-up epochs of 800."""
  from retfiner_jax.models.mae import MaeSettings
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compile_cache = ""
  c.model = ml_collections.ConfigDict(get_variant(variant).to_dict())
  c.mae = ml_collections.ConfigDict(dataclasses.asdict(MaeSettings()))
  c.init = ""  # An earlier MAE run (its workdir or export/mae_flax) to continue from, decoder included.
  # MAE's augmentation: RandomResizedCrop (area 0.2-1, aspect 3/4-4/3, bicubic) and a horizontal flip.
  c.data = ml_collections.ConfigDict(dict(train_manifest="", image_column="image", slice_column="slice",
                                          intensity="bit_depth", augment=True, crop_scale=(0.2, 1.0),
                                          crop_ratio=(3 / 4, 4 / 3), flip=True, intensity_jitter=0.0,
                                          num_workers=0, skip_bad_records=False))
  # learning_rate 0: MAE's rule, blr x batch_size / 256 (2.4e-3 at 4096); set it to override.
  # accum_iter k: MAE's gradient accumulation, an update every k steps of batch_size (effective batch x k).
  c.train = ml_collections.ConfigDict(dict(batch_size=4096, accum_iter=1, epochs=800, warmup_epochs=40,
                                           learning_rate=0.0, blr=1.5e-4, min_learning_rate=0.0, weight_decay=0.05,
                                           b1=0.9, b2=0.95, log_every=10, max_steps=-1))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2))
  return c


def demo_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The demo's small RETFound-shaped model (final norm + projection), trained from scratch on CPU in minutes:
  the refinement's (configs/demo.py) and the MAE pretraining's (configs/mae_demo.py)."""
  m = c.model
  m.image_size, m.vision_dim, m.vision_depth, m.vision_heads, m.vision_mlp_dim = 64, 96, 3, 4, 384
  m.text_dim, m.text_layers, m.text_heads, m.text_intermediate = 96, 2, 4, 384
  m.contrastive_dim, m.max_position_embeddings = 64, 64
  m.dtype = "float32"  # bfloat16 has no speed-up on this CPU.
  return c


def demo_mae(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """MAE pretraining settings for the demo's small ViT (configs/mae_demo.py; the demo's stage 1 and control)."""
  # The demo's augmentation, not MAE's: a crop of 0.8-1.0 of the area keeping the aspect ratio, a flip, a +-10 %
  # brightness/contrast jitter (what its figures were made with; MAE's crops down to 0.2 of the area).
  c.data.crop_scale, c.data.crop_ratio, c.data.intensity_jitter = (0.8, 1.0), None, 0.1
  c.mae.decoder_dim = 64  # A decoder to match the 96-wide encoder (MAE's is 512 wide for ViT-L's 1024).
  c.mae.decoder_depth = 2
  c.mae.decoder_heads = 4
  c.train.batch_size = 64
  c.train.epochs = 40
  c.train.warmup_epochs = 2
  c.train.learning_rate = 1e-3  # MAE's 1.5e-4 per 256 images is for 800 epochs; the demo has minutes.
  c.train.log_every = 50
  return c


def tiny_model(c: ml_collections.ConfigDict, image_size=32):
  """Shrinks a config's model to test sizes (used by the smoke tests of every real config)."""
  tiny = get_variant(f"tiny-{c.model.backbone}").to_dict()
  for key, value in tiny.items():
    if key not in ("dtype", "text_dropout", "drop_path", "remat", "scan_layers"):  # Sizes only.
      c.model[key] = value
  c.model.image_size = image_size
  return c
