"""MAE pretraining of the demo's small ViT (the demo's stage 1, and its image-only control).

  python -m retfiner_jax.mae --config=configs/mae_demo.py --workdir=runs/mae \
      --config.data.train_manifest=runs/demo/data/manifest_train.csv

The demo (python -m retfiner_jax.demo) runs the same settings by itself on its synthetic training split
(`config.demo.mae` of configs/demo.py).
"""
from retfiner_jax.config_defaults import demo_mae, demo_model, mae_config


def get_config():
  return demo_mae(demo_model(mae_config("retfound")))  # The encoder the demo refines; a small decoder.
