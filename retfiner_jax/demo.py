"""The demo: everything from nothing on one CPU in minutes.

  python -m retfiner_jax.demo --workdir=runs/demo [--config=configs/demo.py] [--config.x=value ...]

1. Generates the synthetic OCT–report corpus (data/synthetic.py) into WORKDIR/data, unless it is there.
2. Trains a WordPiece vocabulary on the training reports (the `tokenizers` package), laid out like
   bert-base-uncased's ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103, learnt pieces from 106).
3. Linear-probes the unrefined (randomly initialised) vision encoder on the synthetic finding tasks.
4. Refines it with RetFiner's four objectives (train.py), then probes the refined encoder the same way.
5. Prints a before/after table; writes WORKDIR/results.json and WORKDIR/results.png.
"""
from __future__ import annotations

import csv
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from retfiner_jax import compile_cache, train, weights
from retfiner_jax.api import RetFinerModel
from retfiner_jax.data import synthetic
from retfiner_jax.errors import run_reporting_user_errors
from retfiner_jax.models.retfiner import init_params
from retfiner_jax.probe.run import probe_dataset
from retfiner_jax.probe.settings import ProbeSettings


SPECIAL = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                              "[unused99]", "[unused100]"]


def build_vocab(reports, size: int, path: Path) -> Path:
  """A WordPiece vocabulary of the reports in bert-base-uncased's id layout (specials keep their ids), built
  deterministically: every character, alone and as a `##` continuation (so no word is unknown), then the most
  frequent whole words (ties in alphabetical order) up to `size` entries. (The `tokenizers` trainer breaks ties
  differently from run to run, which changed the demo's vocabulary, and so its results, between identical runs.)"""
  from collections import Counter

  from tokenizers.normalizers import BertNormalizer
  from tokenizers.pre_tokenizers import BertPreTokenizer
  normalise, split = BertNormalizer(lowercase=True), BertPreTokenizer()
  counts = Counter(word for report in reports
                   for word, _ in split.pre_tokenize_str(normalise.normalize_str(report)))
  chars = sorted({c for word in counts for c in word})
  pieces = [p for p in chars + ["##" + c for c in chars] if p not in SPECIAL]
  room = max(size - len(SPECIAL) - len(pieces), 0)
  words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:room]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(SPECIAL + pieces + words) + "\n")
  return path


def probe_all(cfg, vision_params, data_dir: Path, tasks, settings, log):
  results = {}
  for task in tasks:
    summary, *_ = probe_dataset(cfg, vision_params, data_dir / "tasks" / task, settings, log=log)
    results[task] = {m: summary[m]["mean"] for m in ("bacc", "auroc")}
    results[task]["bacc_std"] = summary["bacc"]["std"]
  return results


def zero_shot_all(model, data_dir: Path, tasks, log=print) -> dict:
  """Zero-shot balanced accuracy and AUROC on each task's test split, with prompts in the reports' phrasing."""
  from retfiner_jax.probe.metrics import classification_metrics
  from retfiner_jax.zeroshot import dataset_items
  results = {}
  for task in tasks:
    images, labels, classes = dataset_items(data_dir / "tasks" / task)
    prompts = synthetic.ZERO_SHOT_PROMPTS[task]
    probs, _ = model.zero_shot(images, {c: prompts[c] for c in classes})
    m = classification_metrics(labels, probs)
    results[task] = {"bacc": m["bacc"], "auroc": m["auroc"], "classes": len(classes)}
    log(f"{task}: zero-shot balanced accuracy {100 * m['bacc']:.1f}% (chance {100 / len(classes):.1f}%)")
  return results


def plot(results, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(results)
  x = np.arange(len(tasks))
  fig, ax = plt.subplots(figsize=(1.8 * len(tasks) + 2, 3.6))
  for offset, when, colour in ((-0.2, "before", "#999999"), (0.2, "after", "#1f77b4")):
    ax.bar(x + offset, [100 * results[t][when]["bacc"] for t in tasks], 0.4, label=f"{when} refinement",
           color=colour)
  ax.set_xticks(x, tasks)
  ax.set_ylabel("balanced accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Linear probe of the vision encoder, before and after RetFiner")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def run(config, workdir, log=print) -> dict:
  start = time.time()
  workdir = Path(workdir)
  data_dir = workdir / "data"
  d = config.demo
  if not (data_dir / "DONE").exists():
    log(f"generating the synthetic OCT–report corpus ({d.count} images) in {data_dir}")
    synthetic.generate(data_dir, d.count, config.seed, d.image_height, d.image_height, log=log)
  vocab = workdir / "vocab" / "vocab.txt"
  if not vocab.exists():
    with (data_dir / "manifest_train.csv").open() as f:
      build_vocab([r["report"] for r in csv.DictReader(f)], d.vocab_size, vocab)
  with config.unlocked():
    config.tokenizer = str(vocab)
    config.model.vocab_size = len(vocab.read_text().splitlines())
    config.data.train_manifest = str(data_dir / "manifest_train.csv")
    config.data.val_manifest = str(data_dir / "manifest_val.csv")
  cfg = train.model_config(config)
  settings = ProbeSettings(**d.probe).for_backbone(cfg.backbone)

  before_path = workdir / "probe_before.json"
  if before_path.exists():
    before = json.loads(before_path.read_text())
  else:  # The unrefined encoder: the very parameters training starts from (same seed).
    params = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(config.seed))
    log("probing the unrefined vision encoder")
    before = probe_all(cfg, params["vision_encoder"], data_dir, d.tasks, settings, log)
    before_path.write_text(json.dumps(before, indent=1))

  summary = train.run(config, workdir / "refine", log)
  if summary["status"] != "finished":
    log("refinement was interrupted; rerun the same command to resume")
    return summary
  _, refined, _ = weights.load_converted(summary["exported"]["retfiner_flax"])
  log("probing the refined vision encoder")
  after = probe_all(cfg, refined["vision_encoder"], data_dir, d.tasks, settings, log)
  zero_shot = zero_shot_all(RetFinerModel(cfg, refined, str(vocab)), data_dir, d.tasks, log)

  tasks = {t: {"before": {"bacc": before[t]["bacc"], "auroc": before[t]["auroc"]},
               "after": {"bacc": after[t]["bacc"], "auroc": after[t]["auroc"]}, "zero_shot": zero_shot[t]}
           for t in d.tasks}
  results = {"tasks": tasks, "wall_seconds": time.time() - start,
             "mean_bacc_gain_points": float(np.mean([100 * (v["after"]["bacc"] - v["before"]["bacc"])
                                                     for v in tasks.values()])),
             "refinement": {k: summary[k] for k in ("steps", "epochs", "best_val_loss", "samples_per_second")}}
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  plot(tasks, workdir / "results.png")
  log(f"\n{'task':<12}{'bacc before':>12}{'bacc after':>12}{'auroc before':>14}{'auroc after':>13}"
      f"{'zero-shot bacc':>16}{'chance':>8}")
  for t, v in tasks.items():
    log(f"{t:<12}{100 * v['before']['bacc']:>11.1f}%{100 * v['after']['bacc']:>11.1f}%"
        f"{v['before']['auroc']:>14.3f}{v['after']['auroc']:>13.3f}"
        f"{100 * v['zero_shot']['bacc']:>15.1f}%{100 / v['zero_shot']['classes']:>7.1f}%")
  log(f"mean balanced-accuracy gain {results['mean_bacc_gain_points']:+.1f} points; "
      f"{results['wall_seconds']:.0f} s in all; results in {workdir / 'results.json'} and results.png")
  return results


_CONFIG = config_flags.DEFINE_config_file("config", None, "the demo's config (default: demo, in configs/)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "the demo's folder: data, refinement run, results; reused "
                               "to resume")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO.
  log = functools.partial(print, flush=True)
  compile_cache.enable(_CONFIG.value.compile_cache, log)
  run_reporting_user_errors(run, _CONFIG.value, _WORKDIR.value, log)


def cli():
  """The console script's entry point."""
  from retfiner_jax import cli as command_line
  command_line.run(main, default_config="demo")


if __name__ == "__main__":
  cli()
