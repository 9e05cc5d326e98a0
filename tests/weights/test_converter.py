"""The weight converter: every checkpoint format, strict errors, and exports back to PyTorch."""
import shutil

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from conftest import minilm_folder
from retfiner_jax.errors import ConfigError
from retfiner_jax.models.config import get_variant
from retfiner_jax.weights import convert
from retfiner_jax.weights import exports
from retfiner_jax.weights import files as weight_files
from torch_reference import TorchViT

quiet = dict(log=lambda *a: None)
CFG = get_variant("tiny-retfound").replace(dtype="float32")


def _vit_state(proj=False, seed=0):
  torch.manual_seed(seed)
  sd = TorchViT(dim=CFG.vision_dim, mlp=CFG.vision_mlp_dim, proj_dim=CFG.text_dim if proj else None).state_dict()
  return {k: v.clone() for k, v in sd.items()}


def _mae_extras():
  return {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
          "decoder_pos_embed": torch.zeros(1, 5, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
          "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(768, 32)}


def _lightning_state(seed=0):
  """A full RetFiner Lightning state_dict of the tiny-retfound sizes, built from independent PyTorch modules."""
  from transformers import BertConfig, BertLMHeadModel
  sd = {f"model.vision_encoder.{k}": v for k, v in _vit_state(proj=True, seed=seed).items()}
  torch.manual_seed(seed)
  bert = BertLMHeadModel(BertConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.text_dim, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=CFG.text_intermediate,
                                    is_decoder=True, add_cross_attention=True))
  bert_sd = bert.state_dict()
  bert_sd["cls.predictions.decoder.weight"] = bert_sd["bert.embeddings.word_embeddings.weight"]
  bert_sd["cls.predictions.decoder.bias"] = bert_sd["cls.predictions.bias"]
  sd.update({f"model.multimodal_encoder.{k}": v.clone() for k, v in bert_sd.items()})
  g = torch.Generator().manual_seed(seed)
  d, c = CFG.text_dim, CFG.contrastive_dim
  for name, shape in [("contra_head_v.linear.weight", (c, d)), ("contra_head_t.linear.weight", (c, d)),
                      ("itm_head.linear1.weight", (d, d)), ("itm_head.linear1.bias", (d,)),
                      ("itm_head.layernorm.weight", (d,)), ("itm_head.layernorm.bias", (d,)),
                      ("itm_head.linear2.weight", (2, d)), ("itm_head.linear2.bias", (2,))]:
    sd[f"model.{name}"] = torch.randn(shape, generator=g)
  return sd


def _save(tmp_path, obj, name="ckpt.pth"):
  torch.save(obj, tmp_path / name)
  return tmp_path / name


def test_fm_formats_are_detected_and_loaded(tmp_path):
  vit = _vit_state()
  cases = {
      "retfound": ({"model": {**vit, **_mae_extras()}}, "tiny-retfound"),
      "urfound": ({"model": {**vit, **_mae_extras(), "bert_encoder.layer.0.w": torch.zeros(2),
                             "bert_mlp.fc.weight": torch.zeros(2)}}, "tiny-retfound"),
      "visionfm": ({"teacher": {**{f"backbone.{k}": v for k, v in vit.items() if not k.startswith("head")},
                                "head.mlp.0.weight": torch.zeros(3, 3)}}, "tiny-retfound"),
  }
  for fmt, (obj, variant) in cases.items():
    cfg, params, meta = weight_files.convert_checkpoint(_save(tmp_path, obj, f"{fmt}.pth"), variant=variant, **quiet)
    assert meta["source_format"] == fmt
    assert set(params) == {"vision_encoder"}
    np.testing.assert_array_equal(params["vision_encoder"]["blocks"]["attn"]["qkv"]["kernel"][1],
                                  vit["blocks.1.attn.qkv.weight"].numpy().T)
    assert meta["report"]["initialised"] == ["proj.weight", "proj.bias"]  # RetFiner's new layer.
    assert any(k.startswith(("decoder_", "head.")) for k in meta["report"]["ignored"])
  student = {"student": {**{f"module.backbone.{k}": v for k, v in vit.items() if not k.startswith("head")},
                         "module.head.last_layer.weight": torch.zeros(3, 3)}}
  _, params, meta = weight_files.convert_checkpoint(_save(tmp_path, student, "student.pth"), variant="tiny-retfound",
                                               **quiet)
  assert meta["source_format"] == "visionfm"
  np.testing.assert_array_equal(params["vision_encoder"]["cls_token"], vit["cls_token"].numpy())


def test_extracted_backbone_and_pos_embed_resampling(tmp_path):
  vit = _vit_state(proj=True)
  _, params, meta = weight_files.convert_checkpoint(_save(tmp_path, vit), variant="tiny-retfound", **quiet)
  assert meta["source_format"] == "backbone" and meta["report"]["initialised"] == []
  cfg48 = CFG.replace(image_size=48)  # A 3x3 grid instead of the checkpoint's 2x2.
  _, params, meta = weight_files.convert_checkpoint(tmp_path / "ckpt.pth", model_config=cfg48, **quiet)
  assert params["vision_encoder"]["pos_embed"].shape == (1, 10, CFG.vision_dim)
  assert any("resampled" in n for n in meta["report"]["notes"])


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_lightning_round_trip_is_bit_exact(tmp_path, scan):
  sd = _lightning_state()
  path = _save(tmp_path, {"state_dict": sd, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.0"})
  cfg, params, meta = weight_files.convert_checkpoint(path, model_config=CFG.replace(scan_layers=scan), **quiet)
  layer_keys = {k for k in params["text_encoder"] if k.startswith("layer")}
  assert layer_keys == ({"layer"} if scan else {"layer_0", "layer_1"})
  weight_files.save_converted(tmp_path / "converted", cfg, params, meta)
  cfg2, params2, _ = weight_files.load_converted(tmp_path / "converted")
  assert cfg2 == cfg
  back = exports.lightning_state_dict(cfg2, params2)
  expected = {k: v for k, v in sd.items() if "position_ids" not in k and ".head." not in k}
  assert set(back) == set(expected)
  for k, v in expected.items():
    assert np.array_equal(back[k], v.numpy()), k


def test_layer_layouts_convert_both_ways_and_match_the_model(tmp_path):
  """Scanned <-> unrolled is lossless, each matches its model's own parameter tree, and a folder converted in
  one layout loads into a model configured with the other (the training overlay)."""
  import jax
  path = _save(tmp_path, {"state_dict": _lightning_state()})
  _, scanned, meta = weight_files.convert_checkpoint(path, model_config=CFG, **quiet)
  _, unrolled, _ = weight_files.convert_checkpoint(path, model_config=CFG.replace(scan_layers=False), **quiet)
  assert scanned["vision_encoder"]["blocks"]["norm1"]["scale"].shape == (CFG.vision_depth, CFG.vision_dim)
  for tree, other, scan in ((scanned, unrolled, True), (unrolled, scanned, False)):
    shapes = jax.tree.map(lambda s: s.shape, weight_files.abstract_params(CFG.replace(scan_layers=scan)))
    assert jax.tree.map(np.shape, tree) == shapes
    moved = convert.to_layer_layout(other, scan)
    assert jax.tree.structure(moved) == jax.tree.structure(tree)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(tree)))
  weight_files.save_converted(tmp_path / "scanned", CFG, scanned, meta)
  _, loaded, _ = weight_files.load_converted(tmp_path / "scanned")
  into_unrolled = weight_files.overlay(jax.tree.map(np.zeros_like, unrolled), loaded, "test", CFG.replace(scan_layers=False))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(into_unrolled), jax.tree.leaves(unrolled)))
  with pytest.raises(convert.CheckpointError, match="numbered"):
    convert.to_layer_layout({"vision_encoder": {"blocks_0": {"w": np.zeros(2)}, "blocks_2": {"w": np.zeros(2)}}},
                            scan=True)
  uneven = {"text_encoder": {"layer_0": {"w": np.zeros(2), "crossattention": {"b": np.zeros(2)}},
                             "layer_1": {"w": np.zeros(2)}}}
  with pytest.raises(convert.CheckpointError, match=r"text_encoder: layer_1 does not hold the parameters layer_0 "
                     r"holds \(layers \[1\] differ"):
    convert.to_layer_layout(uneven, scan=True)


def test_vision_export_loads_strictly_into_the_fm(tmp_path):
  vit = _vit_state(proj=True)
  cfg, params, _ = weight_files.convert_checkpoint(_save(tmp_path, vit), variant="tiny-retfound", **quiet)
  exports.save_torch(exports.vision_state_dict(cfg, params), tmp_path / "out.pth")
  net = TorchViT(dim=CFG.vision_dim, mlp=CFG.vision_mlp_dim, proj_dim=CFG.text_dim)
  result = net.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=False)
  assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["head.bias", "head.weight"]
  for k, v in net.state_dict().items():
    if not k.startswith("head."):
      assert torch.equal(v, vit[k]), k


def _vocab(tmp_path, size):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  return tmp_path / "vocab.txt"


def test_hf_bert_folders_and_export(tmp_path):
  from transformers import AutoModel, AutoTokenizer, BertConfig, BertLMHeadModel, BertModel
  small = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
  torch.manual_seed(0)
  BertModel(BertConfig(**small), add_pooling_layer=True).save_pretrained(tmp_path / "plain")  # No `bert.`, no head.
  cfg, params, meta = weight_files.convert_checkpoint(tmp_path / "plain", **quiet)
  assert cfg.text_dim == 32 and cfg.vocab_size == 300
  initialised = meta["report"]["initialised"]
  assert any("crossattention" in k for k in initialised) and "cls.predictions.bias" in initialised
  assert any("pooler" in k for k in meta["report"]["ignored"])
  # pytorch_model.bin flavour.
  (tmp_path / "bin").mkdir()
  lm = BertLMHeadModel(BertConfig(**small, is_decoder=True, add_cross_attention=True)).eval()
  torch.save(lm.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
  cfg, params, meta = weight_files.convert_checkpoint(tmp_path / "bin", **quiet)
  assert meta["report"]["initialised"] == []
  with pytest.raises(ConfigError, match="more than the model's 300"):  # Another model's vocabulary is refused.
    exports.hf_bert(cfg, params, tmp_path / "exported", _vocab(tmp_path, 400))
  paths = exports.hf_bert(cfg, params, tmp_path / "exported", _vocab(tmp_path, 300))
  back, info = BertLMHeadModel.from_pretrained(paths["hf_cross_attention"], output_loading_info=True)
  assert not any(info.values()), info
  for k, v in lm.state_dict().items():
    assert torch.equal(back.state_dict()[k], v), k
  assert back.config.is_decoder and back.config.add_cross_attention
  # The plain folder: a bidirectional BertModel without cross-attention; the source had no pooler to carry.
  plain, info = BertModel.from_pretrained(paths["hf_encoder"], add_pooling_layer=False, output_loading_info=True)
  assert not any(info.values()), info
  assert not plain.config.is_decoder and not plain.config.add_cross_attention
  assert len(AutoTokenizer.from_pretrained(paths["hf_encoder"])) == 300
  assert "add_pooling_layer=False" in (tmp_path / "exported" / "README.md").read_text()
  # transformers' outputs equal ours: the cross-attention model with causal attention over image tokens (the
  # generative pass), the plain one bidirectional over text alone.
  from retfiner_jax.models.attention import causal_padding_bias, padding_bias
  from retfiner_jax.models.bert import BertTextEncoder
  bert, p = BertTextEncoder(cfg.replace(dtype="float32")), {"params": params["text_encoder"]}
  ids = torch.tensor([[2, 9, 17, 33, 3, 0], [2, 40, 41, 3, 0, 0]])
  mask, image = (ids != 0).long(), torch.randn(2, 5, 32)
  with torch.no_grad():
    want_gm = back(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).logits.numpy()
    want_text = plain(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  jids, jmask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
  got_gm = bert.apply(p, bert.apply(p, jids, causal_padding_bias(jmask), jnp.asarray(image.numpy())),
                      method=BertTextEncoder.mlm_logits)
  got_text = bert.apply(p, jids, padding_bias(jmask))
  valid = mask.numpy().astype(bool)
  np.testing.assert_allclose(np.asarray(got_gm)[valid], want_gm[valid], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got_text)[valid], want_text[valid], rtol=1e-4, atol=1e-4)
  assert AutoModel.from_pretrained(paths["hf_encoder"]).__class__.__name__ == "BertModel"


def test_real_bert_exports_as_the_encoder_it_is(tmp_path, capsys):
  """The first-day report: the source MiniLM, converted and exported, loads with AutoModel/AutoTokenizer with no
  missing or unexpected keys (its pooler carried), tokenises as the source does, and gives the source's hidden
  states (a causal export was off by 1.88)."""
  from transformers import AutoModel, AutoTokenizer
  from tools import convert_weights as cli
  folder = minilm_folder()
  assert cli.main(["--input", str(folder), "--output", str(tmp_path / "conv")]) == 0
  # The converted folder keeps the source's vocabulary, so the export needs no --tokenizer.
  assert (tmp_path / "conv" / "vocab.txt").read_bytes() == (folder / "vocab.txt").read_bytes()
  assert cli.main(["--input", str(tmp_path / "conv"), "--export-bert", str(tmp_path / "hf")]) == 0
  shutil.copytree(tmp_path / "conv", tmp_path / "bare")
  (tmp_path / "bare" / "vocab.txt").unlink()
  assert cli.main(["--input", str(tmp_path / "bare"), "--export-bert", str(tmp_path / "hf2")]) == 1
  assert "--tokenizer" in capsys.readouterr().err  # No vocabulary in the folder: say how to give it.
  texts = ["subretinal fluid and intraretinal cysts", "normal foveal contour"]
  source_tok, tok = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(tmp_path / "hf" /
                                                                                             "bert_encoder")
  assert tok(texts)["input_ids"] == source_tok(texts)["input_ids"]
  model, info = AutoModel.from_pretrained(tmp_path / "hf" / "bert_encoder", output_loading_info=True)
  assert not any(info.values()), info
  source = AutoModel.from_pretrained(str(folder)).eval()
  batch = tok(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    got, want = model.eval()(**batch), source(**batch)
  valid = batch["attention_mask"].numpy().astype(bool)
  np.testing.assert_allclose(got.last_hidden_state.numpy()[valid], want.last_hidden_state.numpy()[valid], atol=1e-5)
  np.testing.assert_allclose(got.pooler_output.numpy(), want.pooler_output.numpy(), atol=1e-5)


def test_errors_name_the_problem(tmp_path):
  vit = _vit_state(proj=True)
  path = _save(tmp_path, vit)
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(convert.CheckpointError, match="truncated.pth"):
    weight_files.convert_checkpoint(truncated, variant="tiny-retfound", **quiet)

  wrong = dict(vit, **{"blocks.0.mlp.fc1.weight": torch.zeros(10, CFG.vision_dim)})
  with pytest.raises(convert.CheckpointError, match=r"shape mismatch blocks\.0\.mlp\.fc1\.weight"):
    weight_files.convert_checkpoint(_save(tmp_path, wrong, "wrong.pth"), variant="tiny-retfound", **quiet)

  with pytest.raises(convert.CheckpointError, match="unknown checkpoint format"):
    weight_files.convert_checkpoint(_save(tmp_path, {"weights": {"a": torch.zeros(1)}}, "odd.pth"), **quiet)

  extra = dict(vit, **{"blocks.0.gamma": torch.zeros(3)})
  with pytest.raises(convert.CheckpointError, match=r"unknown key blocks\.0\.gamma"):
    weight_files.convert_checkpoint(_save(tmp_path, extra, "extra.pth"), variant="tiny-retfound", **quiet)
  weight_files.convert_checkpoint(tmp_path / "extra.pth", variant="tiny-retfound", extra_ignore=["*.gamma"], **quiet)

  missing = {k: v for k, v in vit.items() if k != "norm.bias"}
  with pytest.raises(convert.CheckpointError, match=r"missing key norm\.bias"):
    weight_files.convert_checkpoint(_save(tmp_path, missing, "missing.pth"), variant="tiny-retfound", **quiet)

  with pytest.raises(convert.CheckpointError, match="pass --variant"):
    weight_files.convert_checkpoint(_save(tmp_path, {"state_dict": {"model.x": torch.zeros(1)}}, "l.ckpt"), **quiet)


def test_cli(tmp_path, capsys):
  from tools import convert_weights as cli
  path = _save(tmp_path, {"model": {**_vit_state(), **_mae_extras()}})
  assert cli.main(["--input", str(path), "--output", str(tmp_path / "out"), "--variant", "tiny-retfound"]) == 0
  assert (tmp_path / "out" / "model.json").exists()
  out = capsys.readouterr().out
  assert "format retfound" in out and "ignored" in out and "initialised 2" in out
  assert cli.main(["--input", str(tmp_path / "out"), "--export-vision", str(tmp_path / "v.pth")]) == 0
  assert cli.main(["--input", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "x")]) == 1
  assert "no such checkpoint" in capsys.readouterr().err


def test_urfound_lightning_without_final_norm_and_another_mlp_width(tmp_path):
  """A checkpoint of another backbone and sizes: the MLP width comes from the checkpoint, UrFound's unused
  final norm may be absent, timm's unused fc_norm is ignored."""
  sd = {k: v for k, v in _lightning_state().items() if not k.startswith("model.vision_encoder.")}
  torch.manual_seed(3)
  vit = TorchViT(dim=48, mlp=96).state_dict()  # MLP ratio 2; no projection (vision width = text width).
  sd.update({f"model.vision_encoder.{k}": v for k, v in vit.items() if not k.startswith("norm.")})
  sd["model.vision_encoder.fc_norm.weight"] = torch.ones(48)
  path = _save(tmp_path, {"state_dict": sd})
  cfg = CFG.replace(backbone="urfound", vision_projection=False, vision_dim=48, vision_mlp_dim=192)
  cfg, params, meta = weight_files.convert_checkpoint(path, model_config=cfg, **quiet)
  assert cfg.vision_mlp_dim == 96 and not cfg.apply_final_norm
  assert sorted(meta["report"]["initialised"]) == ["model.vision_encoder.norm.bias",
                                                   "model.vision_encoder.norm.weight"]
  assert "model.vision_encoder.fc_norm.weight" in meta["report"]["ignored"]
  np.testing.assert_array_equal(params["vision_encoder"]["blocks"]["mlp"]["fc2"]["kernel"][1],
                                vit["blocks.1.mlp.fc2.weight"].numpy().T)


class _RunsCode:
  """A pickle that would run a shell command when loaded."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    import os
    return os.system, (f"touch {self.marker}",)


def test_real_fm_checkpoints_with_training_args_load_and_code_is_still_refused(tmp_path):
  """MAE/RETFound and iBOT/VisionFM save `args` (argparse.Namespace), numpy scalars and the epoch beside the
  weights; those load. Anything that could run code is refused, also inside the Namespace."""
  import argparse
  args = argparse.Namespace(model="vit_large_patch16", input_size=224, blr=np.float64(1.5e-4),
                            norm_pix_loss=True, mask_ratio=0.75, dtype=np.dtype("float32"), epochs=np.int64(800))
  cfg, params, meta = weight_files.convert_checkpoint(
      _save(tmp_path, {"model": _vit_state(), "epoch": 799, "args": args}, "mae.pth"), variant="tiny-retfound",
      **quiet)
  assert meta["source_format"] == "retfound" and "vision_encoder" in params
  marker = tmp_path / "ran"
  for name, obj in (("plain.pth", {"model": _vit_state(), "x": _RunsCode(marker)}),
                    ("in_args.pth", {"model": _vit_state(), "args": argparse.Namespace(hook=_RunsCode(marker))})):
    with pytest.raises(convert.CheckpointError, match=rf"{name}: cannot read as a PyTorch checkpoint"):
      weight_files.convert_checkpoint(_save(tmp_path, obj, name), variant="tiny-retfound", **quiet)
  assert not marker.exists()


def test_vit_sizes_come_from_the_tensors(tmp_path):
  """No --variant: depth, width, MLP, patch and grid from the tensors, heads by the FMs' 64-channel convention
  (before, every RETFound-format file was read as ViT-L and any other size was 100+ shape mismatches)."""
  torch.manual_seed(0)
  path = _save(tmp_path, {"model": TorchViT(image_size=48, dim=128, depth=3, heads=2, mlp=320).state_dict()})
  cfg, params, _ = weight_files.convert_checkpoint(path, **quiet)
  assert (cfg.vision_dim, cfg.vision_depth, cfg.vision_heads, cfg.vision_mlp_dim, cfg.patch_size,
          cfg.image_size) == (128, 3, 2, 320, 16, 48)
  assert params["vision_encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 128, 384)
  odd = _save(tmp_path, {"model": TorchViT(dim=96, heads=2, mlp=192).state_dict()}, "odd.pth")
  with pytest.raises(ConfigError, match=r"vision_dim 96, not a multiple of 64.*--variant"):
    weight_files.convert_checkpoint(odd, **quiet)
  cfg, _, _ = weight_files.convert_checkpoint(_save(tmp_path, _vit_state(), "tiny.pth"), variant="tiny-retfound", **quiet)
  assert cfg.vision_heads == 4  # A named variant decides what the tensors cannot tell.


def test_a_converted_folders_model_json_serves_as_model_config(tmp_path):
  """--model-config accepts a converted folder's model.json (its model_config block): the head count a 96-wide
  checkpoint cannot tell comes from it."""
  torch.manual_seed(0)
  odd = _save(tmp_path, {"model": TorchViT(dim=96, heads=2, mlp=192).state_dict()}, "odd.pth")
  import json
  from retfiner_jax.models.config import ModelConfig
  plain = tmp_path / "sizes.json"
  sizes = get_variant("tiny-retfound").replace(vision_dim=96, vision_heads=2, vision_mlp_dim=192)
  plain.write_text(json.dumps(sizes.to_dict()))
  first, params, meta = weight_files.convert_checkpoint(odd, model_config=str(plain), **quiet)
  weight_files.save_converted(tmp_path / "folder", first, params, meta)
  assert ModelConfig.from_json(tmp_path / "folder" / "model.json") == first
  again, params, _ = weight_files.convert_checkpoint(odd, model_config=str(tmp_path / "folder" / "model.json"),
                                                     **quiet)
  assert again == first and again.vision_heads == 2 and again.vision_dim == 96
  assert params["vision_encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape[-1] == 288
