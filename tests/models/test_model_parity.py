"""Our ViT and BERT against PyTorch: a reference ViT written in the tests, and transformers' BERT."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import minilm_folder
from retfiner_jax.data.images import NORMALISATION
from retfiner_jax.models.attention import causal_padding_bias, padding_bias
from retfiner_jax.models.bert import BertTextEncoder
from retfiner_jax.models.config import get_variant
from retfiner_jax.models.vit import VisionTransformer
from retfiner_jax.weights import convert
from retfiner_jax.weights import files as weight_files
from torch_reference import TorchViT


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("variant,proj", [("tiny-retfound", 48), ("tiny-visionfm", None), ("tiny-urfound", None)])
def test_vit_matches_pytorch(tmp_path, variant, proj, scan):
  cfg = get_variant(variant).replace(scan_layers=scan, dtype="float32")
  torch.manual_seed(1)
  net = TorchViT(dim=cfg.vision_dim, mlp=cfg.vision_mlp_dim, proj_dim=proj).eval()
  torch.save(net.state_dict(), tmp_path / "backbone.pth")
  cfg, params, meta = weight_files.convert_checkpoint(tmp_path / "backbone.pth", model_config=cfg, log=lambda *a: None)
  assert ("blocks" in params["vision_encoder"]) == scan and ("blocks_1" in params["vision_encoder"]) != scan
  assert meta["source_format"] == "backbone" and meta["report"]["initialised"] == []
  images = torch.randn(3, 3, 32, 32)
  with torch.no_grad():
    want = net(images, final_norm=cfg.apply_final_norm).numpy()
    want_features = net(images, final_norm=False).numpy()
  vit = VisionTransformer(cfg)
  nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
  got = vit.apply({"params": params["vision_encoder"]}, nhwc)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  feats = vit.apply({"params": params["vision_encoder"]}, nhwc, method=VisionTransformer.features)
  assert not cfg.vision_projection or not np.allclose(feats[..., :proj], want[..., :proj])
  if not cfg.vision_projection:
    np.testing.assert_allclose(feats, want_features, rtol=1e-4, atol=1e-5)
  # One channel in [0, 1], as the training pipeline ships it: the ViT repeats and normalises it itself.
  gray = torch.rand(3, 32, 32)
  mean, std = (torch.tensor(v)[:, None, None] for v in NORMALISATION[cfg.backbone])
  with torch.no_grad():
    want = net((gray[:, None].repeat(1, 3, 1, 1) - mean) / std, final_norm=cfg.apply_final_norm).numpy()
  np.testing.assert_allclose(vit.apply({"params": params["vision_encoder"]}, jnp.asarray(gray.numpy())), want,
                             rtol=1e-4, atol=1e-5)


def test_pos_embed_resampling_matches_torch_bicubic():
  pos = torch.randn(1, 1 + 14 * 14, 8)
  grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
  for new in (16, 10):  # Up and down.
    want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).flatten(1, 2)], dim=1).numpy()
    got = convert.resample_pos_embed(pos.numpy(), new)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _tiny_bert(tmp_path, **kw):
  from transformers import BertConfig, BertLMHeadModel
  hf_cfg = BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
  torch.manual_seed(0)
  model = BertLMHeadModel(hf_cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(tmp_path / "bert")
  return model


def _batch():
  torch.manual_seed(2)
  ids = torch.randint(5, 200, (3, 9))
  ids[:, 0] = 101 % 200
  mask = torch.ones(3, 9, dtype=torch.long)
  mask[1, 6:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  images = torch.randn(3, 5, 48)
  return ids, mask, images


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_bert_matches_transformers_in_every_mode(tmp_path, scan):
  hf = _tiny_bert(tmp_path)
  cfg, params, meta = weight_files.convert_checkpoint(tmp_path / "bert", model_config=get_variant("bert-base").replace(
      scan_layers=scan, dtype="float32"), log=lambda *a: None)
  assert ("layer" in params["text_encoder"]) == scan and ("layer_1" in params["text_encoder"]) != scan
  assert meta["report"]["initialised"] == []
  bert = BertTextEncoder(cfg)
  p = {"params": params["text_encoder"]}
  ids, mask, image = _batch()
  jids, jmask, jimage = (jnp.asarray(x.numpy()) for x in (ids, mask, image))

  def ours(bias, cross):
    hidden = bert.apply(p, jids, bias, jimage if cross else None)
    return np.asarray(bert.apply(p, hidden, method=BertTextEncoder.mlm_logits))

  bidirectional = (1.0 - mask[:, None, None, :].float().expand(3, 1, 9, 9)) * torch.finfo(torch.float32).min
  with torch.no_grad():
    want_bi = hf(input_ids=ids, attention_mask=bidirectional, encoder_hidden_states=image).logits.numpy()
    want_causal = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).logits.numpy()
    want_text = hf(input_ids=ids, attention_mask=bidirectional).logits.numpy()
  valid = mask.numpy().astype(bool)  # Padding rows are not compared: HF zeroes fully masked rows differently.
  np.testing.assert_allclose(ours(padding_bias(jmask), True)[valid], want_bi[valid], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours(causal_padding_bias(jmask), True)[valid], want_causal[valid], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours(padding_bias(jmask), False)[valid], want_text[valid], rtol=1e-4, atol=1e-4)
  assert not np.allclose(want_bi[valid], want_causal[valid])  # The modes do differ.


def test_text_only_parity_on_real_minilm():
  from transformers import BertModel
  folder = minilm_folder()
  cfg, params, meta = weight_files.convert_checkpoint(folder, log=lambda *a: None)
  assert cfg.text_dim == 384 and cfg.text_layers == 6
  hf = BertModel.from_pretrained(str(folder)).eval()
  from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
  tok = tokenize(load_tokenizer(folder), ["subretinal fluid and intraretinal cysts", "normal foveal contour"], 30)
  ids, mask = torch.tensor(tok["input_ids"]).long(), torch.tensor(tok["attention_mask"]).long()
  with torch.no_grad():
    want = hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  bert = BertTextEncoder(cfg.replace(dtype="float32"))  # The converted config has the run's bfloat16.
  got = bert.apply({"params": params["text_encoder"]}, jnp.asarray(tok["input_ids"]),
                   padding_bias(jnp.asarray(tok["attention_mask"])))
  valid = tok["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_bert_dropout_draws_flax_dropouts_masks(monkeypatch, impl, scan):
  """Our Dropout draws its keep mask flat (a smaller program) but must give flax.linen.Dropout's values: the same
  outputs of a training-mode BERT pass (embeddings, self- and cross-attention probabilities, hidden states) with
  the same 'dropout' key, for the CPU's key implementation and the accelerators'."""
  import jax
  import flax.linen as nn
  from retfiner_jax.models import bert as bert_module
  cfg = get_variant("tiny-retfound").replace(scan_layers=scan, dtype="float32", text_dropout=0.3)
  ids, mask, image = (jnp.asarray(x.numpy()) for x in _batch())
  image = jnp.tile(image, (1, 1, cfg.vision_dim // image.shape[-1] + 1))[..., :cfg.vision_dim]
  bias = padding_bias(mask)
  ids = ids % cfg.vocab_size

  def run(model, params=None):
    params = params or model.init(jax.random.PRNGKey(0), ids, bias, image)
    out = model.apply(params, ids, bias, image, train=True, rngs={"dropout": jax.random.key(7, impl=impl)})
    return params, np.asarray(out), np.asarray(model.apply(params, ids, bias, image))

  params, ours, deterministic = run(BertTextEncoder(cfg))
  monkeypatch.setattr(bert_module, "Dropout", nn.Dropout)
  _, flax_dropout, _ = run(bert_module.BertTextEncoder(cfg), params)
  np.testing.assert_array_equal(ours, flax_dropout)
  assert not np.allclose(ours, deterministic, atol=1e-3)  # Dropout was on.
