"""Every module in configs/ (found by listing the folder, no hand-kept list): its settings have one default each,
the dataclasses built from it carry its values, and it runs: a short smoke run per config whose outcome is
checked against numbers known independently (Adam's step size, the warm-up's learning rate, a falling loss)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

import configs
from conftest import shared_path
from retfiner_jax.config_defaults import base_config, tiny_model
from retfiner_jax.data import synthetic
from retfiner_jax.data.manifest import read_manifest
from retfiner_jax.models.config import VARIANTS, ModelConfig
from retfiner_jax.models.mae import MaeSettings
from retfiner_jax.probe.settings import ProbeSettings
from retfiner_jax.refine import trainer
from retfiner_jax.refine.objectives import ObjectiveSettings
from retfiner_jax.runs.run_log import read_metrics
from retfiner_jax.weights import convert
from retfiner_jax.weights import files as weight_files


def probe_blocks(c):
  """The config blocks that become ProbeSettings."""
  return [b for b in (c.get("probe"), c.get("demo", {}).get("probe")) if b is not None]


def kind(c) -> str:
  return "demo" if "demo" in c else "probe" if "encoder" in c else "mae" if "mae" in c else "train"


def test_every_config_module_is_found():
  assert {"retfound", "visionfm", "urfound", "demo", "probe"} <= set(configs.NAMES)
  with pytest.raises(ValueError, match="no config 'nope'.*known: demo, mae_demo, probe"):
    configs.load("nope")


def test_each_setting_has_one_default():
  """The config blocks that become dataclasses are those dataclasses' defaults, not a second copy."""
  for backbone in ("retfound", "visionfm", "urfound"):
    c = base_config(backbone)
    assert c.model.to_dict() == VARIANTS[backbone].to_dict()
    assert c.train.objectives.to_dict() == dataclasses.asdict(ObjectiveSettings())
  assert configs.load("probe").probe.to_dict() == dataclasses.asdict(ProbeSettings())
  # The run's numerics and dropout are the model's own defaults (mixed precision as the original's
  # precision=16, BERT's dropout 0.1).
  assert ModelConfig().dtype == "bfloat16" and ModelConfig().text_dropout == 0.1


@pytest.mark.parametrize("name", configs.NAMES)
def test_dataclasses_built_from_a_config_carry_its_values(name):
  c = configs.load(name)
  if "model" in c:
    assert ModelConfig.from_dict(c.model.to_dict()).to_dict() == c.model.to_dict()
  if "train" in c and "objectives" in c.train:
    assert dataclasses.asdict(ObjectiveSettings(**c.train.objectives)) == c.train.objectives.to_dict()
  for block in (c.get("mae"), c.get("demo", {}).get("mae", {}).get("mae")):
    if block is not None:
      assert dataclasses.asdict(MaeSettings(**block)) == block.to_dict()
  for block in probe_blocks(c):
    assert dataclasses.asdict(ProbeSettings(**block)) == block.to_dict()
  assert "model" in c or probe_blocks(c), f"configs/{name}.py: nothing to build"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus")
  synthetic.generate(out, count=60, seed=0, height=64, width=64, workers=1, log=lambda *a: None)
  return out


@pytest.mark.parametrize("name", configs.NAMES)
def test_config_smoke_run(name, corpus, tmp_path):
  c = configs.load(name)
  {"train": smoke_train, "demo": smoke_demo, "probe": smoke_probe, "mae": smoke_mae}[kind(c)](name, c, corpus,
                                                                                            tmp_path)


def smoke_train(name, config, corpus, tmp_path):
  """Two steps from PyTorch FM weights: every exported ViT weight moved from the FM's by at most two Adam steps
  (|update| <= ~lr each) and some by about one, so the FM's weights were loaded and trained, not replaced."""
  import torch
  from torch_reference import TorchViT
  config = tiny_model(config)
  config.model.dtype = "float32"
  config.tokenizer = str(shared_path("reference", "vocab.txt"))
  config.data.train_manifest = str(corpus / "manifest.csv")
  config.data.val_manifest = str(corpus / "manifest_val.csv")
  config.train.update(batch_size=8, log_every=1, max_steps=2, micro_batches=2)
  cfg = trainer.model_config(config)
  vit = TorchViT(dim=cfg.vision_dim, mlp=cfg.vision_mlp_dim).state_dict()
  wrapped = {"retfound": {"model": vit}, "urfound": {"model": {**vit, "bert_mlp.w": torch.zeros(1)}},
             "visionfm": {"teacher": {f"backbone.{k}": v for k, v in vit.items() if not k.startswith("head")}}}
  torch.save(wrapped[cfg.backbone], tmp_path / "fm.pth")
  config.weights.vision = str(tmp_path / "fm.pth")
  config.export.formats = "all"  # Every export form is checked below.
  lines = []
  summary = trainer.run(config, tmp_path / "run", log=lambda line, **_: lines.append(line))
  assert summary["status"] == "finished" and summary["steps"] == 2
  assert any(line.startswith("loaded vision_encoder") for line in lines)
  # What a first-day user reads: the random tower named, epochs counted from 1, a validation although the run
  # ended within its first epoch, strict JSON, exports readable by colleagues.
  assert summary["initialised_randomly"] == ["text_encoder"]
  assert any(line.startswith("warning: the text encoder starts from random weights (config.weights.text is empty)")
             for line in lines)
  assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["1", "1"]
  assert any(line.startswith("validation at the end (step 2, within epoch 1)") for line in lines)

  def no_constants(name):
    raise AssertionError(f"summary.json holds {name}, which is not JSON")
  saved = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=no_constants)
  assert saved["best_step"] == 2 and np.isfinite(saved["best_val_loss"])
  exported = [p for p in (tmp_path / "run" / "export").rglob("*") if p.is_file()]
  assert exported and all(p.stat().st_mode & 0o777 == 0o644 for p in exported)
  # Every tensor of the FM file moved by about the learning rate in two AdamW steps (what the file lacks, e.g.
  # RETFound's proj, started from the run's own initialisation).
  _, fm, _ = weight_files.convert_checkpoint(tmp_path / "fm.pth", model_config=cfg, log=lambda *a: None,
                                             fill_missing=False)
  _, refined, _ = weight_files.load_converted(summary["exported"]["retfiner_flax"])
  lr = config.train.learning_rate
  refined_flat = convert.flatten(refined["vision_encoder"])
  largest = max(float(np.abs(refined_flat[path] - np.asarray(value)).max())
                for path, value in convert.flatten(fm["vision_encoder"]).items())
  assert 0.5 * lr < largest < 2.5 * lr, (name, largest)
  check_whole_model_export(cfg, tmp_path / "run" / "export")


def check_whole_model_export(cfg, export):
  """The whole refined model, in every form: the Lightning file holds exactly the Flax folder's parameters; the
  original's get_vision_backbone_for_linprobing.py (its filtering, re-typed) gets a state_dict from it that the
  FM's ViT loads strictly; both Hugging Face folders load with no missing or unexpected keys."""
  import torch
  from transformers import AutoTokenizer, BertLMHeadModel, BertModel
  from torch_reference import TorchViT
  _, whole, info = weight_files.load_converted(export / "retfiner_flax")
  assert set(whole) == {"vision_encoder", "text_encoder", *weight_files.HEADS} and info["contents"] == sorted(whole)
  _, from_lightning, _ = weight_files.convert_checkpoint(export / "retfiner_lightning.ckpt", model_config=cfg,
                                                    log=lambda *a: None)
  jax.tree.map(np.testing.assert_array_equal, from_lightning, whole)
  ckpt = torch.load(export / "retfiner_lightning.ckpt", weights_only=True)
  state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
  vision = {k.replace("model.vision_encoder.", ""): v for k, v in state.items() if "vision_encoder" in k}
  vit = TorchViT(dim=cfg.vision_dim, mlp=cfg.vision_mlp_dim, proj_dim=cfg.text_dim if cfg.vision_projection else None)
  vit.head = None
  vit.load_state_dict(vision, strict=True)
  for folder, model_class, kw in (("bert_encoder", BertModel, {"add_pooling_layer": False}),
                                  ("bert_cross_attention", BertLMHeadModel, {})):
    _, loading = model_class.from_pretrained(export / "text" / folder, output_loading_info=True, **kw)
    assert not any(loading.values()), (folder, loading)
    assert len(AutoTokenizer.from_pretrained(export / "text" / folder)) == cfg.vocab_size
  heads = __import__("safetensors.numpy", fromlist=["load_file"]).load_file(str(export / "heads.safetensors"))
  np.testing.assert_array_equal(heads["itm_head.linear2.weight"], np.asarray(whole["itm_head"]["linear2"]["kernel"]).T)


def smoke_mae(name, config, corpus, tmp_path):
  """Two epochs of MAE pretraining on a tiny encoder: the logged learning rates are the warm-up's, known by hand
  (peak x step / warm-up steps), and the export is an FM of the config's sizes."""
  from retfiner_jax.mae import trainer as mae_trainer
  tiny_model(config, image_size=32)
  config.mae.update(decoder_dim=16, decoder_depth=1, decoder_heads=2)
  config.data.train_manifest = str(corpus / "manifest_train.csv")
  config.train.update(epochs=2, batch_size=8, warmup_epochs=1, learning_rate=1e-3, log_every=1)
  summary = mae_trainer.run(config, tmp_path, log=lambda *a: None)
  per_epoch = (len((corpus / "manifest_train.csv").read_text().splitlines()) - 1) // 8
  rows = read_metrics(tmp_path / "metrics.jsonl")
  assert summary["steps"] == 2 * per_epoch and len(rows) == 2 * per_epoch
  for row in rows[:per_epoch]:  # Step s ran with the schedule's value at s - 1.
    assert row["lr"] == pytest.approx(1e-3 * (row["step"] - 1) / per_epoch, rel=1e-5)
  cfg, fm, _ = weight_files.load_converted(summary["exported"]["vision_flax"])
  assert cfg.vision_dim == config.model.vision_dim and len(jax.tree.leaves(fm["vision_encoder"])) > 10


def smoke_demo(name, config, corpus, tmp_path):
  """The demo in short, two seeds: its outputs (the four encoders' rows per run, their mean and spread), the
  corpus block, and refinements whose training loss falls."""
  from retfiner_jax import demo
  config.demo.update(refinement_count=60, probe_count=60, image_height=64, tasks=("fluid",))
  config.demo.probe.seeds = (0,)
  config.demo.mae.mae.update(decoder_dim=16, decoder_depth=1, decoder_heads=2)
  config.demo.mae.train.update(epochs=1, batch_size=8, warmup_epochs=0, log_every=1)
  config.model.image_size = 32
  config.demo.text.update(epochs=2, batch_size=8, log_every=1)
  config.train.update(epochs=4, batch_size=8, log_every=1)
  results = demo.run(config, tmp_path, seeds=2, log=lambda *a: None)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["tasks"]) == {"fluid"} and results["tasks"] == saved["tasks"] and saved["runs"] == 2
  assert saved["corpus"]["shared_images"] == 0
  assert saved["corpus"]["refinement_manifest"] == str(tmp_path / "data" / "refinement" / "manifest_train.csv")
  assert set(saved["corpus"]["report_to_label_bacc"]) == {"fluid"}
  rows = saved["tasks"]["fluid"]
  for k in ("random", "before", "after", "control"):
    per_run = [r["tasks"]["fluid"][k]["bacc"] for r in saved["per_seed"]]
    assert rows[k]["bacc_mean"] == pytest.approx(np.mean(per_run))
    assert rows[k]["bacc_std"] == pytest.approx(np.std(per_run, ddof=1))
  gain = [r["tasks"]["fluid"]["after"]["bacc"] - r["tasks"]["fluid"]["control"]["bacc"] for r in saved["per_seed"]]
  assert saved["gains"]["fluid"]["after_vs_control"]["mean"] == pytest.approx(np.mean(gain))
  for k, run in enumerate(saved["per_seed"]):
    seed_dir = tmp_path / f"seed_{k}"
    # The control saw as many images as the refinement: its MAE steps x batch cover the refinement's steps x batch.
    refined_images = run["refinement"]["steps"] * 8
    assert run["mae"]["control_images"] == refined_images and run["mae"]["control_steps"] == -(-refined_images // 8)
    control_dir = f"mae_control_{run['mae']['control_steps']}"
    control = json.loads((seed_dir / control_dir / "summary.json").read_text())
    assert control["steps"] == run["mae"]["control_steps"]
    # Each stage ran with its own seed: the control's is not stage 1's.
    used = {stage: json.loads((seed_dir / folder / "config.json").read_text())["seed"]
            for stage, folder in (("mae", "mae"), ("mae_control", control_dir), ("refine", "refine"))}
    assert used == {"mae": run["seeds"]["fm"], "mae_control": run["seeds"]["control"],
                    "refine": run["seeds"]["refinement"]} and len(set(used.values())) == 3
    # What the refinement learnt: the text tower pretrained on the reports (its [CLS] spread recorded), the
    # alignment on the clinic's validation pairs at start and end, the final losses beside their chance values,
    # and the in-domain probe of the FM, the refined encoder and the control.
    learnt = run["learnt"]
    tower = json.loads((seed_dir / "text_tower" / "summary.json").read_text())
    assert learnt["text_tower"] == "sentence" and tower["cls_cosine_after"] == learnt["text_tower_cls_cosine"]["cls_cosine_after"]
    assert json.loads((seed_dir / "refine" / "config.json").read_text())["weights"]["text"] == tower["exported"]
    for when in ("alignment_start", "alignment_end"):
      block = learnt[when]
      assert block["pairs"] == len(read_manifest(saved["corpus"]["refinement_val_manifest"]))
      assert set(block["recall"]) == {f"recall_{d}_at_{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
      assert -1 <= block["text_cosine"]["mean"] <= 1 and 0 < block["chance_recall"]["at_1"] <= 1
    assert learnt["final_train"]["chance"]["loss_itc"] == pytest.approx(np.log(8))
    assert set(run["indomain"]["fluid"]) == {"before", "after", "control"}
    zero_shot = run["tasks"]["fluid"]["zero_shot"]  # The text side's row: balanced accuracy of 2 classes.
    assert zero_shot["classes"] == 2 and 0 <= zero_shot["bacc"] <= 1 and 0 <= zero_shot["auroc"] <= 1
    losses = [r["loss"] for r in read_metrics(seed_dir / "refine" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) >= 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  assert saved["per_seed"][0]["seeds"]["fm"] != saved["per_seed"][1]["seeds"]["fm"]
  gain = [r["indomain"]["fluid"]["after"]["bacc"] - r["indomain"]["fluid"]["before"]["bacc"] for r in saved["per_seed"]]
  assert saved["learnt"]["indomain_gains"]["average"]["after_vs_before"]["mean"] == pytest.approx(np.mean(gain))
  assert (tmp_path / "results.png").exists()


def smoke_probe(name, config, corpus, tmp_path):
  """Three epochs of the paper protocol on a tiny encoder: the audit's learning rates are the warm-up's, known by
  hand (1e-3 x epoch / 10 at each epoch's first iteration)."""
  import torch
  from retfiner_jax.probe import run
  from torch_reference import TorchViT
  torch.manual_seed(0)
  torch.save(TorchViT(dim=48, mlp=192).state_dict(), tmp_path / "enc.pth")
  config.encoder = f"fm={tmp_path / 'enc.pth'}"
  config.variant = "tiny-visionfm"
  config.data.root = f"fluid={corpus / 'tasks' / 'fluid'}"
  config.workdir = str(tmp_path / "out")
  config.probe.update(seeds=(0,), max_epochs=3)
  run.run(config, log=lambda *a: None)
  log = [json.loads(x) for x in (tmp_path / "out/audit/fluid/fm/seed0/log.jsonl").read_text().splitlines()]
  assert [r["lr_first"] for r in log] == pytest.approx([0.0, 1e-4, 2e-4], abs=1e-12)
  assert json.loads((tmp_path / "out" / "results.json").read_text())["fluid"]["fm"]["protocol"] == "paper"


@pytest.mark.parametrize("name, lr, epochs, patience", [("retfound", 1e-4, 20, 3), ("urfound", 1e-4, 20, 3),
                                                         ("visionfm", 4e-5, 100, 10)])
def test_the_refinement_configs_carry_the_originals_settings(name, lr, epochs, patience):
  """SPEC.md's training settings of the original RetFiner, each pinned: AdamW at lr 1e-4 with betas 0.9/0.999,
  eps 1e-8 and weight decay 0.01, batch 128, at most 20 epochs, patience 3 (the refined VisionFM that the
  original probes: lr 4e-5, 100 epochs, patience 10), all four loss weights 1, MLM 15 % and GM 60 % masking,
  reports cut at 30 tokens, temperature 0.07, label smoothing 0.1."""
  c = configs.load(name)
  t, o, m = c.train, c.train.objectives, c.model
  assert (t.learning_rate, t.b1, t.b2, t.eps, t.weight_decay) == (lr, 0.9, 0.999, 1e-8, 0.01)
  assert (t.batch_size, t.epochs, t.patience, t.micro_batches) == (128, epochs, patience, 1)
  assert (o.itc_weight, o.itm_weight, o.mlm_weight, o.gm_weight) == (1.0, 1.0, 1.0, 1.0)
  assert (o.mlm_probability, o.gm_probability) == (0.15, 0.6)
  assert (m.max_text_length, m.temperature, m.label_smoothing) == (30, 0.07, 0.1)
