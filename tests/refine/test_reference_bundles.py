"""Parity with the original PyTorch RetFiner: the reference bundles in ../shared/reference."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BUNDLES, shared_path
from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
from retfiner_jax.models.attention import causal_padding_bias, padding_bias
from retfiner_jax.refine import reference
from retfiner_jax.refine.objectives import OBJECTIVES, ObjectiveSettings, compute_objectives
from retfiner_jax.weights import exports


@pytest.fixture(scope="module", params=[(b, scan) for b in BUNDLES for scan in (True, False)],
                ids=lambda p: f"{p[0]}-{'scanned' if p[1] else 'unrolled'}")
def bundle(request):
  """Parity with the original in both layer layouts."""
  name, scan = request.param
  folder = shared_path("reference", name)
  return (folder,) + reference.load_bundle(folder, scan_layers=scan)


@pytest.fixture(scope="module", params=BUNDLES)
def default_bundle(request):
  """The default (scanned) layout, for checks whose subject does not depend on the layout (parity in both
  layouts is checked above; these compare computations of one model with each other)."""
  folder = shared_path("reference", request.param)
  return (folder,) + reference.load_bundle(folder, scan_layers=True)


def test_losses_and_gradients_match_the_original(bundle):
  folder, model, params, batch, views, negatives, expected = bundle
  loss, metrics, grads = reference.bundle_losses_and_grads(model, params, batch, views, negatives)
  for name in OBJECTIVES:
    want = expected["losses"][name]
    assert abs(float(metrics[f"loss_{name}"]) - want) / abs(want) < reference.LOSS_TOLERANCE, name
  assert abs(float(loss) - expected["total"]) / expected["total"] < reference.LOSS_TOLERANCE
  errors = reference.compare_gradients(model.cfg, grads, dict(np.load(folder / "grads.npz")))
  worst = max(errors, key=errors.get)
  assert errors[worst] < reference.GRAD_TOLERANCE, (worst, errors[worst])
  assert len(errors) >= 100


def test_intermediates_match_the_original(bundle):
  folder, model, params, batch, views, negatives, _ = bundle
  inter = np.load(folder / "intermediates.npz")
  m = model.bind({"params": params})
  tokens = m.image_tokens(batch["images"])
  np.testing.assert_allclose(tokens, inter["vision_features"], rtol=1e-4, atol=1e-5)
  text = m.text_only(batch["input_ids"], batch["attention_mask"])
  np.testing.assert_allclose(text, inter["text_only_sequence_output"], rtol=1e-4, atol=1e-5)
  hidden = m.text_with_image(views["mlm_input_ids"], padding_bias(batch["attention_mask"]),
                             tokens)
  targets = np.asarray(views["mlm_labels"]) != -100
  np.testing.assert_allclose(m.mlm_logits(hidden[targets]), inter["mlm_logits_at_labels"], rtol=1e-4, atol=1e-4)
  # GM: the same head after a pass whose self-attention is causal and padding-masked.
  causal = causal_padding_bias(batch["attention_mask"])
  hidden = m.text_with_image(views["gm_input_ids"], causal, tokens)
  targets = np.asarray(views["gm_labels"]) != -100
  np.testing.assert_allclose(m.mlm_logits(hidden[targets]), inter["gm_logits_at_labels"], rtol=1e-4, atol=1e-4)
  neg_image, neg_text = negatives
  ids, mask = batch["input_ids"], batch["attention_mask"]
  tokens3 = jnp.concatenate([tokens, tokens[neg_image], tokens])
  ids3 = jnp.concatenate([ids, ids, ids[neg_text]])
  mask3 = jnp.concatenate([mask, mask, mask[neg_text]])
  cls = m.text_with_image(ids3, padding_bias(mask3), tokens3)[:, 0]
  np.testing.assert_allclose(cls, inter["itm_cross_cls"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m.itm_logits(cls), inter["itm_logits"], rtol=1e-4, atol=1e-5)


def _losses(model, params, batch, views, negatives, settings):
  fn = jax.jit(lambda p: jax.value_and_grad(
      lambda q: compute_objectives(model, q, batch, views, settings, negatives=negatives), has_aux=True)(p))
  (loss, metrics), grads = fn(params)
  return metrics, grads


def test_fused_passes_and_target_gathering_equal_the_plain_computation(default_bundle):
  _, model, params, batch, views, negatives, _ = default_bundle
  plain, plain_grads = _losses(model, params, batch, views, negatives, ObjectiveSettings(fused=False))
  # 0.05 forces the all-positions fallback for GM (60 % masked) while MLM takes the gathered path.
  for settings in (ObjectiveSettings(fused=True), ObjectiveSettings(mlm_target_fraction=0.2, gm_target_fraction=0.05)):
    fused, fused_grads = _losses(model, params, batch, views, negatives, settings)
    for key in ("loss_itc", "loss_itm", "loss_mlm", "loss_gm", "loss"):
      np.testing.assert_allclose(fused[key], plain[key], rtol=1e-6, err_msg=key)
    floor = 1e-6 * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=floor)


def test_objective_switches(default_bundle):
  _, model, params, batch, views, negatives, expected = default_bundle
  settings = ObjectiveSettings(itm_weight=0.0, mlm_weight=0.0, gm_weight=0.0)
  metrics, _ = _losses(model, params, batch, views, negatives, settings)
  assert set(k for k in metrics if k.startswith("loss_")) == {"loss_itc"}
  np.testing.assert_allclose(metrics["loss"], expected["losses"]["itc"], rtol=1e-5)
  settings = ObjectiveSettings(itc_weight=0.5, itm_weight=2.0, gm_weight=0.0)
  metrics, _ = _losses(model, params, batch, views, negatives, settings)
  want = 0.5 * expected["losses"]["itc"] + 2 * expected["losses"]["itm"] + expected["losses"]["mlm"]
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


def test_mixed_precision_is_close_to_float32(default_bundle):
  folder, *_ , expected = default_bundle
  model, params, batch, views, negatives, _ = reference.load_bundle(folder, dtype="bfloat16")
  _, metrics, grads = reference.bundle_losses_and_grads(model, params, batch, views, negatives)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32  # Parameters stay float32.
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  for name in OBJECTIVES:
    want = expected["losses"][name]
    assert abs(float(metrics[f"loss_{name}"]) - want) / abs(want) < 2e-2, name
  # Gradients: bfloat16 keeps 8 bits of mantissa, so each tensor's gradient is compared as a whole (its relative
  # L2 error against the original's float32 gradient), not element by element. Seen on both bundles: median
  # 0.03, worst 0.20 (a block-0 LayerNorm scale); the bounds (0.06 median, 0.35 worst, 0.06 over all tensors)
  # were set from those with room for other BLAS builds. A lost cast or a wrong dtype path gives errors near 1.
  want = dict(np.load(folder / "grads.npz"))
  ours = exports.lightning_state_dict(model.cfg, jax.tree.map(np.asarray, grads))
  scale = max(float(np.linalg.norm(g)) for g in want.values())
  errors = {k: float(np.linalg.norm(ours[k] - g) / np.linalg.norm(g)) for k, g in want.items()
            if np.linalg.norm(g) > 1e-3 * scale}  # Tensors whose gradient is not vanishingly small.
  worst = max(errors, key=errors.get)
  everything = (np.sqrt(sum(np.sum((ours[k] - want[k]) ** 2) for k in errors))
                / np.sqrt(sum(np.sum(want[k] ** 2) for k in errors)))
  assert len(errors) >= 50 and np.median(list(errors.values())) < 0.06 and everything < 0.06
  assert errors[worst] < 0.35, (worst, errors[worst])


def test_tokenisation_matches_the_bundle(default_bundle):
  folder, *_ = default_bundle
  expected = json.loads((folder / "expected.json").read_text())
  tokenizer = load_tokenizer(shared_path("reference", "vocab.txt"))
  out = tokenize(tokenizer, expected["texts"], expected["config"]["max_text_length"])
  npz = np.load(folder / "batch.npz")
  np.testing.assert_array_equal(out["input_ids"], npz["input_ids"])
  np.testing.assert_array_equal(out["attention_mask"], npz["attention_mask"])


def test_check_passes_and_fails_when_it_should(tmp_path, capsys):
  folder = shared_path("reference", "tiny-retfound")
  assert reference.check_bundle(folder, log=lambda *a: None)
  broken = tmp_path / "broken"
  shutil.copytree(folder, broken)
  expected = json.loads((broken / "expected.json").read_text())
  expected["losses"]["itm"] *= 1.001
  (broken / "expected.json").write_text(json.dumps(expected))
  lines = []
  assert not reference.check_bundle(broken, log=lines.append)
  assert any("itm" in line and "FAIL" in line for line in lines)
