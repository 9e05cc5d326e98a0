"""RetFiner on visionfm: the original's settings (AdamW 1e-4, wd 0.01, batch 128, <=20 epochs, patience 3).

  python -m retfiner_jax.main --config=configs/visionfm.py --workdir=runs/visionfm \
      --config.weights.vision=weights/visionfm --config.weights.text=bert-base-uncased \
      --config.data.train_manifest=train.csv --config.data.val_manifest=val.csv
"""
from retfiner_jax.config_defaults import base_config


def get_config():
  return base_config("visionfm")
