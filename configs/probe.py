"""Linear probe with the paper's protocol (SPEC.md): frozen encoder, concat representation, one Linear layer
(truncated-normal std 2e-5), AdamW (weight decay 0.05), label smoothing 0.1, up to 1000 epochs, early stopping
(patience 20 from epoch 20 on validation balanced accuracy, min delta 0.001), seeds 0-4.

  python -m retfiner_jax.probe --config=configs/probe.py --config.encoder=ENCODER[,ENCODER2] \
      --config.data.root=DATASET[,DATASET2] --config.workdir=runs/probe
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.encoder = ""  # [name=]path,...: a training workdir, a converted folder or a PyTorch checkpoint.
  c.variant = ""  # For PyTorch checkpoints that cannot tell their sizes (e.g. retfound, visionfm, urfound).
  c.image_size = 0  # 0: the encoder's own input size.
  c.representation = "concat"  # concat | cls | mean
  c.data = ml_collections.ConfigDict()
  c.data.root = ""  # [name=]dir,...: ImageFolder roots {train,val,test}/<class>/<image>.
  c.workdir = "runs/probe"
  c.cache_dir = ""  # '' = WORKDIR/feature_cache
  c.compile_cache = ""  # XLA compilation cache: '' = ~/.cache/retfiner_jax/xla, 'off', or a folder.
  c.probe = ml_collections.ConfigDict()
  c.probe.seeds = (0, 1, 2, 3, 4)
  c.probe.max_epochs = 1000
  c.probe.patience = 20
  c.probe.patience_from_epoch = 20
  c.probe.min_delta = 0.001
  c.probe.learning_rate = 1e-3
  c.probe.weight_decay = 0.05
  c.probe.label_smoothing = 0.1
  c.probe.init_std = 2e-5
  c.probe.batch_size = 128  # 0: full batch.
  c.probe.class_balanced = False
  return c
