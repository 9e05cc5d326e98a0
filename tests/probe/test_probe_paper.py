"""The paper's probe protocol against the original's own functions, re-typed here from
github ronnief1/RetFiner @ e0e089f (file and line given at each), and a run on real B-scans replayed."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import shared_path
from retfiner_jax.models.config import get_variant
from retfiner_jax.models.vit import VisionTransformer
from retfiner_jax.probe import augment, metrics, paper, rules

ROOT = Path(__file__).resolve().parents[2]


class OriginalEarlyStopping:
  """linear_probing/src/utils/train_eval.py, lines 27-79 (`EarlyStopping`), re-typed."""

  def __init__(self, patience=50, delta=0.01, greater_is_better=False, delta_two=0.01, greater_is_better_two=False,
               start_from=0):
    self.patience, self.delta, self.delta_two = patience, delta, delta_two
    self.counter, self.best_value, self.early_stop = 0, None, False
    self.is_better = (lambda x, y: (x - y) > self.delta) if greater_is_better else (lambda x, y: (y - x) > self.delta)
    self.is_better_two = ((lambda x, y: (x - y) > self.delta_two) if greater_is_better_two
                          else (lambda x, y: (y - x) > self.delta_two))
    self.is_same = lambda x, y: abs(x - y) < self.delta
    self.start_from = start_from

  def __call__(self, value, value_two, epoch):
    if (self.best_value is None or self.is_better(value, self.best_value)
        or (self.is_same(value, self.best_value) and self.is_better_two(value_two, self.best_value_two))):
      self.best_value, self.best_value_two, self.counter = value, value_two, 0
      return True
    elif epoch >= self.start_from:
      self.counter += 1
      if self.counter >= self.patience:
        self.early_stop = True
    return False


def original_stopper(patience=20, start_from=20):
  """As retfound.sh / visionFM.sh build it: --val_metric bacc, --val_metric_two loss, deltas 0.001."""
  return OriginalEarlyStopping(patience=patience, delta=0.001, greater_is_better=True, delta_two=0.001,
                               greater_is_better_two=False, start_from=start_from)


def original_lr(epoch, lr=1e-3, min_lr=1e-8, warmup_epochs=10, epochs=1000):
  """linear_probing/src/retfound/lr_sched.py, lines 9-20 (`adjust_learning_rate`), re-typed."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def original_batch_size(num_samples):
  """linear_probing/main/clf_tasks_main.py, the `args.batch_size == 0` block under __main__, re-typed."""
  batch_size = min(64, 2 ** (int(round(num_samples * 0.25)).bit_length() - 1))
  if batch_size < 1:
    batch_size = 8
  return batch_size


def original_metrics(true_label_decode, prediction_softmax, num_class):
  """linear_probing/src/utils/train_eval.py, the end of `evaluate` (lines ~290-310), re-typed."""
  from sklearn.metrics import (average_precision_score, balanced_accuracy_score, f1_score, matthews_corrcoef,
                               roc_auc_score)
  onehot = np.eye(num_class)[true_label_decode]
  pred = prediction_softmax.argmax(1)
  return {"bacc": balanced_accuracy_score(true_label_decode, pred),
          "auroc": roc_auc_score(onehot, prediction_softmax, multi_class="ovr", average="weighted"),
          "ap": average_precision_score(onehot, prediction_softmax, average="weighted"),
          "f1": f1_score(true_label_decode, pred, average="weighted", zero_division=0),
          "mcc": matthews_corrcoef(true_label_decode, pred)}


def replay(stopper, bacc, loss):
  out = []
  for epoch, (b, l) in enumerate(zip(bacc, loss)):
    best = stopper(b, l, epoch)
    out.append((best, stopper.early_stop))
    if stopper.early_stop:
      break
  return out


def test_early_stopping_equals_the_original_on_constructed_sequences():
  rng = np.random.default_rng(0)
  cases = {
      # Rising, then flat with a rising loss: best at 30, stop 20 epochs later.
      "plateau": ([0.5 + 0.01 * min(e, 30) for e in range(80)], [1 - 0.01 * min(e, 30) + 0.001 * e for e in range(80)]),
      # Ties within delta with a loss lower by more than delta_two: best, even at a slightly lower bacc.
      "tie_lower_loss": ([0.8, 0.7995, 0.7991, 0.7999, 0.9] + [0.5] * 50, [1.0, 0.99, 0.9895, 0.97, 2.0] + [3.0] * 50),
      # A loss lower by exactly delta_two or less is not better; a bacc higher by at most delta is a tie.
      "boundaries": ([0.5, 0.5, 0.5009, 0.5] + [0.1] * 45, [1.0, 0.9995, 0.9, 0.9] + [5.0] * 45),
      # Nothing improves: the counter only runs from start_from (20), so the stop is at epoch 39.
      "flat": ([0.5] * 60, [1.0 + 0.01 * e for e in range(60)]),
      "noise": (list(rng.uniform(0.3, 0.6, 300)), list(rng.uniform(0.5, 1.5, 300))),
  }
  for name, (bacc, loss) in cases.items():
    ours, original = replay(rules.EarlyStopping(), bacc, loss), replay(original_stopper(), bacc, loss)
    assert ours == original, name
  flat = replay(rules.EarlyStopping(), *cases["flat"])
  assert len(flat) == 40 and flat[-1] == (False, True) and flat[0] == (True, False)
  tie = replay(rules.EarlyStopping(), *cases["tie_lower_loss"])
  assert [b for b, _ in tie[:5]] == [True, True, False, True, True]  # 0.7995 within 0.001 and loss -0.01.
  bounds = replay(rules.EarlyStopping(), *cases["boundaries"])
  assert [b for b, _ in bounds[:4]] == [True, False, True, False]


def test_learning_rate_at_fractional_epochs_equals_the_original():
  for epoch in (0, 0.25, 3.5, 9.999, 10, 10.5, 123.456, 500, 999.75, 1000):
    assert rules.learning_rate(epoch) == original_lr(epoch)
  assert rules.learning_rate(5) == pytest.approx(5e-4)
  assert rules.learning_rate(10) == pytest.approx(1e-3)
  assert rules.learning_rate(505) == pytest.approx(1e-8 + (1e-3 - 1e-8) / 2)
  assert rules.learning_rate(1000) == pytest.approx(1e-8)


def test_batch_size_rule():
  expected = {0: 8, 3: 1, 12: 2, 300: 64, 10000: 64, 100: 16, 47: 8}
  for n, want in expected.items():
    assert rules.batch_size(n) == original_batch_size(n) == want, n


def test_metrics_equal_the_originals_formulas():
  rng = np.random.default_rng(1)
  for classes in (2, 4):
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, 30)])
    probs = rng.dirichlet(np.ones(classes), len(y))
    want = original_metrics(y, probs, classes)
    got = metrics.classification_metrics(y, probs)
    for k in metrics.METRICS:
      assert got[k] == pytest.approx(want[k], abs=1e-12), (classes, k)


def test_head_init_as_timm_and_pytorch():
  kernel, bias = rules.head_init(np.random.default_rng(0), 2048, 5)
  assert kernel.shape == (2048, 5) and bias.shape == (5,)
  assert abs(kernel.std() - 2e-5) < 1e-6 and abs(kernel.mean()) < 1e-6
  torch_linear = torch.nn.Linear(2048, 5)  # PyTorch's bias bound is 1/sqrt(fan_in).
  bound = 1 / math.sqrt(2048)
  assert torch_linear.bias.abs().max() <= bound and np.abs(bias).max() <= bound
  many = rules.head_init(np.random.default_rng(1), 2048, 4000)[1]
  assert np.abs(many).max() > 0.95 * bound  # Uniform over the whole range, not a narrow one.


def test_augmentation_parameter_ranges_and_probabilities():
  p = jax.device_get(augment.sample_params(jax.random.PRNGKey(0), 20000, 224, 200))
  assert 0.48 < p["flip"].mean() < 0.52 and 0.89 < p["affine"].mean() < 0.91
  assert p["intensity"].min() >= 0.8 and p["intensity"].max() <= 1.2
  assert p["angle"].min() >= -10 and p["angle"].max() <= 10 and p["angle"].max() > 9.9
  assert p["scale"].min() >= 0.9 and p["scale"].max() <= 1.1
  assert p["shear"].min() >= -5 and p["shear"].max() <= 5
  assert np.all(p["tx"] == np.round(p["tx"])) and np.abs(p["tx"]).max() == 20  # round(U(-0.1 W, 0.1 W)), W=200.
  assert np.abs(p["ty"]).max() == 22  # H = 224: |ty| <= round(22.4).


def _torchvision_inverse_affine(angle, translate, scale, shear):
  """torchvision.transforms.functional._get_inverse_affine_matrix with center (0, 0), re-typed."""
  rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  m = [x / scale for x in [d, -b, 0.0, -c, a, 0.0]]
  m[2] += m[0] * (-tx) + m[1] * (-ty)
  m[5] += m[3] * (-tx) + m[4] * (-ty)
  return m


def _torchvision_affine(img, matrix, fill):
  """torchvision's tensor `affine`: `_gen_affine_grid` + `_apply_grid_transform` (bilinear, fill), re-typed."""
  h, w = img.shape
  theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
  base = torch.empty(1, h, w, 3)
  base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w))
  base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h).unsqueeze_(-1))
  base[..., 2].fill_(1)
  grid = base.view(1, h * w, 3).bmm(theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])).view(1, h, w, 2)
  x = torch.cat([torch.tensor(img)[None, None], torch.ones(1, 1, h, w)], 1)
  out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
  mask, out = out[:, -1:], out[:, :-1]
  return (out * mask + (1.0 - mask) * fill)[0, 0].numpy()


def test_affine_resampling_equals_torchvisions():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 1, (24, 20)).astype(np.float32)
  for angle, tx, ty, scale, shear, fill in ((7.5, 2, -1, 1.05, 3.0, 0.0), (-9.0, -2, 2, 0.92, -4.5, 0.0),
                                           (0.0, 0, 0, 1.0, 0.0, 1.0), (3.0, 1, 1, 0.95, 1.0, 1.0)):
    want = _torchvision_affine(img, _torchvision_inverse_affine(angle, (tx, ty), scale, (shear, 0.0)), fill)
    matrix = augment.inverse_affine(jnp.float32(angle), jnp.float32(tx), jnp.float32(ty), jnp.float32(scale),
                                    jnp.float32(shear))
    got = np.asarray(augment.affine(jnp.asarray(img), matrix, fill))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_visionfm_features_use_the_final_norm():
  cfg = get_variant("tiny-visionfm").replace(dtype="float32")
  vit = VisionTransformer(cfg)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = vit.init(jax.random.PRNGKey(1), images)["params"]
  params["norm"] = {"scale": jnp.linspace(0.5, 2.0, cfg.vision_dim), "bias": jnp.linspace(-1, 1, cfg.vision_dim)}
  got = vit.apply({"params": params}, images, method=paper.paper_features)
  tokens = np.asarray(vit.apply({"params": params}, images, method=VisionTransformer.features), np.float64)
  mean, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
  normed = (tokens - mean) / np.sqrt(var + 1e-6) * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"])
  want = np.concatenate([normed[:, 0], normed[:, 1:].mean(1)], -1)  # Class token first, no extra LayerNorm.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  retfound = VisionTransformer(get_variant("tiny-retfound").replace(dtype="float32"))
  rparams = retfound.init(jax.random.PRNGKey(1), images)["params"]
  rparams["norm"] = {"scale": jnp.full((64,), 3.0), "bias": jnp.zeros(64)}  # Unused by RETFound's features.
  feats = np.asarray(retfound.apply({"params": rparams}, images, method=paper.paper_features), np.float64)
  rtokens = np.asarray(retfound.apply({"params": rparams}, images, method=VisionTransformer.features), np.float64)
  concat = np.concatenate([rtokens[:, 1:].mean(1), rtokens[:, 0]], -1)
  want = (concat - concat.mean(-1, keepdims=True)) / np.sqrt(concat.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4)


def test_paper_protocol_on_real_bscans_writes_an_audit_that_replays(tmp_path):
  """The CLI (with --workdir) on the real B-scans; every seed's log replays under the original's rules and its
  metrics recompute from predictions.npz."""
  from torch_reference import TorchViT
  samples = shared_path("data", "real-oct-samples")
  root = tmp_path / "real"
  for path in samples.rglob("*.jp*g"):
    label = path.name.split("-")[0]
    if label == "VMA":
      continue
    for split, copies in (("train", 3), ("val", 1), ("test", 1)):
      (root / split / label).mkdir(parents=True, exist_ok=True)
      for k in range(copies):
        shutil.copy(path, root / split / label / f"{k}_{path.name}")
  torch.manual_seed(0)
  torch.save(TorchViT(dim=64, mlp=256).state_dict(), tmp_path / "enc.pth")
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "retfiner_jax.probe", "--config=configs/probe.py",
         f"--config.encoder=fm={tmp_path / 'enc.pth'}", "--config.variant=tiny-retfound",
         f"--config.data.root=real={root}", "--config.probe.seeds=0,3", "--config.probe.max_epochs=40",
         "--config.probe.patience=4", "--config.probe.patience_from_epoch=6", "--config.compile_cache=off",
         f"--workdir={out}"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["real"]["fm"]["protocol"] == "paper"
  n_train = 24  # 8 images x 3 copies.
  for k, seed in enumerate((0, 3)):
    folder = out / "audit" / "real" / "fm" / f"seed{seed}"
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    stopper = original_stopper(patience=4, start_from=6)
    best_epoch = None
    for epoch, record in enumerate(log):
      assert record["epoch"] == epoch
      assert record["batch_size"] == original_batch_size(n_train) == 4 and record["iterations"] == 6
      assert record["lr_first"] == original_lr(epoch, epochs=40)
      assert record["lr_last"] == original_lr(epoch + 5 / 6, epochs=40)
      assert record["best"] == stopper(record["val_bacc"], record["val_loss"], epoch)
      assert record["early_stop"] == stopper.early_stop
      best_epoch = epoch if record["best"] else best_epoch
      assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])
    assert stopper.early_stop or len(log) == 40
    assert results["real"]["fm"]["best_epoch"][k] == best_epoch
    z = np.load(folder / "predictions.npz")
    assert z["labels"].shape == (8,) and z["probs"].shape == (8, 4)
    np.testing.assert_allclose(z["probs"].sum(-1), 1, rtol=1e-5)
    want = original_metrics(z["labels"], z["probs"], 4)
    for m in metrics.METRICS:
      assert results["real"]["fm"][m]["per_seed"][k] == pytest.approx(want[m], abs=1e-9)
