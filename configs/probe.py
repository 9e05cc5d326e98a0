"""Linear probe. `probe.protocol = "paper"` (the default) runs the original's protocol rule for rule
(retfiner_jax/probe/rules.py, paper.py): frozen encoder re-run every epoch on augmented training images in
train mode, concat representation per FM, one Linear layer (trunc-normal std 2e-5, PyTorch bias init), AdamW
with base lr 1e-3 (warm-up 10 epochs, half cosine to 1e-8 at epoch 1000, per iteration), label smoothing 0.1,
the original's batch-size rule, early stopping (patience 20 from epoch 20; validation balanced accuracy, delta
0.001, ties by validation loss, delta 0.001), seeds 0-4. `"features"`: clean features once, heads on them
(fast; see the README for what it changes).

  python -m retfiner_jax.probe --config=configs/probe.py --config.encoder=ENCODER[,ENCODER2] \
      --config.data.root=DATASET[,DATASET2] --workdir=runs/probe
"""
import dataclasses

import ml_collections

from retfiner_jax.probe.settings import ProbeSettings


def get_config():
  c = ml_collections.ConfigDict()
  c.encoder = ""  # [name=]path,...: a training workdir, a converted folder or a PyTorch checkpoint.
  c.variant = ""  # For PyTorch checkpoints that cannot tell their sizes (e.g. retfound, visionfm, urfound).
  c.image_size = 0  # 0: the encoder's own input size.
  c.representation = "concat"  # Features protocol only: concat | cls | mean.
  c.data = ml_collections.ConfigDict()
  c.data.root = ""  # [name=]dir,...: ImageFolder roots {train,val,test}/<class>/<image>.
  # Files that are volumes of B-scans (VOL, E2E, 3-D .npy, ...): "centre" takes each one's centre B-scan, "all"
  # every B-scan (each an item of the file's class).
  c.data.slices = "centre"
  c.data.skip_bad_images = False  # True: images that do not decode are left out, each named in the log.
  c.workdir = "runs/probe"  # Also --workdir.
  c.cache_dir = ""  # Features protocol: '' = WORKDIR/feature_cache
  c.compile_cache = ""  # XLA compilation cache: '' = ~/.cache/retfiner_jax/xla, 'off', or a folder.
  # Every ProbeSettings field (retfiner_jax/probe/settings.py), with its defaults: the original's values.
  c.probe = ml_collections.ConfigDict(dataclasses.asdict(ProbeSettings()))
  return c
