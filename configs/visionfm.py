"""RetFiner on visionfm, as the original refined the VisionFM it probes.

The refined VisionFM that the paper's probe loads is named
`best-model_VisionFM0.07Falselr4e-05batch_size128grad_accum1LossesAlleps1e8_orignorm_maxepochs100_patience10_bscan.pth`
(linear_probing/visionFM.sh): learning rate 4e-5, at most 100 epochs, patience 10 (batch 128, temperature 0.07,
all losses, eps 1e-8 as everywhere). The rest are the original's defaults (AdamW, wd 0.01). VisionFM's ViT is built
without stochastic depth (RetFiner/util_funcs.py: `VisionTransformer(return_all_tokens=True, qkv_bias=True)`,
drop_path_rate 0 by default), so `model.drop_path` stays 0.

Where it fits as shipped (python -m retfiner_jax.aot; README, "Where it fits"): every target of the README's
table (a v5e-8 in 10.0 of 15.75 GiB a chip).

  python -m retfiner_jax.main --config=configs/visionfm.py --workdir=runs/visionfm \
      --config.weights.vision=weights/visionfm --config.weights.text=bert-base-uncased \
      --config.data.train_manifest=train.csv --config.data.val_manifest=val.csv
"""
from retfiner_jax.config_defaults import base_config


def get_config():
  c = base_config("visionfm")
  c.train.learning_rate = 4e-5
  c.train.epochs = 100
  c.train.patience = 10
  return c
