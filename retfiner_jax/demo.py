"""The demo: the paper's story, from nothing, on one CPU in minutes.

  python -m retfiner_jax.demo --workdir=runs/demo [--seeds=3] [--config=configs/demo.py] [--config.x=value ...]

1. Generates two synthetic corpora (data/synthetic.py) into WORKDIR/data, unless they are there: the
   refinement corpus, a clinic's B-scans with its reports (train and val patients), and the probe corpus,
   another site's labelled B-scans (its own patients, another device: synthetic.SITES). No image is in both
   (checked by pixel content and printed). How much the reports say about each probe label is measured (a
   bag-of-words logistic regression, data/report_coupling.py) and printed.
2. Builds a WordPiece vocabulary from the refinement corpus's training reports, laid out like
   bert-base-uncased's ([PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103, learnt pieces from 106).
3. Stage 1, the FM: MAE pretraining of the small ViT on the refinement corpus's training B-scans alone.
4. Stage 2: RetFiner refinement of that FM with the reports (refine/trainer.py).
5. Control: the FM trained further by MAE alone, on as many images as stage 2 saw (image passes), with its
   own seed (masks, order, augmentation) and a fresh schedule, as stage 2 has.
6. Linear-probes the randomly initialised encoder, the MAE FM, MAE + RetFiner and MAE + more MAE on the probe
   corpus's finding tasks, and scores the refined model zero-shot from prompts there.
7. Prints the comparison; writes WORKDIR/results.json and WORKDIR/results.png.
With --seeds=N, steps 3-6 run N times (WORKDIR/seed_<k>/), the corpora fixed and every stage's seed varied
(run k: FM seed + 100k, refinement + 100k + 1, control + 100k + 2, probe seeds + 100k), and each row and gain is
reported as mean +- sample std over the runs. Every stage's result is kept in WORKDIR: a rerun after an
interruption resumes where it stopped.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from retfiner_jax.data import synthetic
from retfiner_jax.data.images import read_image
from retfiner_jax.data.report_coupling import report_to_label_bacc
from retfiner_jax.errors import ConfigError, run_reporting_user_errors
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


def probe_all(cfg, vision_params, probe_dir: Path, tasks, settings, log):
  results = {}
  for task in tasks:
    summary, *_ = probe_dataset(cfg, vision_params, probe_dir / "tasks" / task, settings, log=log)
    results[task] = {m: summary[m]["mean"] for m in ("bacc", "auroc")}
    results[task]["bacc_std"] = summary["bacc"]["std"]
  return results


def zero_shot_all(model, probe_dir: Path, tasks, log=print) -> dict:
  """Zero-shot balanced accuracy and AUROC on each task's test split, with prompts in the reports' vocabulary."""
  from retfiner_jax.probe.metrics import classification_metrics
  from retfiner_jax.textside.zeroshot import dataset_items
  results = {}
  for task in tasks:
    images, labels, classes = dataset_items(probe_dir / "tasks" / task)
    prompts = synthetic.ZERO_SHOT_PROMPTS[task]
    probs, _ = model.zero_shot(images, {c: prompts[c] for c in classes})
    m = classification_metrics(labels, probs)
    results[task] = {"bacc": m["bacc"], "auroc": m["auroc"], "classes": len(classes)}
    log(f"{task}: zero-shot balanced accuracy {100 * m['bacc']:.1f}% (chance {100 / len(classes):.1f}%)")
  return results


ENCODERS = (("random", "random init", "#cccccc"), ("before", "MAE FM", "#999999"),
            ("after", "MAE + RetFiner", "#1f77b4"), ("control", "MAE + more MAE", "#ff7f0e"))
GAINS = (("after_vs_before", "after", "before"), ("after_vs_control", "after", "control"),
         ("before_vs_random", "before", "random"))


def plot(tasks: dict, path: Path):
  """Bars of each encoder's probe balanced accuracy per task, with the spread over seeds where there is one."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(tasks)
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(2.4 * len(names) + 2, 3.8))
  width = 0.8 / len(ENCODERS)
  for i, (key, label, colour) in enumerate(ENCODERS):
    std = [100 * (tasks[t][key].get("bacc_std") or 0) for t in names]
    ax.bar(x + (i - (len(ENCODERS) - 1) / 2) * width, [100 * tasks[t][key]["bacc"] for t in names], width,
           yerr=std if any(std) else None, capsize=2, label=label, color=colour)
  ax.set_xticks(x, names)
  ax.set_ylabel("balanced accuracy (%)")
  ax.set_ylim(0, 100)
  runs = tasks[names[0]]["after"].get("runs", 1)
  ax.set_title("Linear probe of the vision encoder" + (f" (mean and std of {runs} seeds)" if runs > 1 else ""))
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def cached_json(path: Path, what: str, compute, log):
  """The results in `path` if an earlier run wrote them, else computes and writes them."""
  if path.exists():
    return json.loads(path.read_text())
  log(what)
  results = compute()
  path.write_text(json.dumps(results, indent=1))
  return results


def stage_seeds(config, run: int) -> dict:
  """Each stage's seed in run `run` of --seeds: its own stream per stage (the control draws masks, data order and
  augmentation of its own, not stage 1's again), and per run."""
  base = config.seed + 100 * run
  return {"fm": base, "refinement": base + 1, "control": base + 2,
          "probe": tuple(int(s) + 100 * run for s in config.demo.probe.seeds)}


def mae_stage(config, workdir: Path, manifest: Path, seed: int, init: str = "", max_steps: int = -1,
              log=print) -> dict:
  """MAE pretraining with the demo's `config.demo.mae` on `manifest`'s images, the demo's model, seed `seed`."""
  c = config.demo.mae.copy_and_resolve_references()  # A copy: the refinement saves the demo's config as given.
  with c.unlocked():
    c.model = config.model
    c.seed = seed
    c.compile_cache = config.compile_cache
    c.data.train_manifest = str(manifest)
    c.init = init
    c.train.max_steps = max_steps
  return mae_trainer.run(c, workdir, log)


def pixel_digests(folder: Path) -> dict:
  """sha256 of each image's decoded pixels (and shape) under `folder`: {digest: path}."""
  digests = {}
  for path in sorted(folder.rglob("*.png")):
    a = np.ascontiguousarray(read_image(path))
    digests.setdefault(hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest(), path)
  return digests


def shared_images(refinement_images: Path, probe_roots) -> int:
  """How many distinct images (by pixel content) are both among the refinement's and in any probe dataset."""
  refinement = pixel_digests(refinement_images)
  probe = {}
  for root in probe_roots:
    probe.update(pixel_digests(Path(root)))
  return len(set(refinement) & set(probe))


def read_csv(path: Path) -> list:
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


def prepare_corpora(config, workdir: Path, log=print) -> dict:
  """The two corpora (generated unless there), their disjointness and the reports' coupling to the probe labels:
  the `corpus` block of results.json (cached in WORKDIR/data/corpus.json)."""
  d = config.demo
  data = workdir / "data"
  refinement, probe = data / "refinement", data / "probe"
  for folder, what, count, site, seed, splits in (
      (refinement, "refinement corpus (a clinic's B-scans and reports)", d.refinement_count, "clinic",
       d.corpus_seed, d.refinement_splits),
      (probe, "probe corpus (another site's labelled B-scans)", d.probe_count, "probe", d.corpus_seed + 1,
       d.probe_splits)):
    if not (folder / "DONE").exists():
      log(f"generating the {what}: {count} images in {folder}")
      synthetic.generate(folder, count, seed, d.image_height, d.image_height, log=log, site=site,
                         splits=tuple(splits))

  def measure():
    probe_roots = {task: str(probe / "tasks" / task) for task in d.tasks}
    shared = shared_images(refinement / "images", probe_roots.values())
    rows = [r for r in read_csv(refinement / "labels.csv") if r["split"] in ("train", "val")]
    reports = {r["image"]: r["report"] for r in read_csv(refinement / "manifest.csv")}
    coupling = {}
    for task in d.tasks:
      label_of = synthetic.TASKS[task]
      labels = [label_of({k: (v == "1" if k in synthetic.FINDINGS else v) for k, v in r.items()}) for r in rows]
      coupling[task] = report_to_label_bacc([reports[r["image"]] for r in rows], labels)
    counts = {name: {split: sum(r["split"] == split for r in read_csv(folder / "manifest.csv"))
                     for split in ("train", "val", "test")} for name, folder in (("refinement", refinement),
                                                                                ("probe", probe))}
    return {"refinement_manifest": str(refinement / "manifest_train.csv"),
            "refinement_val_manifest": str(refinement / "manifest_val.csv"),
            "probe_roots": probe_roots, "shared_images": shared, "report_to_label_bacc": coupling,
            "counts": counts, "sites": {"refinement": "clinic", "probe": "probe"}}

  corpus = cached_json(data / "corpus.json", "checking the corpora: shared images by pixel content, and how much "
                       "the reports say about each probe label", measure, log)
  if corpus["shared_images"]:
    raise ConfigError(f"{corpus['shared_images']} image(s) are both in the refinement corpus ({refinement}) and in "
                      f"the probe's datasets ({probe}): the probe would not measure transfer")
  log(f"corpora: {corpus['counts']['refinement']['train']} + {corpus['counts']['refinement']['val']} refinement "
      f"pairs (train + val), probe train/val/test {corpus['counts']['probe']['train']}/"
      f"{corpus['counts']['probe']['val']}/{corpus['counts']['probe']['test']}; no image is in both (by pixel "
      f"content). Report -> label, bag-of-words logistic regression, 5-fold balanced accuracy on the refinement "
      f"corpus: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in corpus["report_to_label_bacc"].items()))
  return corpus


def run_seed(config, workdir: Path, corpus: dict, vocab: Path, run: int, runs: int, log=print) -> dict:
  """Stages 1-6 with run `run`'s seeds in `workdir` (resumable): the probe rows, zero-shot and counts."""
  d = config.demo
  seeds = stage_seeds(config, run)
  say = (lambda m: log(f"[seed {run + 1}/{runs}] {m}")) if runs > 1 else log
  done = workdir / "results.json"
  if done.exists():
    say(f"results from {done}")
    return json.loads(done.read_text())
  train_manifest = Path(corpus["refinement_manifest"])
  probe_dir = Path(next(iter(corpus["probe_roots"].values()))).parent.parent
  say(f"stage 1, the FM: MAE pretraining on the refinement corpus's B-scans (no reports), seed {seeds['fm']}")
  fm = mae_stage(config, workdir / "mae", train_manifest, seeds["fm"], log=log)
  if fm["status"] != "finished":
    return fm
  refine_config = config.copy_and_resolve_references()
  with refine_config.unlocked():
    refine_config.seed = seeds["refinement"]
    refine_config.tokenizer = str(vocab)
    refine_config.model.vocab_size = len(vocab.read_text().splitlines())
    refine_config.data.train_manifest = str(train_manifest)
    refine_config.data.val_manifest = corpus["refinement_val_manifest"]
    refine_config.weights.vision = fm["exported"]["vision_flax"]
  cfg = trainer.model_config(refine_config)
  settings = ProbeSettings(**{**d.probe.to_dict(), "seeds": seeds["probe"]}).for_backbone(cfg.backbone)
  probe = lambda vision: probe_all(cfg, vision, probe_dir, d.tasks, settings, log)

  # The random encoder: the very initialisation the refinement's model gets (same seed) before the FM is loaded.
  random_init = lambda: jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(seeds["refinement"]))
  probes = {"random": cached_json(workdir / "probe_random.json", "probing the randomly initialised encoder",
                                  lambda: probe(random_init()["vision_encoder"]), log)}
  load_vision = lambda folder: weight_files.load_converted(folder)[1]["vision_encoder"]
  probes["before"] = cached_json(workdir / "probe_mae_fm.json", "probing the MAE FM",
                                 lambda: probe(load_vision(fm["exported"]["vision_flax"])), log)

  say(f"stage 2: RetFiner refinement of the MAE FM with the reports, seed {seeds['refinement']}")
  summary = trainer.run(refine_config, workdir / "refine", log)
  if summary["status"] != "finished":
    return summary
  _, refined, _ = weight_files.load_converted(summary["exported"]["retfiner_flax"])
  probes["after"] = cached_json(workdir / "probe_refined.json", "probing the refined encoder",
                                lambda: probe(refined["vision_encoder"]), log)
  zero_shot = cached_json(workdir / "zero_shot.json", "zero-shot from prompts on the probe corpus",
                          lambda: zero_shot_all(RetFinerModel(cfg, refined, str(vocab)), probe_dir, d.tasks, log), log)

  images = summary["steps"] * config.train.batch_size  # Image passes of stage 2.
  control_steps = -(-images // d.mae.train.batch_size)
  say(f"control: MAE alone for as many images as the refinement saw ({images} = {control_steps} MAE steps), "
      f"seed {seeds['control']}")
  more = mae_stage(config, workdir / "mae_control", train_manifest, seeds["control"], init=str(workdir / "mae"),
                   max_steps=control_steps, log=log)
  if more["status"] != "finished":
    return more
  probes["control"] = cached_json(workdir / "probe_control.json", "probing the MAE-only control",
                                  lambda: probe(load_vision(more["exported"]["vision_flax"])), log)
  results = {"status": "finished", "seeds": {k: list(v) if isinstance(v, tuple) else v for k, v in seeds.items()},
             "tasks": {t: {**{key: {"bacc": probes[key][t]["bacc"], "auroc": probes[key][t]["auroc"]}
                              for key, *_ in ENCODERS}, "zero_shot": zero_shot[t]} for t in d.tasks},
             "refinement": {k: summary[k] for k in ("steps", "epochs", "best_val_loss", "samples_per_second")},
             "mae": {"fm_steps": fm["steps"], "fm_images": fm["images_seen"], "control_images": images,
                     "control_steps": control_steps}}
  done.write_text(json.dumps(results, indent=1))
  return results


def _mean_std(values) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None}


def aggregate(per_seed: list, tasks) -> tuple:
  """(tasks block, gains block) over the runs: each row's bacc (the mean), bacc_mean and bacc_std (sample std;
  None for one run), auroc (mean); each gain (bacc difference, a fraction) per task and averaged over tasks."""
  rows = {}
  for t in tasks:
    rows[t] = {}
    for key in [k for k, *_ in ENCODERS] + ["zero_shot"]:
      bacc = _mean_std([r["tasks"][t][key]["bacc"] for r in per_seed])
      rows[t][key] = {"bacc": bacc["mean"], "bacc_mean": bacc["mean"], "bacc_std": bacc["std"],
                      "auroc": float(np.mean([r["tasks"][t][key]["auroc"] for r in per_seed])),
                      "runs": len(per_seed)}
    rows[t]["zero_shot"]["classes"] = per_seed[0]["tasks"][t]["zero_shot"]["classes"]
  gains = {}
  for t in list(tasks) + ["average"]:
    over = list(tasks) if t == "average" else [t]
    gains[t] = {name: _mean_std([np.mean([r["tasks"][u][a]["bacc"] - r["tasks"][u][b]["bacc"] for u in over])
                                 for r in per_seed]) for name, a, b in GAINS}
  return rows, gains


def _pm(row: dict, scale=100.0) -> str:
  mean, std = row["mean"] if "mean" in row else row["bacc_mean"], row.get("std", row.get("bacc_std"))
  return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if std is not None else "")


def run(config, workdir, seeds: int = 1, log=print) -> dict:
  start = time.time()
  workdir = Path(workdir)
  d = config.demo
  if seeds < 1:
    raise ConfigError(f"--seeds must be 1 or more, got {seeds}")
  corpus = prepare_corpora(config, workdir, log)
  vocab = workdir / "vocab" / "vocab.txt"
  if not vocab.exists():
    build_vocab([r["report"] for r in read_csv(Path(corpus["refinement_manifest"]))], d.vocab_size, vocab)
  per_seed = []
  for k in range(seeds):
    result = run_seed(config, workdir / f"seed_{k}", corpus, vocab, k, seeds, log)
    if result.get("status") != "finished":
      log("interrupted; rerun the same command to resume")
      return result
    per_seed.append(result)
  tasks, gains = aggregate(per_seed, d.tasks)
  results = {"corpus": corpus, "runs": seeds, "tasks": tasks, "gains": gains,
             "per_seed": per_seed, "wall_seconds": time.time() - start}
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  plot(tasks, workdir / "results.png")
  spread = f" (mean ± sample std over {seeds} seeds)" if seeds > 1 else " (one seed)"
  log(f"\nlinear-probe balanced accuracy (%) on the probe corpus, and zero-shot of the refined model{spread}")
  width = 16 if seeds == 1 else 17
  log(f"{'task':<12}" + "".join(f"{label:>{width}}" for _, label, _ in ENCODERS) + f"{'zero-shot':>{width}}"
      f"{'chance':>8}")
  for t, v in tasks.items():
    log(f"{t:<12}" + "".join(f"{_pm(v[key]):>{width}}" for key, *_ in ENCODERS) + f"{_pm(v['zero_shot']):>{width}}"
        f"{100 / v['zero_shot']['classes']:>8.1f}")
  for t, g in gains.items():
    if t == "average" and len(gains) == 2:
      continue  # One task: its own line says it.
    log(f"gain ({t}): MAE + RetFiner vs the MAE FM {_pm(g['after_vs_before'])} points, vs MAE + more MAE "
        f"{_pm(g['after_vs_control'])}; the MAE FM vs random init {_pm(g['before_vs_random'])}")
  log(f"{results['wall_seconds']:.0f} s in all; results in {workdir / 'results.json'} and results.png")
  return results


_CONFIG = config_flags.DEFINE_config_file("config", None, "the demo's config (default: demo, in configs/)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "the demo's folder: data, refinement run, results; reused "
                               "to resume")
_SEEDS = flags.DEFINE_integer("seeds", 1, "runs of the whole pipeline (FM, refinement, control, probe), each with "
                              "its own seeds, on the same corpora; rows and gains as mean +- std")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO.
  log = functools.partial(print, flush=True)
  compile_cache.enable(_CONFIG.value.compile_cache, log)
  run_reporting_user_errors(run, _CONFIG.value, _WORKDIR.value, _SEEDS.value, log)


def cli():
  """The console script's entry point."""
  from retfiner_jax import cli as command_line
  command_line.run(main, default_config="demo")


if __name__ == "__main__":
  cli()
