"""The refined model's text side: the Python API (embeddings, matching, zero-shot), the retrieval metrics on
constructed cases, and the zero-shot and retrieval commands on the synthetic corpus."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from retfiner_jax.data import synthetic
from retfiner_jax.models.attention import padding_bias
from retfiner_jax.models.config import get_variant
from retfiner_jax.models.retfiner import RetFiner, init_params
from retfiner_jax.metrics import ranking
from retfiner_jax.textside import retrieval
from retfiner_jax.textside import zeroshot
from retfiner_jax.textside.api import RetFinerModel
from retfiner_jax.weights import files as weight_files

CFG = get_variant("tiny-retfound").replace(dtype="float32", image_size=32)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  """A tiny whole model as a converted folder, and the synthetic corpus."""
  root = tmp_path_factory.mktemp("text_side")
  params = jax.tree.map(np.asarray, init_params(CFG, jax.random.PRNGKey(0)))
  weight_files.save_converted(root / "model", CFG, params, {"source": "test", "contents": sorted(params)})
  synthetic.generate(root / "data", count=60, seed=1, height=64, width=64, workers=1, log=lambda *a: None)
  return root, params, str(shared_path("reference", "vocab.txt"))


def test_api_embeddings_matching_and_zero_shot(setting, tmp_path):
  root, params, vocab = setting
  model = RetFinerModel.load(root / "model", tokenizer=vocab, batch_size=4)
  images = sorted((root / "data" / "images").glob("*.png"))[:6]
  texts = ["subretinal fluid", "normal foveal contour", "drusen", "macular hole", "no fluid", "atrophy"]
  img, txt = model.embed_images(images), model.embed_texts(texts)
  assert img.shape == (6, CFG.contrastive_dim) and txt.shape == (6, CFG.contrastive_dim)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
  # Batching (a padded last batch) changes nothing; arrays work as paths do.
  from retfiner_jax.data.images import read_image
  np.testing.assert_allclose(model.embed_images([read_image(images[5])]), img[5:], atol=1e-5)
  np.testing.assert_allclose(model.similarity(images, texts), img @ txt.T, atol=1e-6)

  # Zero-shot by hand: class embedding = the renormalised mean of its prompts' embeddings.
  prompts = {"fluid": ["subretinal fluid", "intraretinal fluid"], "dry": ["no fluid", "dry macula", "normal"]}
  probs, classes = model.zero_shot(images, prompts)
  assert classes == ["fluid", "dry"]
  means = np.stack([model.embed_texts(p).mean(0) for p in prompts.values()])
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  sims = img @ means.T
  np.testing.assert_array_equal(probs.argmax(1), sims.argmax(1))
  np.testing.assert_allclose(probs, np.exp(sims / CFG.temperature) / np.exp(sims / CFG.temperature).sum(1,
                                                                                                        keepdims=True),
                             rtol=1e-4)

  # ITM probability of each pair, against the model's own methods applied by hand to one pair.
  p = model.match(images[:2], texts[:2])
  assert p.shape == (2,) and np.all((p > 0) & (p < 1))
  ids, mask = model.tokenize(texts[1:2])
  m = RetFiner(CFG).bind({"params": params})
  fused = m.text_with_image(jnp.asarray(ids), padding_bias(jnp.asarray(mask)),
                            m.image_tokens(jnp.asarray(model.preprocess(images[1:2]))))
  want = jax.nn.softmax(m.itm_logits(fused[:, 0]))[0, 1]
  np.testing.assert_allclose(p[1], want, rtol=1e-5)
  # Every image with every text in one pass of each image (grouped rows): the pairwise probabilities.
  each = model.match_every_text(model.preprocess(images[:3]), texts[:2])
  assert each.shape == (3, 2)
  for t in range(2):
    np.testing.assert_allclose(each[:, t], model.match(images[:3], [texts[t]] * 3), atol=1e-5)
  own = np.array([[1, 0], [0, 1], [1, 1]])  # Each image with texts of its own (retrieval's re-ranking).
  ids2, mask2 = model.tokenize(texts[:2])
  grouped = model.match_groups(model.preprocess(images[:3]), ids2[own], mask2[own])
  np.testing.assert_allclose(grouped, [[each[i, t] for t in own[i]] for i in range(3)], atol=1e-5)

  # A training workdir: its exported whole model and the tokenizer of its config.json.
  work = tmp_path / "run"
  (work / "export").mkdir(parents=True)
  (root / "model").rename(work / "export" / "retfiner_flax")
  try:
    (work / "config.json").write_text(json.dumps({"tokenizer": vocab, "weights": {"text": ""}}))
    np.testing.assert_allclose(RetFinerModel.load(work).embed_texts(texts[:1]), txt[:1], atol=1e-6)
  finally:
    (work / "export" / "retfiner_flax").rename(root / "model")
  with pytest.raises(ValueError, match="lack"):  # A vision encoder alone has no text side.
    RetFinerModel(CFG, {"vision_encoder": params["vision_encoder"]}, vocab)


def test_ranking_metrics_on_constructed_cases():
  # Three queries: the match of query 0 ranks first, of query 1 third, of query 2 second.
  scores = np.array([[0.9, 0.1, 0.2], [0.8, 0.1, 0.7], [0.3, 0.1, 0.2]])
  got = ranking.ranking_metrics(scores, np.eye(3, dtype=bool), ks=(1, 2, 3))
  assert got == {"recall_at_1": 1 / 3, "recall_at_2": 2 / 3, "recall_at_3": 1.0, "median_rank": 2.0}
  # Against sorting (ties included): 200 queries with 3 matches each among 60 columns of coarse scores.
  rng = np.random.default_rng(0)
  scores, matches = rng.integers(0, 5, (200, 60)).astype(float), np.zeros((200, 60), bool)
  for row in matches:
    row[rng.choice(60, 3, replace=False)] = True
  order = np.argsort(-scores, axis=1, kind="stable")
  ranks = np.take_along_axis(matches, order, axis=1).argmax(axis=1) + 1
  got = ranking.ranking_metrics(scores, matches, ks=(1, 5, 10))
  assert got == {"recall_at_1": np.mean(ranks <= 1), "recall_at_5": np.mean(ranks <= 5),
                 "recall_at_10": np.mean(ranks <= 10), "median_rank": float(np.median(ranks))}
  # Rows sharing an id are each other's matches; rows without one match only themselves.
  codes = retrieval.match_codes(["a", "a", None, ""])
  np.testing.assert_array_equal(codes[:, None] == codes[None, :],
                                [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  # Re-ranking: the top 2 are re-ordered by BLIP's score (ITM match logit + ITC similarity), the rest keep their
  # order below them: 0.2 + 0.9 < 0.7 + 0.8, so column 1 is first and column 0 second.
  one = lambda scores, match_col, logits: retrieval.reranked_ranks(
      retrieval.short_lists(np.array([[1.0]]), np.array(scores)[:, None], np.array([match_col]), np.arange(3), 2),
      logits)[0]
  assert [one([0.9, 0.8, 0.1], col, [[0.2, 0.7]]) for col in range(3)] == [2, 1, 3]  # Logits of the short list.
  # Saturated: logits (0, 25) and (0, 40) are both probability 1.0 in float32, so a ranking by probability ties
  # and falls to column order; by logits the second wins.
  from retfiner_jax.textside.api import match_probability
  assert list(match_probability(np.array([[0.0, 25.0], [0.0, 40.0]]))) == [1.0, 1.0]
  np.testing.assert_allclose(match_probability(np.array([[0.3, -1.2]])), [np.exp(-1.2) / (np.exp(0.3) + np.exp(-1.2))],
                             rtol=1e-6)
  assert [one([0.9, 0.8, 0.1], col, [[25.0, 40.0]]) for col in range(3)] == [2, 1, 3]


def brute_force_ranks(scores, matches, k=0, logits=None):
  """Ranks by sorting each whole row (stable, so ties go to the lower column), the top k re-scored first."""
  ranks = []
  for n, (row, match) in enumerate(zip(scores, matches)):
    order = list(np.argsort(-row, kind="stable"))
    if k:
      top = order[:k]
      new = {c: logits[n][j] + row[c] for j, c in enumerate(top)}
      order = sorted(top, key=lambda c: (-new[c], c)) + order[k:]
    ranks.append(next((i for i, c in enumerate(order) if match[c]), len(order)) + 1)
  return np.array(ranks)


@pytest.mark.parametrize("k", [0, 1, 5, 40])
def test_streamed_ranks_equal_sorting_every_whole_row(k):
  """Chunks of queries, the short list found by partition, ties (coarse scores) and rows sharing ids: the same
  ranks as sorting every row of the full matrix."""
  rng = np.random.default_rng(k)
  queries, gallery = rng.integers(-2, 3, (70, 4)).astype(np.float32), rng.integers(-2, 3, (40, 4)).astype(np.float32)
  query_codes, gallery_codes = rng.integers(0, 25, 70), rng.integers(0, 25, 40)
  query_codes[:5] = 99  # Queries without any match.
  scores, matches = queries @ gallery.T, query_codes[:, None] == gallery_codes[None, :]
  short = retrieval.short_lists(queries, gallery, query_codes, gallery_codes, k, chunk=16)
  if not k:
    got = short["ranks"]
    want = brute_force_ranks(scores, matches)
  else:
    logits = rng.integers(-1, 2, short["top"].shape).astype(np.float64)
    got = retrieval.reranked_ranks(short, logits)
    want = brute_force_ranks(scores, matches, min(k, 40), logits)
  has = matches.any(axis=1)
  np.testing.assert_array_equal(got[has], want[has])
  assert (got[~has] == 41).all()  # No match: one past the last column.


def test_zero_shot_and_retrieval_commands(setting, tmp_path, capsys):
  root, _, vocab = setting
  assert zeroshot.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--data={root / 'data/tasks/fluid'}",
                        f"--workdir={tmp_path / 'zs'}"]) is None
  saved = json.loads((tmp_path / "zs" / "results.json").read_text())["fluid"]["zero_shot"]
  assert saved["classes"] == 2 and 0 <= saved["bacc"]["mean"] <= 1 and saved["prompts"]["no_fluid"][0] == "no fluid"
  for name in ("results.csv", "results.md", "predictions.csv", "confusion_fluid_zero_shot.png"):
    assert (tmp_path / "zs" / name).exists(), name
  (tmp_path / "prompts.json").write_text(json.dumps({"fluid": ["fluid"]}))
  with pytest.raises(SystemExit):
    zeroshot.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--data={root / 'data/tasks/fluid'}",
                   f"--workdir={tmp_path / 'zs2'}", f"--prompts={tmp_path / 'prompts.json'}", "--itm"])
  assert "classes without prompts ['no_fluid']" in capsys.readouterr().err
  (tmp_path / "prompts.json").write_text(json.dumps({"fluid": ["fluid"], "no_fluid": ["no fluid", "dry"]}))
  zeroshot.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--data={root / 'data/tasks/fluid'}",
                 f"--workdir={tmp_path / 'zs2'}", f"--prompts={tmp_path / 'prompts.json'}", "--itm"])
  assert json.loads((tmp_path / "zs2" / "results.json").read_text())["fluid"]["zero_shot"]["protocol"] == \
      "zero_shot_itm"

  retrieval.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--manifest={root / 'data/manifest_val.csv'}",
                  f"--workdir={tmp_path / 'ret'}", "--itm-top-k=3"])
  result = json.loads((tmp_path / "ret" / "retrieval.json").read_text())
  assert result["itm_top_k"] == 3 and result["pairs"] > 0
  for direction in ("image_to_report", "report_to_image"):
    m = result[direction]
    assert 0 <= m["recall_at_1"] <= m["recall_at_5"] <= m["recall_at_10"] <= 1 and m["median_rank"] >= 1
  assert "median rank" in (tmp_path / "ret" / "retrieval.md").read_text()
  with pytest.raises(SystemExit):  # A missing image: one line naming it.
    retrieval.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--workdir={tmp_path / 'ret2'}",
                    f"--manifest={_manifest_with_missing_image(root, tmp_path)}"])
  assert capsys.readouterr().err.strip().endswith("m.csv row 2: " + str(tmp_path / "gone.png") + ": file not found")


def _manifest_with_missing_image(root, tmp_path):
  (tmp_path / "m.csv").write_text(f"image,report\n{root / 'data/images/oct_000000.png'},fluid\n"
                                  f"{tmp_path / 'gone.png'},dry\n")
  return tmp_path / "m.csv"


def test_attention_maps_equal_transformers_cross_attentions(setting, tmp_path, monkeypatch):
  """The maps against transformers' own cross-attention probabilities (`output_attentions`) of the same
  weights exported to BertLMHeadModel, given the same image tokens, averaged over layers and heads; the
  Grad-CAM map against PyTorch's gradient of the ITM logit with respect to those probabilities."""
  import torch
  from transformers import BertLMHeadModel
  from transformers.models.bert import modeling_bert
  from retfiner_jax.weights import exports
  root, params, vocab = setting
  model = RetFinerModel.load(root / "model", tokenizer=vocab)
  image = sorted((root / "data" / "images").glob("*.png"))[0]
  text = "subretinal fluid nasal parafoveal"
  maps = model.attention_maps(image, text)
  grid = CFG.grid_size
  assert maps["per_token"].shape == (len(maps["tokens"]), grid, grid) and maps["mean"].shape == (grid, grid)
  assert maps["tokens"][:2] == ["sub", "##ret"] and np.all(maps["per_token"] >= 0)
  np.testing.assert_allclose(maps["per_token"].sum((1, 2)) + maps["global"], 1, atol=1e-5)

  paths = exports.hf_bert(CFG, params, tmp_path / "hf", vocab)
  hf = BertLMHeadModel.from_pretrained(paths["hf_cross_attention"], attn_implementation="eager").eval()
  ids, mask = model.tokenize([text])
  m = RetFiner(CFG).bind({"params": params})
  tokens = np.asarray(m.image_tokens(jnp.asarray(model.preprocess([image]))))
  length = ids.shape[1]
  bidirectional = (1.0 - torch.tensor(mask)[:, None, None, :].float().expand(1, 1, length, length)) * -1e9
  # transformers' attention function wrapped to keep the probabilities its matmul used (the tensors in
  # `out.cross_attentions` are copies, off the gradient's path), in call order: self, cross, self, cross, ...
  used, original = [], modeling_bert.eager_attention_forward

  def keeping(*args, **kw):
    context, probs = original(*args, **kw)
    probs.retain_grad()
    used.append(probs)
    return context, probs
  monkeypatch.setattr(modeling_bert, "eager_attention_forward", keeping)
  out = hf(input_ids=torch.tensor(ids).long(), attention_mask=bidirectional,
           encoder_hidden_states=torch.tensor(tokens), output_attentions=True, output_hidden_states=True)
  assert len(used) == 2 * CFG.text_layers and torch.equal(used[1], out.cross_attentions[0])
  probs = torch.stack(out.cross_attentions).mean(dim=(0, 2))[0].detach().numpy()  # Over layers and heads.
  keep = [t for t in range(length) if mask[0, t] and ids[0, t] not in (101, 102)]
  np.testing.assert_allclose(maps["per_token"], probs[keep, 1:].reshape(-1, grid, grid), atol=1e-5)
  np.testing.assert_allclose(maps["global"], probs[keep, 0], atol=1e-5)

  # Grad-CAM by PyTorch's autograd: the ITM head (typed out here from its parameters) on the last layer's [CLS],
  # the "match" logit differentiated with respect to transformers' cross-attention probabilities.
  head = {k: {n: torch.tensor(np.asarray(v)) for n, v in layer.items()} for k, layer in params["itm_head"].items()}
  x = out.hidden_states[-1][:, 0]
  x = torch.nn.functional.gelu(x @ head["linear1"]["kernel"] + head["linear1"]["bias"])
  x = torch.nn.functional.layer_norm(x, x.shape[-1:], head["layernorm"]["scale"], head["layernorm"]["bias"], 1e-12)
  logits = x @ head["linear2"]["kernel"] + head["linear2"]["bias"]
  logits[:, 1].sum().backward()
  chosen = used[2 * maps["gradcam_layer"] + 1]
  cam = (chosen * chosen.grad.clamp(min=0)).mean(dim=1)[0].detach().numpy()  # Mean over heads.
  assert maps["gradcam_layer"] == 0  # Two layers: the last one's token rows have no gradient (see the API).
  grad = chosen.grad[0, :, keep, 1:]
  assert (grad > 0).any() and (grad < 0).any()  # So the clamp matters.
  np.testing.assert_allclose(maps["gradcam_per_token"], cam[keep, 1:].reshape(-1, grid, grid),
                             rtol=1e-3, atol=1e-3 * np.abs(cam[keep, 1:]).max())
  np.testing.assert_allclose(maps["gradcam"], maps["gradcam_per_token"].mean(0), rtol=1e-6)
  np.testing.assert_allclose(maps["itm"], torch.softmax(logits, -1)[0, 1].item(), atol=1e-5)


def test_explain_command_draws_every_pair(setting, tmp_path, capsys):
  from retfiner_jax.textside import explain
  root, _, vocab = setting
  images = [str(p) for p in sorted((root / "data" / "images").glob("*.png"))[:2]]
  explain.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", *(f"--image={i}" for i in images),
                "--text=subretinal fluid", f"--out={tmp_path / 'maps.png'}", "--tokens=2", "--gradcam-layer=1"])
  saved = json.loads((tmp_path / "maps.json").read_text())
  assert [(r["image"], r["text"]) for r in saved] == [(i, "subretinal fluid") for i in images]
  assert saved[0]["tokens"] == ["sub", "##ret", "##inal", "fluid"]
  assert np.asarray(saved[0]["per_token"]).shape == (4, CFG.grid_size, CFG.grid_size)
  assert np.asarray(saved[0]["gradcam_per_token"]).shape == (4, CFG.grid_size, CFG.grid_size)
  assert saved[0]["gradcam_layer"] == 1 and 0 < saved[0]["itm"] < 1
  # Per-token panels: both kinds by default, each labelled.
  assert saved[0]["panels"][2:] == ["attention: sub (global %.2f)" % saved[0]["global"][0],
                                    "attention: ##ret (global %.2f)" % saved[0]["global"][1],
                                    "Grad-CAM: sub", "Grad-CAM: ##ret"]
  explain.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--image={images[0]}", "--text=fluid",
                f"--out={tmp_path / 'g.png'}", "--tokens=1", "--per-token=gradcam"])
  assert json.loads((tmp_path / "g.json").read_text())[0]["panels"][2:] == ["Grad-CAM: fluid"]
  from PIL import Image
  assert Image.open(tmp_path / "maps.png").size[0] > 300
  with pytest.raises(SystemExit) as stop:
    explain.main([f"--model={root / 'model'}", f"--tokenizer={vocab}", f"--image={images[0]}", "--text=fluid",
                  f"--out={tmp_path / 'no.png'}", "--gradcam-layer=2"])
  assert stop.value.code == 2
  assert "gradcam layer 2: the text encoder has layers 0..1" in capsys.readouterr().err


def test_the_original_lightning_checkpoint_loads_with_its_text_side(tmp_path):
  """RetFinerModel on the original's own checkpoint (a reference bundle's model.ckpt): its ITC embeddings equal
  the original's intermediates (image features and text [CLS] output, from the bundle) through its contrastive
  heads, and its ITM probabilities equal the original's ITM logits."""
  import torch
  folder = shared_path("reference", "tiny-retfound")
  model = RetFinerModel.load(folder / "model.ckpt", tokenizer=shared_path("reference", "vocab.txt"),
                             variant="tiny-retfound", dtype="float32")
  batch, inter = np.load(folder / "batch.npz"), np.load(folder / "intermediates.npz")
  state = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=False)["state_dict"]
  head_v, head_t = (state[f"model.contra_head_{k}.linear.weight"].float().numpy() for k in ("v", "t"))
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  images = batch["images"].transpose(0, 2, 3, 1)
  got = model._batched(model._embed_images, images)
  np.testing.assert_allclose(got, normalise(inter["vision_features"][:, 0] @ head_v.T), atol=1e-4)
  got = model._batched(model._embed_texts, batch["input_ids"], batch["attention_mask"])
  np.testing.assert_allclose(got, normalise(inter["text_only_sequence_output"][:, 0] @ head_t.T), atol=1e-4)
  # The bundle's first ITM rows are the positive pairs (image i with its own report).
  p = model.match_prepared(images, batch["input_ids"], batch["attention_mask"])
  logits = inter["itm_logits"][:4]
  np.testing.assert_allclose(p, np.exp(logits[:, 1]) / np.exp(logits).sum(1), atol=1e-4)

  # The explain command on the same checkpoint (a real B-scan): its ITM probability is the API's, its maps finite.
  from retfiner_jax.textside import explain
  scan = sorted(shared_path("data", "real-oct-samples").rglob("*.jp*g"))[0]
  out = tmp_path / "maps.png"
  explain.main([f"--model={folder / 'model.ckpt'}", "--variant=tiny-retfound", f"--image={scan}",
                f"--tokenizer={shared_path('reference', 'vocab.txt')}", "--text=drusen", f"--out={out}"])
  saved = json.loads(out.with_suffix(".json").read_text())[0]
  np.testing.assert_allclose(saved["itm"], model.match([scan], ["drusen"])[0], atol=2e-3)  # Command: bfloat16.
  assert np.isfinite(saved["gradcam"]).all() and np.asarray(saved["gradcam"]).shape == (model.cfg.grid_size,) * 2


def test_reranking_logits_streamed_by_image_equal_the_pairs_one_by_one(setting):
  """Re-ranking's ITM logits, computed image by image (each image's vision pass once, with every report that
  short-listed it, a few images at a time), equal the logits of each (image, report) pair passed on its own; the
  embeddings, read a chunk of images at a time, equal those of one pass."""
  root, _, vocab = setting
  model = RetFinerModel.load(root / "model", tokenizer=vocab, batch_size=4)
  images = [str(p) for p in sorted((root / "data" / "images").glob("*.png"))[:7]]
  reports = ["subretinal fluid", "normal foveal contour", "drusen", "macular hole", "no fluid"]
  ids, mask = model.tokenize(reports)
  pixels = model.preprocess(images)
  rng = np.random.default_rng(0)
  top_images = np.stack([rng.permutation(len(images))[:3] for _ in reports])  # (R, k) image short lists.
  want = model.match_logits_prepared(pixels[top_images.reshape(-1)], np.repeat(ids, 3, 0),
                                     np.repeat(mask, 3, 0))[:, 1].reshape(top_images.shape)
  got = retrieval.report_query_logits(model, images, ids, mask, top_images, chunk=2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  top_reports = np.stack([rng.permutation(len(reports))[:2] for _ in images])  # (N, k) report short lists.
  want = np.stack([model.match_logits_prepared(pixels[[i, i]], ids[row], mask[row])[:, 1]
                   for i, row in enumerate(top_reports)])
  got = retrieval.image_query_logits(model, images, ids, mask, top_reports, chunk=3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  small = RetFinerModel.load(root / "model", tokenizer=vocab, batch_size=1)  # Chunks of 8 images: 7 is one.
  np.testing.assert_allclose(small.embed_images(images + images[:3]), np.concatenate(
      [model.embed_images(images), model.embed_images(images[:3])]), atol=1e-5)


def test_a_random_rankings_recall_is_the_hypergeometric_miss_chance_by_math_comb():
  """metrics.ranking.chance_recall against 1 - C(n-m, k) / C(n, k) computed with math.comb, row by row (rows with
  several matches: reports shared by several images)."""
  from math import comb
  keys = np.random.default_rng(0).integers(0, 30, 100)
  matches = keys[:, None] == keys[None, :]
  for k in (1, 5, 10, 100):
    want = np.mean([1 - comb(100 - m, k) / comb(100, k) for m in matches.sum(axis=1)])
    assert ranking.chance_recall(matches, k) == pytest.approx(want, rel=1e-12)
  assert ranking.chance_recall(np.eye(144, dtype=bool), 1) == pytest.approx(1 / 144)
