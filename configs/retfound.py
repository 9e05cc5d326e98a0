"""RetFiner on retfound: the original's settings (AdamW 1e-4, wd 0.01, batch 128, <=20 epochs, patience 3), and
RETFound built with stochastic depth 0.1 as the original builds it (RetFiner/util_funcs.py,
`load_vision_backbone`: `vit_large_patch16(drop_path_rate=0.1)`, active while Lightning trains).

Where it fits as shipped (python -m retfiner_jax.aot; README, "Where it fits"): every target of the README's table:
one H200 or one H100 (41.9 GiB), eight H100s, a v4-8, v5p-8 or v6e-8, and a v5e-8 with little to spare (15.5 of
15.75 GiB a chip).

  python -m retfiner_jax.main --config=configs/retfound.py --workdir=runs/retfound \
      --config.weights.vision=weights/retfound --config.weights.text=bert-base-uncased \
      --config.data.train_manifest=train.csv --config.data.val_manifest=val.csv
"""
from retfiner_jax.config_defaults import base_config


def get_config():
  c = base_config("retfound")
  c.model.drop_path = 0.1
  return c
