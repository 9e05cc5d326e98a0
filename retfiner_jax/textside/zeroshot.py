"""Zero-shot classification with the refined model's text side: each class is described by report-like
prompts, and a B-scan goes to the class whose prompts' mean embedding is most similar to its own.

  python -m retfiner_jax.zeroshot --model=runs/retfound --data=datasets/OCTID --workdir=runs/zeroshot \
      [--prompts=prompts.json] [--itm]

--model: a training workdir, a converted whole-model folder or RetFiner's Lightning checkpoint (with --variant).
--data: an ImageFolder dataset (its test split; or every image when the root holds the class folders itself)
or a TFDS folder built from one. --prompts: {"class": ["prompt", ...]}; without it, prompts are made from the
class folder names with a few report-style templates (`TEMPLATES`). --itm: scores from the image-text matching
head instead (the mean ITM probability over a class's prompts, normalised over classes). Writes the probe's
outputs: results.json/csv/md and a confusion matrix, plus predictions.csv.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from retfiner_jax.data.images import IMAGE_SUFFIXES
from retfiner_jax.errors import ConfigError, MissingInput

TEMPLATES = ("{}", "oct b-scan showing {}", "findings: {}.")


def default_prompts(classes) -> dict:
  return {c: [t.format(c.replace("_", " ")) for t in TEMPLATES] for c in classes}


def read_prompts(path, classes) -> dict:
  path = Path(path)
  if not path.exists():
    raise MissingInput(f"--prompts {path}: file not found")
  try:
    prompts = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"--prompts {path}: not JSON ({e})") from e
  if not isinstance(prompts, dict) or not all(isinstance(v, list) and v and all(isinstance(t, str) for t in v)
                                              for v in prompts.values()):
    raise ConfigError(f'--prompts {path}: expected {{"class": ["prompt", ...], ...}}')
  missing, unknown = sorted(set(classes) - set(prompts)), sorted(set(prompts) - set(classes))
  if missing or unknown:
    raise ConfigError(f"--prompts {path}: classes without prompts {missing}, prompts for unknown classes {unknown} "
                      f"(the dataset's classes: {list(classes)})")
  return {c: prompts[c] for c in classes}


def dataset_items(root) -> tuple[list, np.ndarray, list[str]]:
  """-> (images, labels, class names): the test split, or every image of root/<class>/."""
  from retfiner_jax.probe.folders import is_built_dataset, read_image_folder
  root = Path(root)
  if not root.exists():
    raise MissingInput(f"--data {root}: no such folder")
  if (root / "train").is_dir() or (root / "test").is_dir() or is_built_dataset(root):
    splits, classes = read_image_folder(root)
    items = splits["test"]
  else:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
  if len(classes) < 2 or not items:
    raise ConfigError(f"--data {root}: needs images of at least two classes")
  return [p for p, _ in items], np.array([y for _, y in items]), classes


def itm_scores(model, images, prompts: dict) -> np.ndarray:
  """(N, classes): mean ITM probability of each image with each class's prompts, normalised over classes."""
  texts = [t for class_prompts in prompts.values() for t in class_prompts]
  each = model.match_every_text(model.preprocess(images), texts)  # (N, prompts), one pass of each image.
  ends = np.cumsum([len(v) for v in prompts.values()])
  scores = np.stack([each[:, end - len(v):end].mean(1) for end, v in zip(ends, prompts.values())], axis=1)
  return scores / scores.sum(-1, keepdims=True)


def run(model, data, workdir, prompts_path=None, itm: bool = False, log=print) -> dict:
  from retfiner_jax.probe.metrics import classification_metrics, summarise
  from retfiner_jax.probe.run import write_outputs
  images, labels, classes = dataset_items(data)
  prompts = read_prompts(prompts_path, classes) if prompts_path else default_prompts(classes)
  log(f"{data}: {len(images)} images, classes {classes}; {'ITM' if itm else 'ITC'} scores")
  probs = itm_scores(model, images, prompts) if itm else model.zero_shot(images, prompts)[0]
  summary = summarise([classification_metrics(labels, probs)])
  summary.update(protocol="zero_shot_itm" if itm else "zero_shot", classes=len(classes), prompts=prompts)
  name = Path(data).name
  workdir = Path(workdir)
  write_outputs(workdir, {name: {"zero_shot": summary}}, {(name, "zero_shot"): ([probs], labels, classes)}, log)
  with (workdir / "predictions.csv").open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "label", "predicted"] + [f"p_{c}" for c in classes])
    for image, y, p in zip(images, labels, probs):
      w.writerow([image, classes[y], classes[int(p.argmax())]] + [f"{v:.5f}" for v in p])
  log(f"{name}: zero-shot balanced accuracy {100 * summary['bacc']['mean']:.1f} (chance {100 / len(classes):.1f}), "
      f"AUROC {summary['auroc']['mean']:.3f}")
  return summary


def main(argv=None):
  from retfiner_jax.textside import api
  p = api.command_parser(__doc__)
  p.add_argument("--data", required=True)
  p.add_argument("--prompts")
  p.add_argument("--itm", action="store_true", help="score with the ITM head instead of the ITC embeddings")
  api.run_command(p, argv, lambda model, a: run(model, a.data, a.workdir, a.prompts, a.itm))


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
