"""The original linear probe's rules, as plain functions: the paper protocol runs them and the tests replay
an audit log against them.

Source: github ronnief1/RetFiner, snapshot e0e089f, `linear_probing/`: `main/clf_tasks_main.py` (batch size,
per-FM settings), `src/utils/train_eval.py` (`EarlyStopping`), `src/retfound/lr_sched.py`
(`adjust_learning_rate`), `retfound.sh` / `visionFM.sh` (the arguments the paper ran with).
"""
from __future__ import annotations

import math

import numpy as np

# The arguments of the paper's runs (retfound.sh, visionFM.sh) and the parser's defaults they rely on.
MAX_EPOCHS = 1000
WARMUP_EPOCHS = 10
BASE_LR = 1e-3  # override_args: linear probing always gets 1e-3.
MIN_LR = 1e-8
PATIENCE = 20
START_FROM = 20
DELTA = 0.001  # On validation balanced accuracy (higher is better).
DELTA_TWO = 0.001  # On validation loss (lower is better).
LABEL_SMOOTHING = 0.1
HEAD_STD = 2e-5

# Weight decay as override_args leaves it for the checkpoints the paper probes: RETFound's
# `RETFound_bscan_weights.pth` matches the `_bscan_` branch first, so the parser's 0.05 stays; VisionFM's
# `VFM_OCT_weights.pth` (and UrFound's weights, whose name has no `_bscan_`) fall to the last branch: 0.01.
WEIGHT_DECAY = {"retfound": 0.05, "visionfm": 0.01, "urfound": 0.01}
# Stochastic depth of the encoder while the head trains: `--drop_path` 0.1 for the timm ViTs (RETFound,
# UrFound); VisionFM's own ViT is built without a drop-path rate (its default 0).
DROP_PATH = {"retfound": 0.1, "visionfm": 0.0, "urfound": 0.1}


def batch_size(num_train: int) -> int:
  """`--batch_size 0`: min(64, the power of two at or below a quarter of the training set), 8 if below 1."""
  size = min(64, 2 ** (int(round(num_train * 0.25)).bit_length() - 1))
  return 8 if size < 1 else size


def learning_rate(epoch: float, base_lr: float = BASE_LR, min_lr: float = MIN_LR,
                  warmup_epochs: int = WARMUP_EPOCHS, epochs: int = MAX_EPOCHS) -> float:
  """`adjust_learning_rate` at a fractional epoch (iteration i of n in epoch e: e + i / n): linear warm-up
  from 0, then a half cosine down to min_lr at `epochs`."""
  if epoch < warmup_epochs:
    return base_lr * epoch / warmup_epochs
  return min_lr + (base_lr - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


class EarlyStopping:
  """The original's `EarlyStopping` with the paper's choice of metrics: `value` = validation balanced accuracy
  (greater is better, by more than `delta`), `value_two` = validation loss (lower is better, by more than
  `delta_two`), compared only when the balanced accuracies are within `delta` of each other. An epoch that is
  better either way becomes the best (its values replace the best ones, even a slightly lower accuracy) and
  resets the counter; otherwise the counter runs from `start_from` on, and `early_stop` is set at `patience`."""

  def __init__(self, patience=PATIENCE, delta=DELTA, delta_two=DELTA_TWO, start_from=START_FROM):
    self.patience, self.delta, self.delta_two, self.start_from = patience, delta, delta_two, start_from
    self.counter = 0
    self.best_value = self.best_value_two = None
    self.early_stop = False

  def __call__(self, value, value_two, epoch) -> bool:
    """Returns True when this epoch is the best so far."""
    if (self.best_value is None or (value - self.best_value) > self.delta
        or (abs(value - self.best_value) < self.delta and (self.best_value_two - value_two) > self.delta_two)):
      self.best_value, self.best_value_two = value, value_two
      self.counter = 0
      return True
    if epoch >= self.start_from:
      self.counter += 1
      if self.counter >= self.patience:
        self.early_stop = True
    return False


def head_init(rng: np.random.Generator, features: int, classes: int):
  """The probe's Linear(features, classes): weight as timm's `trunc_normal_(std=2e-5)` (normal, cut at +-2
  absolute, i.e. never at this std), bias as PyTorch's Linear default U(+-1/sqrt(fan_in)). Returns (kernel
  (features, classes), bias (classes,)) in float32."""
  kernel = np.clip(rng.normal(0.0, HEAD_STD, (features, classes)), -2.0, 2.0)
  bound = 1.0 / math.sqrt(features)
  bias = rng.uniform(-bound, bound, classes)
  return kernel.astype(np.float32), bias.astype(np.float32)
