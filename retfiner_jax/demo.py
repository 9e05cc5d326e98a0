"""The demo: the paper's story, from nothing, on one CPU in minutes.

  python -m retfiner_jax.demo --workdir=runs/demo [--config=configs/demo.py] [--config.x=value ...]

1. Generates the synthetic OCT–report corpus (data/synthetic.py) into WORKDIR/data, unless it is there.
2. Trains a WordPiece vocabulary on the training reports (the `tokenizers` package), laid out like
   bert-base-uncased's ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103, learnt pieces from 106).
3. Stage 1, the FM: MAE pretraining of the small ViT on the training split's B-scans alone (mae/trainer.py).
4. Stage 2: RetFiner refinement of that FM with the reports (refine/trainer.py).
5. Control: the FM trained further by MAE alone, on as many images as stage 2 saw (image passes).
6. Linear-probes the randomly initialised encoder, the MAE FM, MAE + RetFiner and MAE + more MAE on the
   synthetic finding tasks, and the refined model zero-shot from prompts.
7. Prints the four-row comparison; writes WORKDIR/results.json and WORKDIR/results.png.
Every stage's result is kept in WORKDIR: a rerun after an interruption resumes where it stopped.
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

from retfiner_jax.data import synthetic
from retfiner_jax.errors import run_reporting_user_errors
from retfiner_jax.mae import trainer as mae_trainer
from retfiner_jax.models.retfiner import init_params
from retfiner_jax.probe.run import probe_dataset
from retfiner_jax.probe.settings import ProbeSettings
from retfiner_jax.refine import trainer
from retfiner_jax.runs import compile_cache
from retfiner_jax.textside.api import RetFinerModel
from retfiner_jax.weights import files as weight_files


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
  from retfiner_jax.textside.zeroshot import dataset_items
  results = {}
  for task in tasks:
    images, labels, classes = dataset_items(data_dir / "tasks" / task)
    prompts = synthetic.ZERO_SHOT_PROMPTS[task]
    probs, _ = model.zero_shot(images, {c: prompts[c] for c in classes})
    m = classification_metrics(labels, probs)
    results[task] = {"bacc": m["bacc"], "auroc": m["auroc"], "classes": len(classes)}
    log(f"{task}: zero-shot balanced accuracy {100 * m['bacc']:.1f}% (chance {100 / len(classes):.1f}%)")
  return results


ENCODERS = (("random", "random init", "#cccccc"), ("before", "MAE FM", "#999999"),
            ("after", "MAE + RetFiner", "#1f77b4"), ("control", "MAE + more MAE", "#ff7f0e"))


def plot(results, path: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(results)
  x = np.arange(len(tasks))
  fig, ax = plt.subplots(figsize=(2.4 * len(tasks) + 2, 3.8))
  width = 0.8 / len(ENCODERS)
  for i, (key, label, colour) in enumerate(ENCODERS):
    ax.bar(x + (i - (len(ENCODERS) - 1) / 2) * width, [100 * results[t][key]["bacc"] for t in tasks], width,
           label=label, color=colour)
  ax.set_xticks(x, tasks)
  ax.set_ylabel("balanced accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Linear probe of the vision encoder")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def cached_probe(path: Path, what: str, probe, log):
  """The probe's results from `path` if an earlier run wrote them, else probes and writes them."""
  if path.exists():
    return json.loads(path.read_text())
  log(f"probing {what}")
  results = probe()
  path.write_text(json.dumps(results, indent=1))
  return results


def mae_stage(config, workdir: Path, data_dir: Path, init: str = "", max_steps: int = -1, log=print) -> dict:
  """MAE pretraining with the demo's `config.demo.mae` on the training split, the demo's model and seed."""
  c = config.demo.mae.copy_and_resolve_references()  # A copy: the refinement saves the demo's config as given.
  with c.unlocked():
    c.model = config.model
    c.seed = config.seed
    c.compile_cache = config.compile_cache
    c.data.train_manifest = str(data_dir / "manifest_train.csv")
    c.init = init
    c.train.max_steps = max_steps
  return mae_trainer.run(c, workdir, log)


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
  log("stage 1, the FM: MAE pretraining on the training B-scans (no reports)")
  fm = mae_stage(config, workdir / "mae", data_dir, log=log)
  if fm["status"] != "finished":
    log("MAE pretraining was interrupted; rerun the same command to resume")
    return fm
  with config.unlocked():
    config.tokenizer = str(vocab)
    config.model.vocab_size = len(vocab.read_text().splitlines())
    config.data.train_manifest = str(data_dir / "manifest_train.csv")
    config.data.val_manifest = str(data_dir / "manifest_val.csv")
    config.weights.vision = fm["exported"]["vision_flax"]
  cfg = trainer.model_config(config)
  settings = ProbeSettings(**d.probe).for_backbone(cfg.backbone)
  probe = lambda vision: probe_all(cfg, vision, data_dir, d.tasks, settings, log)

  # The random encoder: the very initialisation RetFiner's model gets (same seed) before the FM is loaded.
  random_init = lambda: jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(config.seed))["vision_encoder"]
  probes = {"random": cached_probe(workdir / "probe_random.json", "the randomly initialised encoder",
                                   lambda: probe(random_init()), log)}
  load_vision = lambda folder: weight_files.load_converted(folder)[1]["vision_encoder"]
  probes["before"] = cached_probe(workdir / "probe_mae_fm.json", "the MAE FM",
                                  lambda: probe(load_vision(fm["exported"]["vision_flax"])), log)

  log("stage 2: RetFiner refinement of the MAE FM with the reports")
  summary = trainer.run(config, workdir / "refine", log)
  if summary["status"] != "finished":
    log("refinement was interrupted; rerun the same command to resume")
    return summary
  _, refined, _ = weight_files.load_converted(summary["exported"]["retfiner_flax"])
  probes["after"] = cached_probe(workdir / "probe_refined.json", "the refined encoder",
                                 lambda: probe(refined["vision_encoder"]), log)
  zero_shot = zero_shot_all(RetFinerModel(cfg, refined, str(vocab)), data_dir, d.tasks, log)

  images = summary["steps"] * config.train.batch_size  # Image passes of stage 2.
  control_steps = -(-images // d.mae.train.batch_size)
  log(f"control: MAE alone for as many images as the refinement saw ({images} = {control_steps} MAE steps)")
  more = mae_stage(config, workdir / "mae_control", data_dir, init=str(workdir / "mae"), max_steps=control_steps,
                   log=log)
  if more["status"] != "finished":
    log("the control's MAE pretraining was interrupted; rerun the same command to resume")
    return more
  probes["control"] = cached_probe(workdir / "probe_control.json", "the MAE-only control",
                                   lambda: probe(load_vision(more["exported"]["vision_flax"])), log)

  tasks = {t: {**{key: {"bacc": probes[key][t]["bacc"], "auroc": probes[key][t]["auroc"]} for key, *_ in ENCODERS},
               "zero_shot": zero_shot[t]} for t in d.tasks}
  gain = lambda a, b: float(np.mean([100 * (v[a]["bacc"] - v[b]["bacc"]) for v in tasks.values()]))
  results = {"tasks": tasks, "wall_seconds": time.time() - start,
             "mean_bacc_gain_points": {"after_vs_before": gain("after", "before"),
                                       "after_vs_control": gain("after", "control"),
                                       "before_vs_random": gain("before", "random")},
             "refinement": {k: summary[k] for k in ("steps", "epochs", "best_val_loss", "samples_per_second")},
             "mae": {"fm_steps": fm["steps"], "fm_images": fm["images_seen"], "control_images": images,
                     "control_steps": control_steps}}
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  plot(tasks, workdir / "results.png")
  log("\nlinear-probe balanced accuracy (%) and zero-shot of the refined model")
  log(f"{'task':<12}" + "".join(f"{label:>16}" for _, label, _ in ENCODERS) + f"{'zero-shot':>11}{'chance':>8}")
  for t, v in tasks.items():
    log(f"{t:<12}" + "".join(f"{100 * v[key]['bacc']:>16.1f}" for key, *_ in ENCODERS)
        + f"{100 * v['zero_shot']['bacc']:>11.1f}{100 / v['zero_shot']['classes']:>8.1f}")
  g = results["mean_bacc_gain_points"]
  log(f"mean gain: MAE + RetFiner vs the MAE FM {g['after_vs_before']:+.1f} points, vs MAE + more MAE "
      f"{g['after_vs_control']:+.1f}; the MAE FM vs random init {g['before_vs_random']:+.1f}. "
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
