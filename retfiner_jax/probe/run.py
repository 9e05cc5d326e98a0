"""The probe over several encoders and datasets, and its outputs (JSON, CSV, Markdown, figures)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from retfiner_jax.errors import ConfigError, MissingInput
from retfiner_jax.probe import paper
from retfiner_jax.probe.features import cache_key, cached_features, extract_features, file_identity
from retfiner_jax.runs import whole_files
from retfiner_jax.weights import files as weight_files
from retfiner_jax.probe.folders import (ProbeDataError, load_gray_u8, load_images, read_image_folder,
                                        stratified_split, unreadable)
from retfiner_jax.probe.heads import predict_proba, train_heads
from retfiner_jax.probe.metrics import METRICS, classification_metrics, paired_comparison, summarise
from retfiner_jax.probe.settings import ProbeSettings


def load_encoder(path, variant: str | None = None, log=print):
  """A training workdir, a converted folder, or a PyTorch checkpoint -> (ModelConfig, vision params)."""
  path = Path(path)
  # A workdir's export: the vision encoder alone if it was exported, else the whole model (config.export.formats).
  for candidate in (path / export / name for export in ("export", "refine/export")
                    for name in ("vision_flax", "retfiner_flax")):
    if (candidate / "model.json").exists():
      path = candidate
      break
  if not path.exists():
    raise MissingInput(f"{path}: no such encoder (a converted folder, a training workdir or a checkpoint)")
  cfg, params, _ = weight_files.load_weights(path, variant=variant or None, log=log)
  if "vision_encoder" not in params:
    raise ProbeDataError(f"{path}: holds no vision encoder")
  return cfg, params["vision_encoder"], path


def dataset_splits(root, log=print, skip_bad_images: bool = False, slices: str = "centre"):
  leave_out = lambda path, why: log(f"{root}: leaving out {path} ({why}) (data.skip_bad_images)")
  splits, classes = read_image_folder(root, slices, leave_out if skip_bad_images else None)
  if skip_bad_images:  # Checked first, so that a bad file never stops a run halfway.
    for split, items in splits.items():
      bad = unreadable([p for p, _ in items])
      for path, why in bad.items():
        leave_out(path, why)
      splits[split] = [it for it in items if it[0] not in bad]
  if "val" not in splits:
    splits["train"], splits["val"], without_val = stratified_split(splits["train"], seed=0)
    log(f"{root}: no val folder; a stratified 15 % of train (seed 0) is the validation split")
    if without_val:
      log(f"{root}: warning: classes {[classes[c] for c in without_val]} have a single training image, kept for "
          f"training; the validation split has none of them")
  return splits, classes


def probe_dataset_paper(cfg, vision_params, root, settings: ProbeSettings, audit_dir, log=print,
                        skip_bad_images: bool = False, slices: str = "centre"):
  """The paper's protocol on one ImageFolder dataset -> (summary, per-seed test probabilities, labels, classes);
  audit files under `audit_dir/seed<k>/`."""
  splits, classes = dataset_splits(root, log, skip_bad_images, slices)
  data = {}
  for split, items in splits.items():
    data[f"gray_{split}"] = load_gray_u8([p for p, _ in items], cfg.image_size)
    data[f"y_{split}"] = np.array([y for _, y in items])
  audit_dirs = [Path(audit_dir) / f"seed{s}" for s in settings.seeds]
  proba, best_epoch = paper.probe(cfg, vision_params, data, len(classes), settings, audit_dirs, log)
  summary = summarise([classification_metrics(data["y_test"], p) for p in proba])
  summary["best_epoch"] = [int(e) for e in best_epoch]
  summary["protocol"] = "paper"
  return summary, proba, data["y_test"], classes


def probe_dataset(cfg, vision_params, root, settings: ProbeSettings, kind="concat", cache_dir=None,
                  encoder_id="", log=print, skip_bad_images: bool = False, slices: str = "centre"):
  """The features protocol on one ImageFolder dataset (clean features once, heads on them) -> (summary,
  per-seed test probabilities, labels, classes)."""
  splits, classes = dataset_splits(root, log, skip_bad_images, slices)

  def compute():
    out = {}
    for split, items in splits.items():
      images = load_images([p for p, _ in items], cfg.image_size, cfg.backbone)
      out[f"x_{split}"] = extract_features(cfg, vision_params, images, kind)
      out[f"y_{split}"] = np.array([y for _, y in items])
    return out

  if cache_dir:
    files = [p for items in splits.values() for p, _ in items]
    data, hit = cached_features(cache_dir, cache_key(encoder_id, files, cfg, kind), compute)
    if hit:
      log(f"{root}: features from the cache")
  else:
    data = compute()
  heads = train_heads(data["x_train"], data["y_train"], data["x_val"], data["y_val"], len(classes), settings)
  proba = predict_proba(heads, data["x_test"])
  summary = summarise([classification_metrics(data["y_test"], p) for p in proba])
  summary["best_epoch"] = [int(e) for e in np.asarray(heads["best_epoch"])]
  summary["protocol"] = "features"
  return summary, proba, data["y_test"], classes


def set_aside_previous_results(out_dir: Path, log=print):
  """A rerun in a used workdir: the earlier run's results, plots and audit go to previous/<time>/ (kept, and
  no stale plot is left beside the new results). The feature cache stays where it is."""
  if not (out_dir / "results.json").exists():
    return
  import shutil
  stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((out_dir / "results.json").stat().st_mtime))
  dest = out_dir / "previous" / stamp
  n = 1
  while dest.exists():
    dest, n = out_dir / "previous" / f"{stamp}-{n}", n + 1
  dest.mkdir(parents=True)
  for path in out_dir.iterdir():
    if path.name.startswith(("results.", "comparison.", "confusion_")) or path.name == "audit":
      shutil.move(str(path), str(dest / path.name))
  log(f"{out_dir} held results of an earlier run: moved them to {dest}")


def write_outputs(out_dir, results: dict, confusions: dict, log=print):
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  whole_files.write_json(out_dir / "results.json", results)
  with (out_dir / "results.csv").open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["dataset", "encoder"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")])
    for dataset, by_encoder in results.items():
      for encoder, r in by_encoder.items():
        w.writerow([dataset, encoder] + [f"{r[m][s]:.4f}" for m in METRICS for s in ("mean", "std")])
  lines = ["| dataset | encoder | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
  for dataset, by_encoder in results.items():
    for encoder, r in by_encoder.items():
      lines.append(f"| {dataset} | {encoder} | " + " | ".join(
          f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['std']:.1f}" for m in METRICS) + " |")
  (out_dir / "results.md").write_text("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sklearn.metrics import confusion_matrix
  for (dataset, encoder), (proba, labels, classes) in confusions.items():
    matrix = sum(confusion_matrix(labels, p.argmax(-1), labels=range(len(classes))) for p in proba)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(classes), 1 + 0.7 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    for i in range(len(classes)):
      for j in range(len(classes)):
        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted (all seeds)")
    ax.set_ylabel("true")
    ax.set_title(f"{dataset} — {encoder}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"confusion_{dataset}_{encoder}.png", dpi=90)
    plt.close(fig)
  log(f"wrote results.json, results.csv, results.md and confusion matrices to {out_dir}")


def plot_comparison(comparison: dict, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(comparison["difference_per_dataset"])
  values = [100 * comparison["difference_per_dataset"][n] for n in names]
  fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
  ax.bar(names, values, color=["#1f77b4" if v >= 0 else "#d62728" for v in values])
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set_ylabel(f"{comparison['metric']}: {comparison['second']} − {comparison['first']} (points)")
  ax.set_title(f"Wilcoxon signed-rank p = {comparison['wilcoxon_p']:.3g} over {comparison['pairs']} pairs")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def parse_named(spec: str) -> list[tuple[str, str]]:
  """'a=path1,path2' -> [('a', 'path1'), ('path2''s folder name', 'path2')]."""
  out = []
  for item in [s.strip() for s in spec.split(",") if s.strip()]:
    name, _, path = item.rpartition("=")
    out.append((name or Path(path).name, path))
  return out


def run(config, log=print) -> dict:
  start = time.time()
  encoders = parse_named(config.encoder)
  datasets = parse_named(config.data.root)
  if not encoders or not datasets:
    raise ConfigError("give --config.encoder=PATH[,PATH...] and --config.data.root=DIR[,DIR...]")
  base = ProbeSettings(**config.probe)
  out_dir = Path(config.workdir)
  set_aside_previous_results(out_dir, log)
  cache_dir = config.cache_dir or str(out_dir / "feature_cache")
  results, confusions = {}, {}
  for enc_name, enc_path in encoders:
    cfg, params, resolved = load_encoder(enc_path, config.variant, log)
    if config.image_size:
      cfg = cfg.replace(image_size=config.image_size)
    identity = file_identity(resolved)
    settings = base.for_backbone(cfg.backbone)
    for ds_name, root in datasets:
      t = time.time()
      if settings.protocol == "paper":
        log(f"{ds_name} / {enc_name}: paper protocol ({cfg.backbone}: weight decay {settings.weight_decay:g}, "
            f"drop path {settings.drop_path:g})")
        summary, proba, labels, classes = probe_dataset_paper(cfg, params, root, settings,
                                                              out_dir / "audit" / ds_name / enc_name, log,
                                                              config.data.skip_bad_images, config.data.slices)
      else:
        summary, proba, labels, classes = probe_dataset(cfg, params, root, settings, config.representation,
                                                        cache_dir, identity, log, config.data.skip_bad_images,
                                                        config.data.slices)
      results.setdefault(ds_name, {})[enc_name] = summary
      confusions[(ds_name, enc_name)] = (proba, labels, classes)
      log(f"{ds_name} / {enc_name}: balanced accuracy {100 * summary['bacc']['mean']:.1f} ± "
          f"{100 * summary['bacc']['std']:.1f}, AUROC {summary['auroc']['mean']:.3f} "
          f"({len(settings.seeds)} seeds, {settings.protocol} protocol, {time.time() - t:.1f} s)")
  write_outputs(out_dir, results, confusions, log)
  if len(encoders) == 2:
    comparison = paired_comparison(results, encoders[0][0], encoders[1][0])
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=1))
    plot_comparison(comparison, out_dir / "comparison.png")
    log(f"{encoders[1][0]} - {encoders[0][0]}: {100 * comparison['mean_difference']:+.1f} points balanced "
        f"accuracy, Wilcoxon p = {comparison['wilcoxon_p']:.3g}")
  log(f"probe done in {time.time() - start:.0f} s")
  return results
