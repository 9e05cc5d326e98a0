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
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.encoder = ""  # [name=]path,...: a training workdir, a converted folder or a PyTorch checkpoint.
  c.variant = ""  # For PyTorch checkpoints that cannot tell their sizes (e.g. retfound, visionfm, urfound).
  c.image_size = 0  # 0: the encoder's own input size.
  c.representation = "concat"  # Features protocol only: concat | cls | mean.
  c.data = ml_collections.ConfigDict()
  c.data.root = ""  # [name=]dir,...: ImageFolder roots {train,val,test}/<class>/<image>.
  c.workdir = "runs/probe"  # Also --workdir.
  c.cache_dir = ""  # Features protocol: '' = WORKDIR/feature_cache
  c.compile_cache = ""  # XLA compilation cache: '' = ~/.cache/retfiner_jax/xla, 'off', or a folder.
  c.probe = ml_collections.ConfigDict()
  c.probe.protocol = "paper"  # paper | features
  c.probe.seeds = (0, 1, 2, 3, 4)
  c.probe.max_epochs = 1000
  c.probe.warmup_epochs = 10
  c.probe.patience = 20
  c.probe.patience_from_epoch = 20
  c.probe.min_delta = 0.001  # On validation balanced accuracy.
  c.probe.min_delta_loss = 0.001  # On validation loss, when the balanced accuracies tie (paper protocol).
  c.probe.learning_rate = 1e-3
  c.probe.min_lr = 1e-8
  c.probe.weight_decay = -1.0  # < 0: the original's value per FM (RETFound 0.05, VisionFM/UrFound 0.01).
  c.probe.drop_path = -1.0  # < 0: the original's value per FM (RETFound/UrFound 0.1, VisionFM 0); paper protocol.
  c.probe.label_smoothing = 0.1
  c.probe.fill = 0.0  # Fill of the random affine transform (the paper's runs: --fill 0).
  c.probe.batch_size = 0  # 0: the original's rule, min(64, 2^(bit_length(round(N/4)) - 1)).
  c.probe.class_balanced = False  # Features protocol only.
  return c
