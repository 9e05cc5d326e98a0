"""Every setting of the linear probe, in one dataclass whose defaults are the original's (rules.py).

configs/probe.py builds its `probe` block from these defaults, and the probe builds them back with
`ProbeSettings(**config.probe)`: there is no second set of defaults. Weight decay and drop path below zero mean
"the original's value for this FM"; `for_backbone` fills them in.
"""
from __future__ import annotations

import dataclasses

from retfiner_jax.errors import ConfigError
from retfiner_jax.probe import rules

PROTOCOLS = ("paper", "features")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  # paper: the original's protocol rule for rule (paper.py); features: clean features once, heads on them.
  protocol: str = "paper"
  seeds: tuple = (0, 1, 2, 3, 4)
  max_epochs: int = rules.MAX_EPOCHS
  warmup_epochs: int = rules.WARMUP_EPOCHS  # Paper protocol: linear warm-up, then half cosine to min_lr.
  learning_rate: float = rules.BASE_LR
  min_lr: float = rules.MIN_LR
  weight_decay: float = -1.0  # AdamW's; < 0: the original's value per FM (rules.WEIGHT_DECAY).
  drop_path: float = -1.0  # Paper protocol; < 0: the original's value per FM (rules.DROP_PATH).
  label_smoothing: float = rules.LABEL_SMOOTHING
  # Early stopping on validation balanced accuracy (min_delta), ties broken by validation loss (min_delta_loss),
  # epochs without improvement counted from patience_from_epoch on.
  patience: int = rules.PATIENCE
  patience_from_epoch: int = rules.START_FROM
  min_delta: float = rules.DELTA
  min_delta_loss: float = rules.DELTA_TWO
  # 0: the original's rule, min(64, 2^(bit_length(round(N/4)) - 1)); -1: the whole training set (features only).
  batch_size: int = 0
  fill: float = 0.0  # Paper protocol: the random affine transform's fill (the paper's runs: --fill 0).
  data_seed: int = 0  # Paper protocol: shuffling and augmentation, shared by the seeds.
  class_balanced: bool = False  # Features protocol: class-weighted loss.
  l2: float = 0.0  # Features protocol: an L2 penalty added to the loss (0 in the paper's protocol).

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ConfigError(f"config.probe.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
    if self.batch_size < -1:
      raise ConfigError(f"config.probe.batch_size must be >= -1, got {self.batch_size}")
    object.__setattr__(self, "seeds", tuple(self.seeds))

  def for_backbone(self, backbone: str) -> "ProbeSettings":
    """These settings with the per-FM values (weight decay, drop path) filled in where they are below zero."""
    pick = lambda value, table: float(value) if value >= 0 else table[backbone]
    return dataclasses.replace(self, weight_decay=pick(self.weight_decay, rules.WEIGHT_DECAY),
                               drop_path=pick(self.drop_path, rules.DROP_PATH))

  def replace(self, **kw) -> "ProbeSettings":
    return dataclasses.replace(self, **kw)
