"""The self-contained demo: synthetic OCT–report corpus, a small ViT and BERT, probe -> refine -> probe.

  python -m retfiner_jax.demo --workdir=runs/demo
"""
import dataclasses

import ml_collections

from retfiner_jax.config_defaults import base_config
from retfiner_jax.probe.settings import ProbeSettings


def get_config():
  c = base_config("retfound")
  # A small RETFound-shaped model (final norm + projection), trained from scratch on CPU in minutes.
  c.model.image_size = 64
  c.model.vision_dim = 96
  c.model.vision_depth = 3
  c.model.vision_heads = 4
  c.model.vision_mlp_dim = 384
  c.model.text_dim = 96
  c.model.text_layers = 2
  c.model.text_heads = 4
  c.model.text_intermediate = 384
  c.model.contrastive_dim = 64
  c.model.max_position_embeddings = 64
  c.model.dtype = "float32"  # bfloat16 has no speed-up on this CPU.
  c.train.batch_size = 32
  c.train.epochs = 12
  c.train.learning_rate = 1e-3
  c.train.log_every = 20
  c.data.augment = True
  c.demo = ml_collections.ConfigDict()
  c.demo.count = 2000  # Synthetic images (generated into WORKDIR/data unless they are there).
  c.demo.image_height = 256
  c.demo.vocab_size = 600  # WordPiece vocabulary trained on the corpus's training reports.
  c.demo.tasks = ("diagnosis", "fluid", "drusen")
  # The probe (ProbeSettings fields): the features protocol (clean features once; the paper protocol's per-epoch
  # encoder passes would not fit the demo's minutes), the paper's early stopping, minibatches of 128, 3 seeds.
  c.demo.probe = ml_collections.ConfigDict(dataclasses.asdict(ProbeSettings(
      protocol="features", seeds=(0, 1, 2), batch_size=128, learning_rate=3e-3)))
  return c
