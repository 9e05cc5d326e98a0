"""The original's training details around the objectives: stochastic depth, PyTorch's init of the new layers,
gradient accumulation weighted by target tokens, and validation over every row."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import random_batch

from retfiner_jax.models.config import get_variant
from retfiner_jax.models.retfiner import RetFiner, init_params
from retfiner_jax.models.vit import drop_path
from retfiner_jax.refine.objectives import (ObjectiveSettings, compute_objectives, make_loss_fn, sample_views,
                                           token_prediction_losses)
from retfiner_jax.refine.sampling import sample_hard_negatives
from retfiner_jax.refine.step import accumulated_gradients, make_train_step
from retfiner_jax.refine.validation import evaluate, make_embed_fn

CFG = get_variant("tiny-retfound").replace(dtype="float32", text_dropout=0.0)


def _batch(n=8, seed=0, cfg=CFG):
  return random_batch(cfg, n, seed)


def timm_drop_path(x, drop_prob, generator):
  """timm.layers.drop_path (training, scale_by_keep), re-typed."""
  keep_prob = 1 - drop_prob
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  random_tensor = x.new_empty(shape).bernoulli_(keep_prob, generator=generator)
  random_tensor.div_(keep_prob)
  return x * random_tensor


def test_drop_path_matches_timms_in_expectation():
  x = np.random.default_rng(0).normal(size=(20000, 3, 4)).astype(np.float32)
  ours = np.asarray(drop_path(jnp.asarray(x), jnp.float32(0.3), jax.random.PRNGKey(0)))
  theirs = timm_drop_path(torch.tensor(x), 0.3, torch.Generator().manual_seed(0)).numpy()
  for out in (ours, theirs):
    dropped = np.all(out == 0, axis=(1, 2))
    assert abs(dropped.mean() - 0.3) < 0.015
    np.testing.assert_allclose(out[~dropped], x[~dropped] / 0.7, rtol=1e-6)
  np.testing.assert_allclose(ours.mean(0), theirs.mean(0), atol=0.03)  # Both unbiased: E = x.
  np.testing.assert_allclose(ours.mean(0), x.mean(0), atol=0.03)


def test_refinement_step_with_drop_path_is_deterministic_for_a_key():
  import optax
  cfg = CFG.replace(drop_path=0.5)
  params = init_params(cfg, jax.random.PRNGKey(0))
  batch = _batch()
  tx = optax.sgd(0.1)

  def make(model_cfg):
    step = jax.jit(make_train_step(RetFiner(model_cfg), ObjectiveSettings(), tx, 1))
    # The step's key is fold_in(seed, step): another step number, another key.
    return lambda at: float(step({"params": params, "opt": tx.init(params), "step": jnp.int32(at)}, batch,
                                 jnp.int32(0))[1]["loss"])
  dropping, plain = make(cfg), make(cfg.replace(drop_path=0.0))
  assert dropping(0) == dropping(0)
  assert dropping(0) != dropping(1)  # Another key, other blocks dropped.
  assert dropping(0) != plain(0) and plain(0) != plain(1)  # (plain differs by its masks only)
  # Off in evaluation (train=False, the default): drop_path changes nothing.
  m = RetFiner(cfg)
  a = m.apply({"params": params}, batch["images"], method=RetFiner.image_tokens)
  b = RetFiner(cfg.replace(drop_path=0.0)).apply({"params": params}, batch["images"], method=RetFiner.image_tokens)
  np.testing.assert_array_equal(a, b)


def test_new_layers_are_initialised_as_pytorch_linear():
  params = init_params(get_variant("retfound").replace(vision_depth=1, text_layers=1), jax.random.PRNGKey(0))
  for path, fan_in, out in ((("vision_encoder", "proj"), 1024, 768), (("contra_head_v",), 768, 512),
                            (("contra_head_t",), 768, 512), (("itm_head", "linear1"), 768, 768),
                            (("itm_head", "linear2"), 768, 2)):
    layer = params
    for key in path:
      layer = layer[key]
    torch.manual_seed(0)
    reference = torch.nn.Linear(fan_in, out, bias="bias" in layer)
    bound = 1 / math.sqrt(fan_in)
    for ours, theirs in ((layer["kernel"], reference.weight), (layer.get("bias"), reference.bias)):
      if ours is None:
        continue
      ours, theirs = np.abs(np.asarray(ours)), np.abs(theirs.detach().numpy())
      assert ours.max() <= bound and theirs.max() <= bound, path
      assert ours.max() > 0.97 * bound or ours.size < 100, path  # Uniform up to the bound, as torch's.
      assert abs(ours.mean() - theirs.mean()) < 0.05 * bound + 0.3 * bound / math.sqrt(ours.size), path


def test_accumulated_mlm_gm_gradients_equal_the_full_batch():
  settings = ObjectiveSettings(itc_weight=0.0, itm_weight=0.0)
  model = RetFiner(CFG)
  params = init_params(CFG, jax.random.PRNGKey(1))
  batch = _batch(8, seed=3)
  rng = jax.random.PRNGKey(5)
  views = sample_views(jax.random.PRNGKey(7), batch["input_ids"], CFG.vocab_size, settings)
  counts = [int((np.asarray(views["mlm_labels"])[i::4] != -100).sum()) for i in range(4)]
  assert len(set(counts)) > 1  # Micro-batches with different target counts: plain averaging would differ.
  loss_fn = make_loss_fn(model, settings)
  (_, full_metrics), full = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, views)
  grads, metrics = jax.jit(lambda p: accumulated_gradients(loss_fn, p, batch, rng, 4, views))(params)
  for key in ("loss_mlm", "loss_gm"):
    np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def _hand_token_losses(hidden, labels, weights):
  """Mean cross-entropy and accuracy over a part's targets, in numpy (float64) with a linear logits map."""
  hidden, labels = np.asarray(hidden, np.float64), np.asarray(labels)
  at = labels != -100
  logits = hidden[at] @ weights
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = labels[at]
  return -logp[np.arange(len(target)), target].mean(), (logits.argmax(-1) == target).mean()


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_token_losses_are_the_same_for_any_number_of_row_groups(groups):
  """MLM/GM logits per block of rows (one per device on a mesh) give the hand-computed losses, whichever path
  each room size takes: every group within its room, some groups over it (all positions), or no room needed."""
  rng = np.random.default_rng(0)
  batch, length, dim, vocab = 8, 12, 6, 11
  weights = rng.normal(size=(dim, vocab))
  hidden = [rng.normal(size=(batch, length, dim)).astype(np.float32) for _ in range(2)]
  labels = []
  for p in (0.15, 0.6):
    lab = rng.integers(0, vocab, (batch, length))
    lab[rng.random((batch, length)) >= p] = -100
    lab[0, :8] = rng.integers(0, vocab, 8)  # Row 0 mostly targets: its group needs more room than the others.
    labels.append(lab)
  want = [_hand_token_losses(h, lab, weights) for h, lab in zip(hidden, labels)]
  logits_fn = lambda h: h @ jnp.asarray(weights, jnp.float32)
  # Each group's targets (both parts), and the room a fraction f (for both parts) gives each group.
  counts = sum((lab != -100).reshape(groups, -1).sum(1) for lab in labels)
  room = lambda f: 2 * int(round(f * batch * length / groups))
  grid = np.arange(0.01, 1.0, 0.01)
  within = next(f for f in grid if room(f) >= counts.max())  # The gathered path in every group.
  over = next(f for f in grid if room(f) >= counts.min()) if groups > 1 else 0.05  # Group 0 over its room.
  assert room(within) < 2 * batch * length / groups and room(over) < counts.max(), (within, over, counts)
  for f in (within, over, 1.0):
    got = jax.jit(lambda h0, h1: token_prediction_losses(
        logits_fn, [(h0, labels[0], f), (h1, labels[1], f)], groups))(*hidden)
    for (loss, accuracy), (want_loss, want_accuracy) in zip(got, want):
      np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(f))
      np.testing.assert_allclose(accuracy, want_accuracy, rtol=1e-6, err_msg=str(f))
  with pytest.raises(ValueError, match="does not split into 3 groups"):
    token_prediction_losses(logits_fn, [(hidden[0], labels[0], 0.3)], 3)


def test_padding_rows_are_masked_out_of_every_loss():
  model = RetFiner(CFG)
  params = init_params(CFG, jax.random.PRNGKey(2))
  real = _batch(6, seed=4)
  padded = {k: jnp.concatenate([v, jnp.zeros((2,) + v.shape[1:], v.dtype)]) for k, v in real.items()}
  padded["valid"] = jnp.arange(8) < 6
  views = sample_views(jax.random.PRNGKey(3), real["input_ids"], CFG.vocab_size, ObjectiveSettings())
  padded_views = {k: jnp.concatenate([v, jnp.full((2, v.shape[1]), 7, v.dtype)]) for k, v in views.items()}
  negatives = (jnp.array([1, 2, 3, 4, 5, 0]), jnp.array([5, 0, 1, 2, 3, 4]))
  padded_negatives = tuple(jnp.concatenate([n, jnp.array([0, 1])]) for n in negatives)
  _, want = compute_objectives(model, params, real, views, negatives=negatives)
  _, got = compute_objectives(model, params, padded, padded_views, negatives=padded_negatives)
  for key in ("loss_itc", "loss_itm", "loss_mlm", "loss_gm", "loss", "itc_i2t_accuracy", "itm_accuracy"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  sim = jax.random.normal(jax.random.PRNGKey(0), (8, 8))
  for k in range(20):  # Padding rows are never anybody's negative.
    neg_image, neg_text, _ = sample_hard_negatives(jax.random.PRNGKey(k), sim, sim.T, None, padded["valid"])
    assert int(neg_image[:6].max()) < 6 and int(neg_text[:6].max()) < 6


def test_validation_uses_every_row_and_redraws_when_asked():
  model = RetFiner(CFG)
  params = init_params(CFG, jax.random.PRNGKey(2))
  full, last = _batch(8, seed=5), _batch(5, seed=6)
  pad = lambda b, n: dict({k: np.concatenate([np.asarray(v), np.zeros((n,) + v.shape[1:], v.dtype)])
                           for k, v in b.items()}, valid=np.arange(len(b["pair_ids"]) + n) < len(b["pair_ids"]))
  batches = [pad(full, 0), pad(last, 3)]
  settings = ObjectiveSettings()
  to_global = lambda b: jax.tree.map(jnp.asarray, b)
  loss_fn, embed_fn = jax.jit(make_loss_fn(model, settings)), make_embed_fn(model)
  run = lambda **kw: evaluate(model, params, batches, settings, 0, to_global, (1,), loss_fn, embed_fn, **kw)
  fixed = run()
  assert fixed["examples"] == 13
  assert fixed["loss"] == run()["loss"]
  redrawn = [run(epoch=e)["loss_mlm"] for e in (1, 2)]
  assert redrawn[0] != redrawn[1]
  # The short batch counts with its 5 real rows: the weighted mean of the two batches' own losses.
  key = jax.random.PRNGKey(0)
  per_batch = [float(loss_fn(params, to_global(b), jax.random.fold_in(key, i))[1]["loss_itc"])
               for i, b in enumerate(batches)]
  assert fixed["loss_itc"] == pytest.approx((8 * per_batch[0] + 5 * per_batch[1]) / 13, rel=1e-6)


@pytest.mark.parametrize("remat", ["elementwise", "dots", "full"])
def test_every_remat_setting_gives_the_same_losses_and_gradients(remat):
  """config.model.remat recomputes, it does not change the numbers: training mode (dropout, stochastic depth) with
  the same keys gives the losses and gradients of remat 'none'. 'elementwise' (the accelerators' 'auto') must put
  each layer under a checkpoint, so its program differs from 'none' although its values do not."""
  base = CFG.replace(drop_path=0.2, text_dropout=0.1)
  params = init_params(base, jax.random.PRNGKey(1))
  batch, rng = _batch(8, seed=3, cfg=base), jax.random.PRNGKey(5)

  def run(cfg):
    loss_fn = make_loss_fn(RetFiner(cfg), ObjectiveSettings(), train=True)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, metrics), grads = grad_fn(params, batch, rng)
    forward = str(jax.make_jaxpr(loss_fn)(params, batch, rng))
    return metrics, grads, len(re.findall(r"= (?:remat2|checkpoint)\[", forward))

  want_metrics, want_grads, plain = run(base.replace(remat="none"))
  metrics, grads, checkpoints = run(base.replace(remat=remat))
  assert plain == 0 and checkpoints > 0
  for key in ("loss_itc", "loss_itm", "loss_mlm", "loss_gm"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def _matmuls(jaxpr) -> int:
  """dot_general equations in a jaxpr and every jaxpr nested in it (scan bodies, checkpoints, custom rules)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
          count += _matmuls(inner.jaxpr)
        elif isinstance(inner, jax.extend.core.Jaxpr):
          count += _matmuls(inner)
  return count


@pytest.mark.parametrize("scan_layers", [True, False])
def test_elementwise_remat_recomputes_no_matmul(monkeypatch, scan_layers):
  """remat 'elementwise' recomputes the ViT's blocks and BERT's layers whole from the values they name
  (vit.BLOCK_KEEPS, bert.LAYER_KEEPS): the gradient's program holds exactly the matmuls of remat 'none', in
  training mode. The check can fail: a block that did not keep its attention probabilities would recompute q k^T."""
  from retfiner_jax.models import vit
  cfg = CFG.replace(drop_path=0.2, text_dropout=0.1, scan_layers=scan_layers)
  params = init_params(cfg, jax.random.PRNGKey(1))
  batch, rng = _batch(8, seed=3, cfg=cfg), jax.random.PRNGKey(5)

  def matmuls(remat):
    loss_fn = make_loss_fn(RetFiner(cfg.replace(remat=remat)), ObjectiveSettings(), train=True)
    return _matmuls(jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, batch, rng)[0]))(params).jaxpr)

  plain = matmuls("none")
  assert plain > 0 and matmuls("elementwise") == plain
  monkeypatch.setattr(vit, "BLOCK_KEEPS", tuple(n for n in vit.BLOCK_KEEPS if n != "attention_probs"))
  assert matmuls("elementwise") > plain


def test_auto_remat_and_attention_resolve_to_the_cpu_path_the_references_match():
  from retfiner_jax.models.common import resolve_remat
  assert jax.default_backend() == "cpu" and resolve_remat("auto", jax.default_backend()) != "elementwise"
  assert [resolve_remat("auto", p) for p in ("cpu", "gpu", "tpu")] == ["none", "elementwise", "elementwise"]
  assert resolve_remat("elementwise", jax.default_backend()) == "elementwise"
  with pytest.raises(ValueError, match="remat must be one of"):
    resolve_remat("some", "cpu")
