"""MAE pretraining (models/mae.py, mae.py): the masking, the positions and the loss against MAE's own
definitions (typed out in PyTorch here, or computed by hand), the masked encoder, and the command: it trains,
resumes, continues from its export, and exports an FM the RetFiner configs and the converter take."""
import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retfiner_jax.config_defaults import mae_config
from retfiner_jax.data import synthetic
from retfiner_jax.errors import ConfigError
from retfiner_jax.mae import masking
from retfiner_jax.mae import trainer as mae_trainer
from retfiner_jax.models.config import get_variant
from retfiner_jax.models.mae import MaeSettings, MaskedAutoencoder, patchify, reconstruction_loss, sincos_pos_embed
from retfiner_jax.runs import sharding, step_seed
from retfiner_jax.weights import files as weight_files

CFG = get_variant("tiny-retfound").replace(dtype="float32", image_size=32, patch_size=8)  # 4 x 4 patches.
SETTINGS = MaeSettings(decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_patch_masks_keep_a_quarter_and_restore_the_order():
  visible, restore, mask = map(np.asarray, masking.sample_patch_masks(jax.random.PRNGKey(3), 50, 16, 0.75))
  assert visible.shape == (50, 4) and restore.shape == (50, 16)
  for b in range(50):
    assert len(set(visible[b])) == 4 and mask[b].sum() == 12 and np.all(mask[b, visible[b]] == 0)
    # restore is the inverse of the shuffle that puts the visible patches first.
    shuffle = np.argsort(restore[b])
    assert np.array_equal(shuffle[:4], visible[b]) and np.array_equal(np.sort(shuffle), np.arange(16))
  counts = np.bincount(visible.ravel(), minlength=16)  # Uniform choice: every patch kept sometimes.
  assert counts.min() > 0
  with pytest.raises(ValueError, match="no visible patch"):
    masking.sample_patch_masks(jax.random.PRNGKey(0), 1, 4, 0.9)


def test_sincos_positions_by_hand():
  dim, grid = 8, 3
  table = sincos_pos_embed(dim, grid)[0]
  assert table.shape == (1 + grid * grid, dim) and np.all(table[0] == 0)
  omega = 1.0 / 10000 ** (np.arange(2) / 2)  # dim / 4 = 2 frequencies.
  row, col = 2, 1
  expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(table[1 + row * grid + col], expected, atol=1e-7)


def test_loss_equals_maes_definition_in_pytorch():
  """MAE's patchify (NCHW, einsum nchpwq->nhwpqc) and forward_loss, typed out in PyTorch from the paper's code."""
  import torch
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  pred = rng.normal(size=(3, 16, 8 * 8 * 3)).astype(np.float32)
  mask = (rng.random((3, 16)) < 0.75).astype(np.float32)

  def torch_loss(imgs, pred, mask, norm_pix):
    p, h = 8, 4
    x = imgs.reshape(imgs.shape[0], 3, h, p, h, p)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * h, p * p * 3)
    if norm_pix:
      mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return ((loss * mask).sum() / mask.sum()).item()
  nchw = torch.tensor(images.transpose(0, 3, 1, 2))
  for norm_pix in (True, False):
    got = float(reconstruction_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask), 8, norm_pix))
    assert got == pytest.approx(torch_loss(nchw, torch.tensor(pred), torch.tensor(mask), norm_pix), rel=1e-5)
  # patchify: patch (1, 2)'s first pixel row is image row 8, columns 16..23, channels last.
  np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(images), 8))[0, 1 * 4 + 2, :24],
                                images[0, 8, 16:24].ravel())


def test_encoder_sees_only_the_visible_patches():
  model = MaskedAutoencoder(CFG, SETTINGS)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  visible, restore, mask = masking.sample_patch_masks(jax.random.PRNGKey(1), 2, 16, 0.75)
  params = model.init(jax.random.PRNGKey(2), images, visible, restore)["params"]
  pred = model.apply({"params": params}, images, visible, restore)
  assert pred.shape == (2, 16, 8 * 8 * 3) and "proj" not in params["vision_encoder"]
  # Changing every masked patch's pixels changes no prediction.
  pixel_mask = np.repeat(np.repeat(np.asarray(mask).reshape(2, 4, 4), 8, 1), 8, 2)[..., None]
  noisy = images + 5.0 * pixel_mask * jax.random.normal(jax.random.PRNGKey(4), images.shape)
  np.testing.assert_allclose(model.apply({"params": params}, noisy, visible, restore), pred, atol=1e-5)
  # With every patch visible in order, the encoder is the ViT's features plus its final norm.
  everything = jnp.tile(jnp.arange(16), (2, 1))
  enc = model.bind({"params": params}).vision_encoder
  np.testing.assert_allclose(enc.normed_features(images, everything), enc.norm(enc.features(images)), atol=1e-6)


def _config(manifest, epochs=2, **train):
  c = mae_config("retfound")
  for key, value in CFG.to_dict().items():
    c.model[key] = value
  c.mae.update(dataclasses.asdict(SETTINGS))
  c.data.train_manifest = str(manifest)
  c.compile_cache = "off"
  c.train.update(dict(batch_size=8, epochs=epochs, warmup_epochs=1, learning_rate=1e-3, log_every=1), **train)
  return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("mae_corpus")
  synthetic.generate(root, count=40, seed=2, height=48, width=48, workers=1, log=lambda *a: None)
  return root / "manifest_train.csv"


def test_the_command_trains_resumes_and_exports_an_fm(corpus, tmp_path):
  """A run stopped by SIGTERM at step 3 and resumed ends with the uninterrupted run's parameters; the loss falls;
  the positions stay MAE's fixed table; the export is an FM: the probe's folder, the FM's PyTorch layout
  (converted back: the same tensors), and the starting point of a continued run."""
  logs = []
  whole = mae_trainer.run(_config(corpus), tmp_path / "whole", log=logs.append)
  assert whole["status"] == "finished" and whole["steps"] == 2 * ((len(corpus.read_text().splitlines()) - 1) // 8)
  losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
  assert losses[-1] < losses[0] and whole["final_loss"] == losses[-1]
  again = mae_trainer.run(_config(corpus), tmp_path / "whole", log=lambda *a: None)  # A finished run: exported again.
  assert again["steps"] == whole["steps"] and again["final_loss"] == losses[-1]

  def terminate_at_step_3(line):  # A SIGTERM arriving during step 3.
    if " step      3/" in line:
      os.kill(os.getpid(), signal.SIGTERM)
  stopped = mae_trainer.run(_config(corpus), tmp_path / "parts", log=terminate_at_step_3)
  assert stopped["status"] == "interrupted" and stopped["steps"] == 3 and "exported" not in stopped
  resumed_log = []
  parts = mae_trainer.run(_config(corpus), tmp_path / "parts", log=resumed_log.append)
  assert any("resumed from" in line and "step 3" in line for line in resumed_log)
  _, a, _ = weight_files.load_converted(whole["exported"]["mae_flax"])
  _, b, _ = weight_files.load_converted(parts["exported"]["mae_flax"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)

  _, fm, meta = weight_files.load_converted(whole["exported"]["vision_flax"])
  assert sorted(fm) == ["vision_encoder"] and meta["contents"] == ["vision_encoder"]
  np.testing.assert_array_equal(fm["vision_encoder"]["pos_embed"], sincos_pos_embed(CFG.vision_dim, 4))
  assert not np.allclose(a["decoder"]["decoder_pred"]["kernel"],
                         mae_trainer.init_params(CFG, SETTINGS, 0)["decoder"]["decoder_pred"]["kernel"])
  import torch  # RETFound's and MAE's layout, which their loaders read as checkpoint["model"].
  saved = torch.load(whole["exported"]["pytorch"], map_location="cpu", weights_only=True)
  assert list(saved) == ["model"] and "patch_embed.proj.weight" in saved["model"]
  _, from_torch, _ = weight_files.convert_checkpoint(whole["exported"]["pytorch"], variant="tiny-retfound",
                                                model_config=CFG)
  # (The converter adds RETFound's new projection, initialised: MAE has none.)
  converted = {k: v for k, v in from_torch["vision_encoder"].items() if k != "proj"}
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), converted, fm["vision_encoder"])

  further = _config(corpus, max_steps=2)
  further.init = str(tmp_path / "whole")
  more = mae_trainer.run(further, tmp_path / "more", log=logs.append)
  assert more["steps"] == 2 and any("continuing MAE pretraining" in line for line in logs)
  wrong = _config(corpus)
  wrong.mae.decoder_dim = 32
  wrong.init = str(tmp_path / "whole")
  with pytest.raises(ConfigError, match="does not fit"):
    mae_trainer.run(wrong, tmp_path / "wrong", log=lambda *a: None)


@pytest.mark.parametrize("scan", [True, False])
def test_weight_decay_reaches_what_maes_does_in_both_layer_layouts(scan):
  """MAE (timm's add_weight_decay) decays a parameter unless it is 1-D or a bias, judged on PyTorch's shapes:
  here a scanned stack's leading layer axis is not one of them. The mask must be that rule, whatever the layout
  (it used to be `ndim >= 2`, which decays every bias and LayerNorm of a scanned stack)."""
  cfg = CFG.replace(scan_layers=scan)
  params = mae_trainer.abstract_params(cfg, SETTINGS)
  mask = mae_trainer.weight_decay_mask(params)

  def maes_rule(path, leaf):
    keys = [getattr(k, "key", "") for k in path]
    torch_ndim = leaf.ndim - (1 if scan and "blocks" in keys else 0)  # The stacked layer axis.
    frozen = keys[-1] in mae_trainer.FROZEN  # The sin-cos positions: not in MAE's optimizer at all.
    return torch_ndim >= 2 and keys[-1] != "bias" and not frozen
  expected = jax.tree.map_with_path(maes_rule, params)
  assert jax.tree.leaves(mask) == jax.tree.leaves(expected)
  flat = {"/".join(getattr(k, "key", "") for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(v for k, v in flat.items() if k.endswith("qkv/kernel")) and not any(
      v for k, v in flat.items() if k.endswith(("norm1/scale", "qkv/bias")))


def test_the_learning_rate_follows_maes_rule_unless_set():
  """MAE's main_pretrain.py: lr = blr x effective batch / 256, so a smaller batch trains at a smaller rate; a
  learning rate given in the config is used as it is."""
  c = mae_config("retfound")
  assert mae_trainer.peak_learning_rate(c)[0] == pytest.approx(1.5e-4 * 4096 / 256)  # 2.4e-3, MAE's ViT-L run.
  c.train.batch_size = 64
  rate, how = mae_trainer.peak_learning_rate(c)
  assert rate == pytest.approx(1.5e-4 * 64 / 256) and "blr" in how and "x batch 64 / 256" in how
  c.train.learning_rate = 1e-3
  assert mae_trainer.peak_learning_rate(c)[0] == 1e-3
  c.train.learning_rate, c.train.blr = 0.0, 0.0
  with pytest.raises(ConfigError, match="both 0"):
    mae_trainer.peak_learning_rate(c)


def test_maes_augmentation_is_the_default_and_the_demo_keeps_its_own():
  """MAE pretrains with RandomResizedCrop (area share uniform in 0.2-1, aspect log-uniform in 3/4-4/3, ten tries
  then a centred crop) and a flip: the crops drawn here stay within those bounds and cover them."""
  from retfiner_jax.config_defaults import demo_mae
  from retfiner_jax.data.images import augment, random_resized_crop_box
  c = mae_config("retfound")
  assert (c.data.crop_scale, c.data.crop_ratio, c.data.flip, c.data.intensity_jitter) == (
      (0.2, 1.0), (3 / 4, 4 / 3), True, 0.0)
  demo = demo_mae(mae_config("retfound"))
  assert (demo.data.crop_scale, demo.data.crop_ratio, demo.data.intensity_jitter) == ((0.8, 1.0), None, 0.1)
  rng = np.random.default_rng(0)
  boxes = np.array([random_resized_crop_box(100, 120, rng, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)])
  top, left, h, w = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 100) and np.all(left + w <= 120)
  area, aspect = h * w / (100 * 120), w / h
  assert area.min() > 0.18 and area.max() <= 1.0 and area.min() < 0.25 and area.max() > 0.9
  assert aspect.min() > 0.7 and aspect.max() < 1.4 and aspect.min() < 0.8 and aspect.max() > 1.25
  # A strip far wider than 4/3 falls back, after ten impossible tries, to the largest centred crop of ratio 4/3.
  assert random_resized_crop_box(10, 200, rng, (0.99, 1.0), (3 / 4, 4 / 3)) == (0, 93, 10, 13)
  crop = augment(np.linspace(0, 1, 100 * 120).reshape(100, 120), np.random.default_rng(1), flip=False,
                 intensity_jitter=0.0, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3))
  assert crop.ndim == 2 and crop.size < 100 * 120 and 0 <= crop.min() <= crop.max() <= 1


@pytest.mark.parametrize("scan", [True, False])
def test_initialisation_is_maes(scan):
  """MAE's initialize_weights: Linear weights xavier-uniform (bound sqrt(6 / (fan_in + fan_out)) over PyTorch's
  fans; a scanned stack's layer axis is not a fan), the patch embedding xavier over its flattened p x p x 3
  inputs, the class and mask tokens normal(0.02), biases 0, LayerNorm 1/0, positions sin-cos."""
  cfg = CFG.replace(scan_layers=scan, vision_dim=96, vision_mlp_dim=384)
  p = mae_trainer.init_params(cfg, SETTINGS, 0)
  enc = p["vision_encoder"]
  qkv = enc["blocks"]["attn"]["qkv"]["kernel"] if scan else enc["blocks_0"]["attn"]["qkv"]["kernel"]
  bound = np.sqrt(6 / (96 + 3 * 96))
  assert np.abs(qkv).max() <= bound and np.std(qkv) == pytest.approx(bound / np.sqrt(3), rel=0.05)
  patch = enc["patch_embed"]["kernel"]
  bound = np.sqrt(6 / (8 * 8 * 3 + 96))
  assert np.abs(patch).max() <= bound and np.std(patch) == pytest.approx(bound / np.sqrt(3), rel=0.05)
  assert np.std(enc["cls_token"]) == pytest.approx(0.02, rel=0.35)  # 96 values.
  assert np.std(p["decoder"]["mask_token"]) == pytest.approx(0.02, rel=0.6)  # 16 values.
  fc1_bias = enc["blocks"]["mlp"]["fc1"]["bias"] if scan else enc["blocks_0"]["mlp"]["fc1"]["bias"]
  assert not np.any(fc1_bias)
  np.testing.assert_array_equal(enc["pos_embed"], sincos_pos_embed(96, 4))
  if scan:  # The layers of a stack are drawn apart.
    assert not np.allclose(enc["blocks"]["attn"]["qkv"]["kernel"][0], enc["blocks"]["attn"]["qkv"]["kernel"][1])


def test_gradient_accumulation_updates_every_k_steps_with_the_mean_gradient():
  """MAE's accum_iter: with k = 2 the first step leaves the parameters as they are and the second applies one
  AdamW update of the two steps' mean gradient, at a learning rate counted in updates; the rule's effective
  batch is batch x k."""
  c = mae_config("tiny-retfound")
  c.train.update(batch_size=4, accum_iter=2, warmup_epochs=0, learning_rate=1e-3)
  model = MaskedAutoencoder(CFG, SETTINGS)
  params = mae_trainer.init_params(CFG, SETTINGS, 0)
  images = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 32, 32, 3))
  tx, lr = mae_trainer.make_optimizer(c, total_steps=20, steps_per_epoch=10)
  step = jax.jit(mae_trainer.make_train_step(model, SETTINGS, tx, lr, CFG.patch_size))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  one, m1 = step(state, images[0], 0)
  jax.tree.map(np.testing.assert_array_equal, one["params"], params)  # Accumulating: no update yet.
  two, m2 = step(one, images[1], 0)
  # By hand: plain AdamW (no accumulation) on the mean of the two steps' gradients, at the schedule's first rate.
  c1 = mae_config("tiny-retfound")
  c1.train.update(batch_size=4, accum_iter=1, warmup_epochs=0, learning_rate=1e-3)
  plain, _ = mae_trainer.make_optimizer(c1, total_steps=10, steps_per_epoch=10)

  def grads(p, x, at):
    return jax.grad(lambda q: mae_trainer.make_train_step(model, SETTINGS, optax.set_to_zero(), lr, CFG.patch_size)(
        {"params": q, "opt_state": (), "step": jnp.int32(at)}, x, 0)[1]["loss"])(p)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads(params, images[0], 0), grads(params, images[1], 1))
  updates, _ = plain.update(mean, plain.init(params), params)
  expected = optax.apply_updates(params, updates)

  def close(got, want, g):
    # Adam's first update is about lr x sign(g): where |g| is near Adam's eps (1e-8) the summation order alone
    # flips it, so those entries are left out.
    clear = np.abs(np.asarray(g)) > 1e-6
    np.testing.assert_allclose(np.asarray(got)[clear], np.asarray(want)[clear], rtol=1e-4, atol=1e-6)
  jax.tree.map(close, two["params"], expected, mean)
  qkv = lambda p: np.asarray(p["vision_encoder"]["blocks"]["attn"]["qkv"]["kernel"])
  assert np.mean(qkv(two["params"]) != qkv(params)) > 0.99  # The second step did update.
  assert float(m1["lr"]) == float(m2["lr"]) == pytest.approx(1e-3)  # Both steps belong to update 0.
  c.train.learning_rate = 0.0
  assert mae_trainer.peak_learning_rate(c)[0] == pytest.approx(1.5e-4 * 4 * 2 / 256)


def test_the_seed_is_an_input_of_the_step_with_the_bits_of_a_constant_seed():
  """config.seed enters the MAE step as an int32 input (runs/step_seed.py): one program for every seed, and for
  each seed the same masks and losses as the seed written into the program as a constant (the step before)."""
  c = mae_config("tiny-retfound")
  c.train.update(batch_size=4, warmup_epochs=0, learning_rate=1e-3)
  model = MaskedAutoencoder(CFG, SETTINGS)
  params = mae_trainer.init_params(CFG, SETTINGS, 0)
  images = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
  tx, lr = mae_trainer.make_optimizer(c, total_steps=10, steps_per_epoch=10)
  train_step = mae_trainer.make_train_step(model, SETTINGS, tx, lr, CFG.patch_size)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(3)}
  with_input = jax.jit(train_step)
  losses = {}
  for seed in (0, 7):
    constant = jax.jit(lambda st, im: train_step(st, im, seed))  # The seed a Python int: a constant, as before.
    got, want = with_input(state, images, jnp.int32(seed))[1], constant(state, images)[1]
    assert float(got["loss"]) == float(want["loss"]) and float(got["grad_norm"]) == float(want["grad_norm"])
    losses[seed] = float(got["loss"])
  assert losses[0] != losses[7]  # The seed does choose the masks.
  assert with_input._cache_size() == 1  # Both seeds ran one compiled program.
  with pytest.raises(ConfigError, match="config.seed"):
    step_seed.replicated_seed(sharding.make_mesh(), 2 ** 31)
