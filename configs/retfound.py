"""RetFiner on retfound: the original's settings (AdamW 1e-4, wd 0.01, batch 128, <=20 epochs, patience 3).

  python -m retfiner_jax.main --config=configs/retfound.py --workdir=runs/retfound \
      --config.weights.vision=weights/retfound --config.weights.text=bert-base-uncased \
      --config.data.train_manifest=train.csv --config.data.val_manifest=val.csv
"""
from retfiner_jax.config_defaults import base_config


def get_config():
  return base_config("retfound")
