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
from retfiner_jax.data.vocab import build_vocab
from retfiner_jax.errors import ConfigError, run_reporting_user_errors
from retfiner_jax.mae import trainer as mae_trainer
from retfiner_jax.models.retfiner import init_params
from retfiner_jax.metrics.embeddings import mean_pairwise_cosine
from retfiner_jax.metrics.ranking import chance_recall, match_matrix, retrieval_recall
from retfiner_jax.probe.run import probe_dataset
from retfiner_jax.probe.settings import ProbeSettings
from retfiner_jax.refine import trainer
from retfiner_jax.refine.objectives import chance_values
from retfiner_jax.runs import compile_cache, whole_files
from retfiner_jax.runs.run_log import read_metrics
from retfiner_jax.textpretrain import trainer as text_pretraining
from retfiner_jax.textpretrain.objectives import TextPretrainSettings
from retfiner_jax.textside.api import RetFinerModel
from retfiner_jax.weights import files as weight_files


def probe_all(cfg, vision_params, probe_dir: Path, tasks, settings, log, tasks_folder: str = "tasks"):
  results = {}
  for task in tasks:
    summary, *_ = probe_dataset(cfg, vision_params, probe_dir / tasks_folder / task, settings, log=log)
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
INDOMAIN_ENCODERS = ("before", "after", "control")  # Probed on the clinic's own labels too.
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
  whole_files.write_json(path, results)
  return results


def stage_seeds(config, run: int) -> dict:
  """Each stage's seed in run `run` of --seeds: its own stream per stage (the control draws masks, data order and
  augmentation of its own, not stage 1's again), and per run."""
  base = config.seed + 100 * run
  return {"fm": base, "refinement": base + 1, "control": base + 2, "text": base + 3,
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
      labels = [label_of(labels_of(r)) for r in rows]
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
  corpus["indomain_root"] = str(indomain_tasks(refinement, d.tasks, d.indomain_val_fraction, log))
  if corpus["shared_images"]:
    raise ConfigError(f"{corpus['shared_images']} image(s) are both in the refinement corpus ({refinement}) and in "
                      f"the probe's datasets ({probe}): the probe would not measure transfer")
  log(f"corpora: {corpus['counts']['refinement']['train']} + {corpus['counts']['refinement']['val']} refinement "
      f"pairs (train + val), probe train/val/test {corpus['counts']['probe']['train']}/"
      f"{corpus['counts']['probe']['val']}/{corpus['counts']['probe']['test']}; no image is in both (by pixel "
      f"content). Report -> label, bag-of-words logistic regression, 5-fold balanced accuracy on the refinement "
      f"corpus: " + ", ".join(f"{t} {100 * v:.1f}%" for t, v in corpus["report_to_label_bacc"].items()))
  return corpus


def labels_of(row: dict) -> dict:
  """A labels.csv row as synthetic.TASKS takes it: findings as booleans, the condition as written."""
  return {k: (v == "1" if k in synthetic.FINDINGS else v) for k, v in row.items()}


def indomain_tasks(refinement: Path, tasks, val_fraction: float = 0.15, log=print) -> Path:
  """The clinic corpus's own labels as probe datasets (held-out patients): REFINEMENT/indomain/<task>/{train,
  val,test}/<class>/. The refinement's training patients are split by patient into the probe's train and val
  (`val_fraction` of them, seed 0: early stopping); the refinement's validation patients are the probe's test.
  Files are hard links (copies where links fail)."""
  import os
  import shutil
  root = refinement / "indomain"
  if (root / "DONE").exists():
    return root
  labels = {Path(r["image"]).name: r for r in read_csv(refinement / "labels.csv")}
  rows = read_csv(refinement / "manifest.csv")
  train_patients = sorted({r["patient"] for r in rows if r["split"] == "train"})
  held = set(np.random.default_rng(0).permutation(train_patients)[:max(1, round(val_fraction * len(train_patients)))])
  if root.exists():
    shutil.rmtree(root)  # Left by an interrupted run.
  for r in rows:
    split = {"train": "val" if r["patient"] in held else "train", "val": "test"}.get(r["split"])
    if split is None:
      continue
    name = Path(r["image"]).name
    label = labels_of(labels[name])
    for task in tasks:
      target = root / task / split / synthetic.TASKS[task](label) / name
      target.parent.mkdir(parents=True, exist_ok=True)
      source = refinement / r["image"]
      try:
        os.link(source, target)
      except OSError:
        shutil.copyfile(source, target)
  (root / "DONE").write_text("")
  log(f"in-domain probe datasets (the clinic's labels; test = the refinement's validation patients) in {root}")
  return root


def alignment(model: RetFinerModel, val_manifest: Path, ks=(1, 5, 10)) -> dict:
  """What the contrastive embeddings tell apart on the clinic's validation pairs: image->report and
  report->image recall@k (a report counts when its text is the image's own, as validation counts), the recall a
  random ranking gets, and the mean pairwise cosine of each side's embeddings (near 1: collapsed)."""
  rows = read_csv(val_manifest)
  images = [str(val_manifest.parent / r["image"]) for r in rows]
  reports = [r["report"] for r in rows]
  image_emb, text_emb = model.embed_images(images), model.embed_texts(reports)
  matches = match_matrix(reports)
  return {"pairs": len(rows), "recall": retrieval_recall(image_emb, text_emb, reports, ks),
          "chance_recall": {f"at_{k}": chance_recall(matches, k) for k in ks},
          "text_cosine": mean_pairwise_cosine(text_emb), "image_cosine": mean_pairwise_cosine(image_emb)}


def final_train_metrics(workdir: Path, batch_size: int) -> dict:
  """The last logged training losses and accuracies of a refinement run, each beside its chance value."""
  train = [r for r in read_metrics(workdir / "metrics.jsonl") if r["kind"] == "train"]
  if not train:
    return {}
  last = train[-1]
  keys = [k for k in last if k.startswith("loss") or k.endswith("accuracy")]
  return {"step": last["step"], "values": {k: last[k] for k in keys}, "chance": chance_values(batch_size)}


def text_tower_stage(config, workdir: Path, corpus: dict, vocab: Path, cfg, seed: int, log=print) -> dict | None:
  """The text tower the refinement starts from: None (random, `demo.text_tower=random`) or the summary of a tower
  pretrained on the clinic's training reports (`sentence`: SimCSE on [CLS] beside MLM, textpretrain/), whose
  `exported` folder `config.weights.text` takes."""
  d = config.demo
  if d.text_tower == "random":
    return None
  if d.text_tower != "sentence":
    raise ConfigError(f"config.demo.text_tower must be 'sentence' or 'random', got {d.text_tower!r}")
  t = d.text
  settings = TextPretrainSettings(**{f: t[f] for f in TextPretrainSettings.__dataclass_fields__})
  return text_pretraining.run(
      cfg, corpus["refinement_manifest"], corpus["refinement_val_manifest"], vocab, workdir / "text_tower", seed=seed,
      epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
      settings=settings, log_every=t.log_every, log=log)


def run_seed(config, workdir: Path, corpus: dict, vocab: Path, run: int, runs: int, log=print,
             arm_dir: Path | None = None) -> dict:
  """Stages 1-6 with run `run`'s seeds in `workdir` (resumable): the probe rows, zero-shot, what the refinement
  learnt, and counts. `arm_dir` (default `workdir`): where the refinement and its own results go, so that
  several refinement settings (an ablation's arms) share one FM, text tower, control and their probes."""
  d = config.demo
  arm_dir = Path(arm_dir or workdir)
  seeds = stage_seeds(config, run)
  say = (lambda m: log(f"[seed {run + 1}/{runs}] {m}")) if runs > 1 else log
  done = arm_dir / "results.json"
  arm_dir.mkdir(parents=True, exist_ok=True)
  if done.exists():
    say(f"results from {done}")
    return json.loads(done.read_text())
  train_manifest, val_manifest = Path(corpus["refinement_manifest"]), Path(corpus["refinement_val_manifest"])
  probe_dir = Path(next(iter(corpus["probe_roots"].values()))).parent.parent
  indomain_dir = Path(corpus["indomain_root"])
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
    refine_config.data.val_manifest = str(val_manifest)
    refine_config.weights.vision = fm["exported"]["vision_flax"]
  cfg = trainer.model_config(refine_config)
  settings = ProbeSettings(**{**d.probe.to_dict(), "seeds": seeds["probe"]}).for_backbone(cfg.backbone)
  probe = lambda vision: probe_all(cfg, vision, probe_dir, d.tasks, settings, log)
  probe_indomain = lambda vision: probe_all(cfg, vision, indomain_dir, d.tasks, settings, log, tasks_folder="")

  # The random encoder: the very initialisation the refinement's model gets (same seed) before the FM is loaded.
  random_init = lambda: jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(seeds["refinement"]))
  probes = {"random": cached_json(workdir / "probe_random.json", "probing the randomly initialised encoder",
                                  lambda: probe(random_init()["vision_encoder"]), log)}
  load_vision = lambda folder: weight_files.load_converted(folder)[1]["vision_encoder"]
  probes["before"] = cached_json(workdir / "probe_mae_fm.json", "probing the MAE FM",
                                 lambda: probe(load_vision(fm["exported"]["vision_flax"])), log)
  indomain = {"before": cached_json(workdir / "indomain_mae_fm.json", "probing the MAE FM on the clinic's labels",
                                    lambda: probe_indomain(load_vision(fm["exported"]["vision_flax"])), log)}

  say(f"the text tower: {d.text_tower} ({'pretrained on the clinic reports alone' if d.text_tower == 'sentence' else 'random init'})"
      f", seed {seeds['text']}")
  tower = text_tower_stage(config, workdir, corpus, vocab, cfg, seeds["text"], log)
  with refine_config.unlocked():
    refine_config.weights.text = tower["exported"] if tower else ""

  def starting_alignment():  # The model as the refinement starts it: its init, the FM and the text tower.
    params = trainer.initial_params(refine_config, cfg, log=lambda *_: None)
    return alignment(RetFinerModel(cfg, params, str(vocab)), val_manifest)
  start = cached_json(arm_dir / "alignment_start.json", "measuring the starting model's contrastive embeddings",
                      starting_alignment, log)

  say(f"stage 2: RetFiner refinement of the MAE FM with the reports, seed {seeds['refinement']}")
  summary = trainer.run(refine_config, arm_dir / "refine", log)
  if summary["status"] != "finished":
    return summary
  _, refined, _ = weight_files.load_converted(summary["exported"]["retfiner_flax"])
  refined_model = RetFinerModel(cfg, refined, str(vocab))
  end = cached_json(arm_dir / "alignment_end.json", "measuring the refined model's alignment on the clinic's "
                    "validation pairs", lambda: alignment(refined_model, val_manifest), log)
  probes["after"] = cached_json(arm_dir / "probe_refined.json", "probing the refined encoder",
                                lambda: probe(refined["vision_encoder"]), log)
  indomain["after"] = cached_json(arm_dir / "indomain_refined.json", "probing the refined encoder on the clinic's "
                                  "labels", lambda: probe_indomain(refined["vision_encoder"]), log)
  zero_shot = cached_json(arm_dir / "zero_shot.json", "zero-shot from prompts on the probe corpus",
                          lambda: zero_shot_all(refined_model, probe_dir, d.tasks, log), log)

  images = summary["steps"] * config.train.batch_size  # Image passes of stage 2.
  control_steps = -(-images // d.mae.train.batch_size)
  say(f"control: MAE alone for as many images as the refinement saw ({images} = {control_steps} MAE steps), "
      f"seed {seeds['control']}")
  control_dir = workdir / f"mae_control_{control_steps}"  # Arms that ran as long share one control.
  more = mae_stage(config, control_dir, train_manifest, seeds["control"], init=str(workdir / "mae"),
                   max_steps=control_steps, log=log)
  if more["status"] != "finished":
    return more
  probes["control"] = cached_json(control_dir / "probe_control.json", "probing the MAE-only control",
                                  lambda: probe(load_vision(more["exported"]["vision_flax"])), log)
  indomain["control"] = cached_json(control_dir / "indomain_control.json", "probing the MAE-only control on the "
                                    "clinic's labels", lambda: probe_indomain(load_vision(more["exported"]["vision_flax"])), log)
  learnt = {"alignment_start": start, "alignment_end": end,
            "final_train": final_train_metrics(arm_dir / "refine", config.train.batch_size // config.train.micro_batches),
            "text_tower": d.text_tower,
            "text_tower_cls_cosine": ({k: tower[k] for k in ("cls_cosine_before", "cls_cosine_after")}
                                      if tower else None)}
  results = {"status": "finished", "seeds": {k: list(v) if isinstance(v, tuple) else v for k, v in seeds.items()},
             "tasks": {t: {**{key: {"bacc": probes[key][t]["bacc"], "auroc": probes[key][t]["auroc"]}
                              for key, *_ in ENCODERS}, "zero_shot": zero_shot[t]} for t in d.tasks},
             "indomain": {t: {key: {"bacc": indomain[key][t]["bacc"], "auroc": indomain[key][t]["auroc"]}
                              for key in INDOMAIN_ENCODERS} for t in d.tasks},
             "learnt": learnt,
             "refinement": {k: summary[k] for k in ("steps", "epochs", "best_val_loss", "steady_samples_per_second")},
             "mae": {"fm_steps": fm["steps"], "fm_images": fm["images_seen"], "control_images": images,
                     "control_steps": control_steps}}
  whole_files.write_json(done, results)
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


def aggregate_learnt(per_seed: list, tasks) -> dict:
  """What the refinement learnt, over the runs (mean and sample std of each figure): the in-domain probe (the
  clinic's labels, its validation patients) of the FM, the refined model and the control with the gains; the
  alignment on the clinic's validation pairs at the start and the end of refinement (recall@k both ways, the
  embeddings' mean pairwise cosine) and the recall of a random ranking; the final training losses and
  accuracies beside their chance values."""
  indomain = {t: {key: _mean_std([r["indomain"][t][key]["bacc"] for r in per_seed]) for key in INDOMAIN_ENCODERS}
              for t in tasks}
  indomain_gains = {}
  for t in list(tasks) + ["average"]:
    over = list(tasks) if t == "average" else [t]
    indomain_gains[t] = {name: _mean_std([np.mean([r["indomain"][u][a]["bacc"] - r["indomain"][u][b]["bacc"]
                                                   for u in over]) for r in per_seed])
                         for name, a, b in GAINS if b != "random"}
  learnt = [r["learnt"] for r in per_seed]
  alignment_rows = {}
  for when in ("start", "end"):
    block = [x[f"alignment_{when}"] for x in learnt]
    alignment_rows[when] = {**{k: _mean_std([b["recall"][k] for b in block]) for k in block[0]["recall"]},
                            "text_cosine": _mean_std([b["text_cosine"]["mean"] for b in block]),
                            "image_cosine": _mean_std([b["image_cosine"]["mean"] for b in block])}
  finals = [x["final_train"] for x in learnt if x["final_train"]]
  final = {k: _mean_std([f["values"][k] for f in finals]) for k in finals[0]["values"]} if finals else {}
  return {"indomain": indomain, "indomain_gains": indomain_gains, "alignment": alignment_rows,
          "chance_recall": learnt[0]["alignment_end"]["chance_recall"],
          "pairs": learnt[0]["alignment_end"]["pairs"], "final_train": final,
          "final_train_chance": finals[0]["chance"] if finals else {}, "text_tower": learnt[0]["text_tower"],
          "text_tower_cls_cosine_after": _mean_std([x["text_tower_cls_cosine"]["cls_cosine_after"]["mean"]
                                                    for x in learnt]) if learnt[0]["text_tower_cls_cosine"] else None}


def report_learnt(learnt: dict, log=print):
  """Prints what the refinement learnt (aggregate_learnt's block)."""
  a, chance = learnt["alignment"], learnt["chance_recall"]
  log(f"\nwhat the refinement learnt, on the clinic's {learnt['pairs']} validation pairs (text tower: "
      f"{learnt['text_tower']})")
  log(f"{'':<26}{'start':>16}{'end':>16}{'chance':>10}")
  for direction in ("i2t", "t2i"):
    for k in (1, 5, 10):
      key = f"recall_{direction}_at_{k}"
      log(f"{direction} recall@{k:<15}{_pm(a['start'][key]):>16}{_pm(a['end'][key]):>16}"
          f"{100 * chance[f'at_{k}']:>10.1f}")
  for side in ("text", "image"):
    log(f"{side + ' embedding cosine':<26}{_pm(a['start'][side + '_cosine'], 1):>16}"
        f"{_pm(a['end'][side + '_cosine'], 1):>16}{'(1 = collapsed)':>16}")
  chance_train = learnt["final_train_chance"]
  for key, value in learnt["final_train"].items():
    beside = f"{chance_train[key]:>10.4f}" if key in chance_train else f"{'-':>10}"
    log(f"final train {key:<15}{'':>16}{_pm(value, 1):>16}{beside}")
  log(f"\nlinear probe on the clinic's own labels (its validation patients), balanced accuracy %")
  for t, row in learnt["indomain"].items():
    log(f"{t:<12}" + "".join(f"{label}: {_pm(row[key])}   " for key, label in
                             (("before", "MAE FM"), ("after", "MAE + RetFiner"), ("control", "MAE + more MAE"))))
  g = learnt["indomain_gains"]["average"]
  log(f"in-domain gain (average over tasks): RetFiner vs the FM {_pm(g['after_vs_before'])} points, vs the control "
      f"{_pm(g['after_vs_control'])}")


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
  learnt = aggregate_learnt(per_seed, d.tasks)
  results = {"corpus": corpus, "runs": seeds, "tasks": tasks, "gains": gains, "learnt": learnt,
             "per_seed": per_seed, "wall_seconds": time.time() - start}
  whole_files.write_json(workdir / "results.json", results)
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
  report_learnt(learnt, log)
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
