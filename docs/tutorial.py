# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # retfiner_jax, start to finish
#
# This notebook takes a foundation model (FM) through RetFiner on a CPU in a few minutes, at toy sizes:
#
# 1. convert an FM from its PyTorch checkpoint;
# 2. check a manifest of B-scans and reports, one of its rows a volume;
# 3. refine the FM with RetFiner's four objectives;
# 4. look at the training curves;
# 5. linear-probe the encoder before and after;
# 6. classify zero-shot from prompts;
# 7. retrieve reports by image and images by report;
# 8. draw where the report's words look, as attention and Grad-CAM maps.
#
# The data are the demo's synthetic B-scans and reports (`retfiner_jax/data/synthetic.py`): one corpus plays a
# clinic's image-report pairs, a second plays another site's labelled B-scans for the probe. At these sizes (a few
# hundred 64 x 64 B-scans, a minute of training) the probe and zero-shot figures sit near chance: the notebook
# shows how each step is done, not what refinement gains (the README's demo measures that, with its spread over
# seeds). With your own data, swap in your files and the real configs (`configs/retfound.py`, ...).
#
# `docs/tutorial.py` and `docs/tutorial.ipynb` are the same notebook (jupytext pairs them); the test suite runs the
# notebook from start to end.

# %%
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

# Work from the checkout (the notebook may be opened from docs/).
ROOT = Path.cwd() if (Path.cwd() / "retfiner_jax").is_dir() else Path.cwd().parent
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("TUTORIAL_WORKDIR", "runs/tutorial")).resolve()
WORK.mkdir(parents=True, exist_ok=True)


def sh(*command):
  """Runs one of the project's commands, shows what it printed, and stops the notebook if it failed."""
  out = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True)
  print(out.stdout[-3000:] + out.stderr[-3000:])
  if out.returncode:
    raise RuntimeError(f"exit status {out.returncode}: {' '.join(map(str, command))}")


print("working in", WORK)

# %% [markdown]
# ## 0. Data
#
# Two synthetic corpora at 64 x 64 pixels: 240 B-scans with reports from "the clinic" (80 % train, 20 % val
# patients) and 320 labelled B-scans from "another site" (its own patients and a shifted device). A WordPiece
# vocabulary is built from the clinic's training reports, as the demo does. Your own data need no such step.

# %%
from retfiner_jax import demo
from retfiner_jax.data import synthetic
from retfiner_jax.data.vocab import build_vocab

clinic, site = WORK / "clinic", WORK / "site"
if not (clinic / "DONE").exists():
  synthetic.generate(clinic, 240, seed=0, height=64, width=64, site="clinic", splits=(0.8, 0.2, 0.0), workers=1,
                     log=print)
if not (site / "DONE").exists():
  synthetic.generate(site, 320, seed=1, height=64, width=64, site="probe", splits=(0.6, 0.15, 0.25), workers=1,
                     log=print)
with open(clinic / "manifest_train.csv") as f:
  train_rows = list(csv.DictReader(f))
vocab = build_vocab([r["report"] for r in train_rows], 800, WORK / "vocab.txt")
print(len(train_rows), "training pairs; a report:", train_rows[0]["report"])

# %% [markdown]
# ## 1. Convert an FM
#
# An FM arrives as a PyTorch checkpoint: RETFound's `RETFound_mae_natureOCT.pth` is `{"model": state_dict}`.
# To stay self-contained, this notebook makes a stand-in of that kind: a short MAE pretraining of the demo's small
# ViT on the clinic's B-scans (`retfiner_jax.mae`), which writes its encoder as such a `.pth` file. The converter
# then reads it as it reads RETFound's: the format is detected, and the sizes are read from the tensors. Only the
# head count cannot be read from a 96-wide toy ViT, so `--model-config` gives it (any converted folder's
# `model.json` serves). With a real FM, start here with your file:
# `python tools/convert_weights.py --input RETFound_mae_natureOCT.pth --output weights/retfound`.

# %%
import configs

config = configs.load("demo")
mae_config = config.demo.mae
mae_config.train.epochs = 20
mae_config.train.log_every = 10
fm = demo.mae_stage(config, WORK / "mae", clinic / "manifest_train.csv", seed=0, log=print)
pth = fm["exported"]["pytorch"]
sh("tools/convert_weights.py", "--input", pth, "--output", WORK / "weights" / "fm",
   "--model-config", Path(fm["exported"]["vision_flax"]) / "model.json")
print(json.loads((WORK / "weights" / "fm" / "model.json").read_text()))

# %% [markdown]
# ## 2. Check a manifest, with a volume row
#
# A manifest is a CSV (or TSV, JSON Lines, Parquet) with `image` and `report` columns, and optionally `id`,
# `patient`, `split` and `slice`. A row's image may be a volume: a 3-D `.npy`, a multi-frame DICOM, or a device
# maker's export (Heidelberg `.vol`/`.xml`/`.e2e`, Topcon `.fda`, Duke `.mat`: `pip install -e ".[vendor]"`).
# `slice` names its B-scans: an index, a range `2-4`, or `*` for all of them, each then paired with the row's
# report under one `id`, so that none is another's negative.
#
# Here, six of the clinic's B-scans become one `.npy` volume with one report, and a row pointing at a missing
# file shows what the checker says about a bad row.

# %%
from retfiner_jax.data.images import read_image

volume = np.stack([read_image(clinic / r["image"]) for r in train_rows[:6]])
np.save(WORK / "visit_volume.npy", volume)
rows = [{"image": str(clinic / r["image"]), "report": r["report"], "id": r["id"], "slice": ""} for r in train_rows[6:]]
rows.append({"image": str(WORK / "visit_volume.npy"), "report": "small drusen, no subretinal fluid.", "id": "",
             "slice": "*"})
with open(WORK / "train.csv", "w", newline="") as f:
  writer = csv.DictWriter(f, fieldnames=["image", "report", "id", "slice"])
  writer.writeheader()
  writer.writerows(rows + [{"image": str(WORK / "lost.png"), "report": "normal", "id": "", "slice": ""}])
check = subprocess.run([sys.executable, "-m", "retfiner_jax.data.check", str(WORK / "train.csv")],
                       capture_output=True, text=True)
print(check.stdout)
assert check.returncode == 1  # The missing file is a problem: the checker names its row and path.

# %% [markdown]
# Dropping the bad row, the manifest is usable:

# %%
with open(WORK / "train.csv", "w", newline="") as f:
  writer = csv.DictWriter(f, fieldnames=["image", "report", "id", "slice"])
  writer.writeheader()
  writer.writerows(rows)
sh("-m", "retfiner_jax.data.check", WORK / "train.csv")

# %% [markdown]
# ## 3. Refine
#
# The demo's config (a small RETFound-shaped ViT and BERT) starts from the converted FM and trains on the four
# objectives: image-text contrastive, matching with hard negatives, masked and causal ("generative") masked
# language modelling. The run writes its metrics, Orbax checkpoints and an export into its workdir, and resumes
# where it stopped if interrupted. From a shell the same run is
# `python -m retfiner_jax.main --config=configs/demo.py --config.weights.vision=... --workdir=...`.

# %%
from retfiner_jax.refine import trainer

refine = configs.load("demo")
refine.tokenizer = str(vocab)
refine.model.vocab_size = len(vocab.read_text().splitlines())
refine.weights.vision = str(WORK / "weights" / "fm")
refine.data.train_manifest = str(WORK / "train.csv")
refine.data.val_manifest = str(clinic / "manifest_val.csv")
refine.train.epochs = 4
refine.train.log_every = 5
summary = trainer.run(refine, WORK / "refine", log=print)
print({k: summary[k] for k in ("status", "steps", "best_val_loss")})

# %% [markdown]
# ## 4. Training curves
#
# Every training step and validation pass is a line of `WORKDIR/metrics.jsonl` (also in TensorBoard's format).

# %%
metrics = [json.loads(line) for line in (WORK / "refine" / "metrics.jsonl").read_text().splitlines()]
train = [m for m in metrics if m.get("kind") == "train"]
val = [m for m in metrics if m.get("kind") == "val"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name in ("itc", "itm", "mlm", "gm"):
  axes[0].plot([m["step"] for m in train], [m[f"loss_{name}"] for m in train], label=name)
axes[0].set(xlabel="step", ylabel="training loss", title="the four objectives")
axes[0].legend()
axes[1].plot([m["step"] for m in val], [m["loss"] for m in val], "o-")
axes[1].set(xlabel="step", ylabel="validation loss", title="validation (early stopping watches it)")
fig.tight_layout()
fig.savefig(WORK / "curves.png", dpi=90)
plt.close(fig)
display(Image(filename=str(WORK / "curves.png")))

# %% [markdown]
# ## 5. Probe before and after
#
# The linear probe trains a head on frozen features of each encoder, on the other site's labelled B-scans
# (ImageFolder layout `train/val/test/<class>/`), and writes a comparison plot. The paper's protocol is the
# default; the features protocol used here computes the features once, which suits a CPU.

# %%
from retfiner_jax.probe import run as probe_run

probe = configs.load("probe")
probe.encoder = f"before={WORK / 'weights' / 'fm'},after={WORK / 'refine'}"
probe.data.root = f"fluid={site / 'tasks' / 'fluid'}"
probe.workdir = str(WORK / "probe")
probe.probe.update(protocol="features", seeds=(0, 1), batch_size=64, learning_rate=3e-3, class_balanced=True)
results = probe_run.run(probe, log=print)
for encoder, r in results["fluid"].items():
  print(f"{encoder}: balanced accuracy {100 * r['bacc']['mean']:.1f} ± {100 * r['bacc']['std']:.1f}")
display(Image(filename=str(WORK / "probe" / "comparison.png")))

# %% [markdown]
# ## 6. Zero-shot from prompts
#
# The refined model's text side scores each B-scan against phrases describing each class, with no labels at
# all: the class whose prompts are most similar (ITC) wins.

# %%
from retfiner_jax.probe.metrics import classification_metrics
from retfiner_jax.textside.api import RetFinerModel
from retfiner_jax.textside.zeroshot import dataset_items

model = RetFinerModel.load(WORK / "refine", tokenizer=str(vocab))
images, labels, classes = dataset_items(site / "tasks" / "fluid")
prompts = {c: synthetic.ZERO_SHOT_PROMPTS["fluid"][c] for c in classes}
print(prompts)
probabilities, _ = model.zero_shot(images, prompts)
print(f"zero-shot balanced accuracy {100 * classification_metrics(labels, probabilities)['bacc']:.1f} % "
      f"(chance {100 / len(classes):.1f} %)")

# %% [markdown]
# ## 7. Retrieval
#
# Reports ranked for each B-scan and B-scans for each report, over the clinic's validation pairs: the ITC
# similarity short-lists, and the matching head re-ranks each query's top K (BLIP's score, ITM logit + ITC).

# %%
from retfiner_jax.textside import retrieval

ranking = retrieval.run(model, clinic / "manifest_val.csv", WORK / "retrieval", itm_top_k=16, log=print)

# %% [markdown]
# ## 8. Where the words look
#
# For a B-scan and a report: the cross-attention over the image (mean over heads and layers) for all tokens, the
# matching head's Grad-CAM map, then each token's raw attention and Grad-CAM panels, each labelled which it is.

# %%
from retfiner_jax.textside import explain

with open(clinic / "manifest_val.csv") as f:
  pair = next(csv.DictReader(f))
explain.run(model, [clinic / pair["image"]], [pair["report"]], WORK / "explain.png", tokens=3, log=print)
display(Image(filename=str(WORK / "explain.png")))
