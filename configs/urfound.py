"""RetFiner on urfound: the original's settings (AdamW 1e-4, wd 0.01, batch 128, <=20 epochs, patience 3).

Stochastic depth stays off (`model.drop_path` 0): the original's snapshot has no UrFound loader
(RetFiner/util_funcs.py, `load_vision_backbone`, knows RETFound and VisionFM only), so it records no value;
UrFound's ViT is timm's like RETFound's, and `--config.model.drop_path=0.1` builds it as RETFound is built.

Where it fits as shipped (python -m retfiner_jax.aot; README, "Where it fits"): every target of the README's
table (a v5e-8 in 10.0 of 15.75 GiB a chip).

  python -m retfiner_jax.main --config=configs/urfound.py --workdir=runs/urfound \
      --config.weights.vision=weights/urfound --config.weights.text=bert-base-uncased \
      --config.data.train_manifest=train.csv --config.data.val_manifest=val.csv
"""
from retfiner_jax.config_defaults import base_config


def get_config():
  return base_config("urfound")
