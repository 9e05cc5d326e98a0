"""The self-contained demo: synthetic OCT–report corpus, a small ViT pretrained by MAE, then refined with
RetFiner (small BERT), against more MAE for the same images; the probe of each.

  python -m retfiner_jax.demo --workdir=runs/demo
"""
import dataclasses

import ml_collections

from retfiner_jax.config_defaults import base_config, demo_mae, demo_model, mae_config
from retfiner_jax.probe.settings import ProbeSettings
from retfiner_jax.textpretrain.objectives import TextPretrainSettings


def get_config():
  c = demo_model(base_config("retfound"))  # A small RETFound-shaped model (config_defaults.demo_model).
  c.train.batch_size = 32
  c.train.epochs = 12
  # The original's learning rate for refining a pretrained FM (base_config's 1e-4). Until the demo gained its
  # MAE stage it refined a random encoder, at 1e-3; refining the MAE FM at 1e-3 forgot much of what MAE had
  # learnt (README, "Quickstart": both runs are reported).
  c.train.learning_rate = 1e-4
  c.train.log_every = 20
  c.data.augment = True
  c.export.formats = "retfiner_flax"  # What the demo reads back; its install (requirements.txt) has no torch.
  c.demo = ml_collections.ConfigDict()
  # Two synthetic corpora (generated into WORKDIR/data unless there), fixed across --seeds: the refinement corpus
  # (a clinic's B-scans with reports; patients 90 % train, 10 % val for the refinement's early stopping) and the
  # probe corpus (another site's labelled B-scans: synthetic.SITES["probe"]; train / val / test patients).
  c.demo.refinement_count = 1600
  c.demo.refinement_splits = (0.9, 0.1, 0.0)
  c.demo.probe_count = 1500
  c.demo.probe_splits = (0.6, 0.15, 0.25)
  c.demo.corpus_seed = 0  # The refinement corpus's seed; the probe corpus's is corpus_seed + 1.
  c.demo.image_height = 256
  c.demo.vocab_size = 800  # WordPiece vocabulary built from the refinement corpus's training reports.
  # The probe on the clinic's own labels (in-domain): the refinement's training patients split into the probe's
  # train and val (this fraction of them: early stopping), its validation patients the probe's test.
  c.demo.indomain_val_fraction = 0.15
  # The text tower refinement starts from (issue 34). RetFiner starts from a pretrained BERT; a random one gives
  # every report the same [CLS], and ITC never leaves chance. 'sentence': the demo's small BERT pretrained on the
  # clinic's training reports alone (textpretrain/: SimCSE on [CLS] beside MLM), so that its [CLS] tells reports
  # apart; 'random': from scratch (the demo before issue 34).
  c.demo.text_tower = "sentence"
  c.demo.text = ml_collections.ConfigDict(dict(
      epochs=10, batch_size=64, learning_rate=1e-3, weight_decay=0.01, log_every=50,
      **dataclasses.asdict(TextPretrainSettings())))
  c.demo.tasks = ("diagnosis", "fluid", "drusen")
  # Stage 1, the FM: MAE pretraining (configs/mae_demo.py's settings; its model, seed and data are the demo's).
  # The control continues it for as many images as the refinement saw.
  c.demo.mae = demo_mae(demo_model(mae_config("retfound")))
  # The probe (ProbeSettings fields): the features protocol (clean features once; the paper protocol's per-epoch
  # encoder passes would not fit the demo's minutes), the paper's early stopping, minibatches of 128, 3 seeds.
  c.demo.probe = ml_collections.ConfigDict(dataclasses.asdict(ProbeSettings(
      protocol="features", seeds=(0, 1, 2), batch_size=128, learning_rate=3e-3)))
  return c
