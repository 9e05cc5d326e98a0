"""The full 5-seed linear-probe protocol on 1,000 images: this project's way against the original's way.

Ours: features extracted once (jitted, batched), then the heads of all 5 seeds trained together on device
with early stopping inside the compiled loop. The original's way: each epoch re-runs the frozen encoder over
every training and validation image, then updates the head, one seed per run.

The original's way is timed for a few epochs and extrapolated to the epochs the protocol actually runs (the
same early stopping; the number of epochs per seed is taken from our run), times 5 seeds. Both run in this
process, on the same machine, same encoder, same images.

  python benchmarks/probe.py [--images 1000] [--vision vit_s16|vit_b16|tiny] [--timed-epochs 2]

`--protocol paper` times the paper protocol (retfiner_jax/probe/paper.py: per epoch the encoder re-runs in
train mode on augmented training images, once for all 5 seeds; validation features once) against the
original's way in PyTorch: one seed at a time, each epoch the encoder (train mode) on freshly augmented training
images (flip, intensity, affine by grid_sample per image, as torchvision does) and again on the validation
images. Both run the same number of epochs (`--timed-epochs`, after one untimed epoch); the original's figure
is one seed's epochs times the number of seeds. A JSON line per phase, then the summary line.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from retfiner_jax.models.config import ModelConfig, get_variant  # noqa: E402
from retfiner_jax.models.vit import VisionTransformer  # noqa: E402
from retfiner_jax.probe.features import extract_features, make_feature_fn  # noqa: E402
from retfiner_jax.probe.heads import train_heads  # noqa: E402
from retfiner_jax.probe.settings import ProbeSettings  # noqa: E402

# Benchmark names -> the model variants (models/config.py) whose vision sizes they take.
VISION = {"vit_b16": "visionfm", "vit_s16": "vit-s16", "tiny": "tiny-retfound"}


def vision_config(name: str, backbone: str) -> ModelConfig:
  """The named ViT as a `backbone` FM in float32 (the probe's precision); no text side is used."""
  v = get_variant(VISION[name])
  return v.replace(backbone=backbone, vision_projection=False, text_dim=v.vision_dim, text_heads=v.vision_heads,
                   dtype="float32")


def emit(record):
  print(json.dumps(record), flush=True)


def torch_augment(gray, gen):
  """The original's training transforms on (B, H, W) tensors in [0, 1], one image at a time (CPU)."""
  import math
  import torch
  out = []
  h, w = gray.shape[1:]
  for img in gray:
    if torch.rand(1, generator=gen).item() < 0.5:
      img = img.flip(-1)
    if img.max() > 0:
      img = torch.clamp(img * torch.empty(1).uniform_(0.8, 1.2, generator=gen).item(), 0, 1)
    if torch.rand(1, generator=gen).item() < 0.9:
      angle = math.radians(torch.empty(1).uniform_(-10, 10, generator=gen).item())
      tx = round(torch.empty(1).uniform_(-0.1 * w, 0.1 * w, generator=gen).item())
      ty = round(torch.empty(1).uniform_(-0.1 * h, 0.1 * h, generator=gen).item())
      scale = torch.empty(1).uniform_(0.9, 1.1, generator=gen).item()
      shear = math.radians(torch.empty(1).uniform_(-5, 5, generator=gen).item())
      a, c = math.cos(angle), math.sin(angle)
      b = -math.cos(angle) * math.tan(shear) - math.sin(angle)
      d = -math.sin(angle) * math.tan(shear) + math.cos(angle)
      m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
      m[2], m[5] = m[0] * -tx + m[1] * -ty, m[3] * -tx + m[4] * -ty
      theta = torch.tensor(m).reshape(1, 2, 3)
      base = torch.ones(1, h, w, 3)
      base[..., 0] = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w)
      base[..., 1] = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h)[:, None]
      grid = base.view(1, h * w, 3).bmm(theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])).view(1, h, w, 2)
      both = torch.nn.functional.grid_sample(torch.stack([img, torch.ones_like(img)])[None], grid,
                                             align_corners=False)[0]
      img = both[0] * both[1]
    out.append(img)
  return torch.stack(out)


def paper_protocol(a):
  """Ours (all seeds on one encoder pass per batch) against the original's way, per epoch."""
  import torch
  from retfiner_jax.probe import paper, rules
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
  from torch_reference import TorchViT
  cfg = vision_config(a.vision, "retfound")
  rng = np.random.default_rng(0)
  n_train, n_val = int(a.images * 0.7), int(a.images * 0.15)
  n_test = a.images - n_train - n_val
  labels = rng.integers(0, 3, a.images)
  gray = np.clip(rng.normal(100, 40, (a.images, cfg.image_size, cfg.image_size)) + 30 * labels[:, None, None],
                 0, 255).astype(np.uint8)
  split = lambda x: (x[:n_train], x[n_train:n_train + n_val], x[n_train + n_val:])
  data = dict(zip(("gray_train", "gray_val", "gray_test"), split(gray)))
  data.update(zip(("y_train", "y_val", "y_test"), split(labels)))
  params = jax.jit(VisionTransformer(cfg).init)(jax.random.PRNGKey(0),
                                                jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))["params"]
  seeds = tuple(range(5))
  batch = rules.batch_size(n_train)
  emit({"phase": "setup", "protocol": "paper", "vision": a.vision, "images": [n_train, n_val, n_test],
        "batch_size": batch, "seeds": len(seeds), "device": jax.devices()[0].device_kind})
  import statistics
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    settings = ProbeSettings(seeds=seeds, max_epochs=a.timed_epochs + 1, patience=10 ** 6).for_backbone(cfg.backbone)
    start = time.perf_counter()
    paper.probe(cfg, params, data, 3, settings, [Path(tmp) / f"s{s}" for s in seeds], log=lambda *x: None)
    total = time.perf_counter() - start
    log = [json.loads(x) for x in (Path(tmp) / "s0" / "log.jsonl").read_text().splitlines()]
  # Every epoch's own wall time (all seeds together), the first (with compilation) left out.
  ours_epoch = statistics.median(r["seconds"] for r in log[1:])
  emit({"phase": "ours", "seconds_per_epoch_all_seeds": ours_epoch, "first_epoch_s": log[0]["seconds"],
        "total_s": total})
  torch.manual_seed(0)
  net = TorchViT(image_size=cfg.image_size, dim=cfg.vision_dim, depth=cfg.vision_depth, heads=cfg.vision_heads,
                 mlp=cfg.vision_mlp_dim).train()
  for p_ in net.parameters():
    p_.requires_grad_(False)
  mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
  std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
  head = torch.nn.Linear(2 * cfg.vision_dim, 3)
  opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
  gen = torch.Generator().manual_seed(0)
  t_gray = torch.tensor(gray)

  def features(x):
    tokens = net(((x[:, None].repeat(1, 3, 1, 1)) - mean) / std, final_norm=False)
    concat = torch.cat([tokens[:, 1:].mean(1), tokens[:, 0]], 1)
    return torch.nn.functional.layer_norm(concat, concat.shape[1:], eps=1e-6)

  def one_epoch():
    order = torch.randperm(n_train, generator=gen)
    for s in range(0, n_train, batch):  # The last partial batch is kept.
      rows = order[s:s + batch]
      with torch.no_grad():
        x = features(torch_augment(t_gray[rows].float() / 255, gen))
      loss = torch.nn.functional.cross_entropy(head(x), torch.tensor(labels[rows.numpy()]), label_smoothing=0.1)
      opt.zero_grad()
      loss.backward()
      opt.step()
    with torch.no_grad():
      for s in range(n_train, n_train + n_val, batch):
        features(t_gray[s:min(s + batch, n_train + n_val)].float() / 255)
  one_epoch()
  start = time.perf_counter()
  for _ in range(a.timed_epochs):
    one_epoch()
  original_epoch = (time.perf_counter() - start) / a.timed_epochs * len(seeds)
  emit({"phase": "original", "seconds_per_epoch_all_seeds": original_epoch, "torch_threads": torch.get_num_threads()})
  emit({"benchmark": "probe_paper", "vision": a.vision, "images": a.images, "seeds": len(seeds),
        "batch_size": batch, "timed_epochs": a.timed_epochs, "ours_seconds_per_epoch": ours_epoch,
        "original_seconds_per_epoch": original_epoch, "speedup": original_epoch / ours_epoch,
        "ours_1000_epochs_hours": ours_epoch * 1000 / 3600, "device": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine()})


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--protocol", default="features", choices=["features", "paper"])
  p.add_argument("--images", type=int, default=1000)
  p.add_argument("--vision", default="vit_s16", choices=sorted(VISION))
  p.add_argument("--timed-epochs", type=int, default=2)
  p.add_argument("--batch", type=int, default=64)
  a = p.parse_args()
  if a.protocol == "paper":
    return paper_protocol(a)
  cfg = vision_config(a.vision, "visionfm")
  rng = np.random.default_rng(0)
  n_train, n_val = int(a.images * 0.7), int(a.images * 0.15)
  labels = rng.integers(0, 3, a.images)
  images = rng.normal(0, 1, (a.images, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  images += labels[:, None, None, None] * 0.3  # Learnable signal.
  params = jax.jit(VisionTransformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1,) + images.shape[1:]))["params"]
  settings = ProbeSettings(protocol="features", batch_size=128, weight_decay=0.05)
  tr, va = slice(0, n_train), slice(n_train, n_train + n_val)

  # Ours.
  start = time.perf_counter()
  feats = extract_features(cfg, params, images, batch=a.batch)
  t_features = time.perf_counter() - start
  trained = train_heads(feats[tr], labels[tr], feats[va], labels[va], 3, settings)
  jax.block_until_ready(trained)
  t_ours = time.perf_counter() - start
  epochs = np.asarray(trained["epochs_run"])

  # The original's way: every epoch runs the encoder over train and val images again.
  feature_fn = make_feature_fn(cfg)
  tx = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
  head = {"kernel": jnp.zeros((feats.shape[1], 3)), "bias": jnp.zeros(3)}
  opt = tx.init(head)

  @jax.jit
  def head_step(head, opt, x, y):
    def loss(h):
      logits = x @ h["kernel"] + h["bias"]
      return optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, 3), 0.1)).mean()
    updates, opt = tx.update(jax.grad(loss)(head), opt, head)
    return optax.apply_updates(head, updates), opt

  head_batch = min(settings.batch_size, n_train)

  def one_epoch(head, opt):
    order = rng.permutation(n_train)
    for s in range(0, n_train - head_batch + 1, head_batch):  # Each minibatch: the encoder again.
      rows = order[s:s + head_batch]
      x = [feature_fn(params, images[rows[c:c + a.batch]]) for c in range(0, len(rows), a.batch)]
      head, opt = head_step(head, opt, jnp.concatenate(x), labels[rows])
    for s in range(n_train, n_train + n_val, a.batch):  # Validation pass: the encoder again.
      chunk = images[s:min(s + a.batch, n_train + n_val)]
      if len(chunk) == a.batch:
        jax.block_until_ready(feature_fn(params, chunk))
    return head, opt

  head, opt = one_epoch(head, opt)  # Compile.
  start = time.perf_counter()
  for _ in range(a.timed_epochs):
    head, opt = one_epoch(head, opt)
  jax.block_until_ready(head)
  per_epoch = (time.perf_counter() - start) / a.timed_epochs
  t_original = per_epoch * epochs.sum()  # Every seed runs its own epochs.
  print(json.dumps({
      "benchmark": "probe", "vision": a.vision, "images": a.images, "seeds": len(settings.seeds),
      "epochs_per_seed": epochs.tolist(), "ours_seconds": round(t_ours, 2), "ours_feature_seconds":
      round(t_features, 2), "original_seconds_per_epoch": round(per_epoch, 2),
      "original_seconds_extrapolated": round(t_original, 1), "speedup": round(t_original / t_ours, 1),
      "device": jax.devices()[0].device_kind, "machine": platform.processor() or platform.machine()}), flush=True)


if __name__ == "__main__":
  main()
