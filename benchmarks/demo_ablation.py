"""The demo's ablation (issue 34), as fixed in benchmarks/demo_ablation.md before any of its runs.

  python benchmarks/demo_ablation.py --workdir=runs/ablation [--arms=sentence,random-tower,...] [--seeds=3]
  python benchmarks/demo_ablation.py --table      # the table of every recorded run, as mean ± sample std

Each arm is the demo's config with the overrides below; seed k of every arm uses the demo's stage seeds of run k
(`demo.stage_seeds`) and shares that seed's FM, text tower, control and their probes (`demo.run_seed`'s arm_dir).
Every arm-seed's results.json is copied to benchmarks/demo_ablation/<arm>/seed_<k>.json as it finishes; a rerun
skips what is recorded. Arms run in the order given, each for all its seeds before the next (no figure depends on
the order: each arm-seed is computed from its own seeds).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECORDS = ROOT / "benchmarks" / "demo_ablation"

# arm: (what it is, config overrides). Fixed in demo_ablation.md.
ARMS = {
    "sentence": ("the demo's default: the sentence-pretrained text tower, the four objectives, lr 1e-4", {}),
    "random-tower": ("the text tower from random init (the demo before issue 34)", {"demo.text_tower": "random"}),
    "itc-only": ("ITC alone", {"train.objectives.itm_weight": 0.0, "train.objectives.mlm_weight": 0.0,
                               "train.objectives.gm_weight": 0.0}),
    "no-itc": ("ITC left out", {"train.objectives.itc_weight": 0.0}),
    "no-itm": ("ITM left out", {"train.objectives.itm_weight": 0.0}),
    "no-mlm": ("MLM left out", {"train.objectives.mlm_weight": 0.0}),
    "no-gm": ("GM left out", {"train.objectives.gm_weight": 0.0}),
    "lr-3e-5": ("learning rate 3e-5 instead of 1e-4", {"train.learning_rate": 3e-5}),
}


def arm_config(name):
  import configs
  config = configs.load("demo")
  with config.unlocked():
    for key, value in ARMS[name][1].items():
      *parents, leaf = key.split(".")
      block = config
      for p in parents:
        block = block[p]
      block[leaf] = value
  return config


def run(workdir: Path, arms, seeds: int):
  from retfiner_jax import demo
  from retfiner_jax.data.vocab import build_vocab
  log = lambda m: print(m, flush=True)
  base = arm_config("sentence")
  corpus = demo.prepare_corpora(base, workdir, log)
  vocab = workdir / "vocab" / "vocab.txt"
  if not vocab.exists():
    build_vocab([r["report"] for r in demo.read_csv(Path(corpus["refinement_manifest"]))], base.demo.vocab_size, vocab)
  for arm in arms:
    for k in range(seeds):
      record = RECORDS / arm / f"seed_{k}.json"
      if record.exists():
        log(f"[{arm} seed {k}] recorded: {record}")
        continue
      started = time.time()
      log(f"[{arm} seed {k}] {ARMS[arm][0]}")
      result = demo.run_seed(arm_config(arm), workdir / f"seed_{k}", corpus, vocab, k, seeds, log,
                             arm_dir=workdir / f"seed_{k}" / "arms" / arm)
      if result.get("status") != "finished":
        log("interrupted; rerun the same command to resume")
        return
      record.parent.mkdir(parents=True, exist_ok=True)
      result = json.loads((workdir / f"seed_{k}" / "arms" / arm / "results.json").read_text())
      result["code_commit"] = _commit()
      record.write_text(json.dumps(result, indent=1) + "\n")
      log(f"[{arm} seed {k}] done in {time.time() - started:.0f} s: {record}")
  table()


def _commit():
  """The commit the arm ran at, with '+changes' when the work tree differed from it (records name their code)."""
  def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
  head = git("rev-parse", "--short", "HEAD")
  if not head:
    raise RuntimeError(f"{ROOT} is not a git checkout: an ablation record must name the code it ran")
  return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _ms(values, scale=100.0, digits=1):
  v = np.asarray(values, np.float64) * scale
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def table():
  """Markdown table of every recorded arm (mean ± sample std over its recorded seeds)."""
  rows = ["| arm | seeds (code) | in-domain gain vs FM (deciding) | in-domain gain vs control | cross-site gain vs FM | "
          "i2t R@1 | t2i R@1 | R@1 chance | final ITC (ln B) | final ITM (prior) | text cosine start → end |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for arm in ARMS:
    runs = [json.loads(p.read_text()) for p in sorted((RECORDS / arm).glob("seed_*.json"))]
    if not runs:
      rows.append(f"| {arm} | 0 | not run | | | | | | | | |")
      continue
    tasks = list(runs[0]["indomain"])
    gain = lambda r, block, a, b: np.mean([r[block][t][a]["bacc"] - r[block][t][b]["bacc"] for t in tasks])
    learnt = [r["learnt"] for r in runs]
    end = [x["alignment_end"] for x in learnt]
    final = [x["final_train"]["values"] for x in learnt]
    chance = learnt[0]["final_train"]["chance"]
    start_cos = _ms([x["alignment_start"]["text_cosine"]["mean"] for x in learnt], 1, 3)
    end_cos = _ms([x["alignment_end"]["text_cosine"]["mean"] for x in learnt], 1, 3)
    fmt = lambda key: (_ms([f[key] for f in final], 1, 3) + f" ({chance[key]:.3f})") if key in final[0] else "off"
    rows.append(
        f"| {arm} | {len(runs)} ({', '.join(sorted({r.get('code_commit', 'commit not recorded') for r in runs}))}) | "
        f"{_ms([gain(r, 'indomain', 'after', 'before') for r in runs])} | "
        f"{_ms([gain(r, 'indomain', 'after', 'control') for r in runs])} | "
        f"{_ms([gain(r, 'tasks', 'after', 'before') for r in runs])} | "
        f"{_ms([e['recall']['recall_i2t_at_1'] for e in end])} | {_ms([e['recall']['recall_t2i_at_1'] for e in end])} | "
        f"{100 * end[0]['chance_recall']['at_1']:.1f} | {fmt('loss_itc')} | {fmt('loss_itm')} | {start_cos} → {end_cos} |")
  text = "\n".join(rows)
  print(text)
  return text


def ceiling(workdir: Path):
  """Recall@K that a model reading every labelled finding perfectly from both sides, and nothing else, would reach
  on the clinic's validation pairs: the pairs fall into groups with the same findings, and within a group such a
  model can only guess. Written after the ablation's runs, to read them; it changes nothing in the plan."""
  import collections
  import csv
  data = workdir / "data" / "refinement"
  val = list(csv.DictReader((data / "manifest_val.csv").open()))
  labels = {row["image"]: row for row in csv.DictReader((data / "labels.csv").open())}
  findings = [k for k in next(iter(labels.values())) if k not in ("image", "split")]
  out = {}
  for name, keys in (("every labelled finding", findings), ("the diagnosis alone", ["condition"])):
    groups = [tuple(labels[row["image"]][k] for k in keys) for row in val]
    size = collections.Counter(groups)
    out[name] = {"groups": len(size), "largest": size.most_common(1)[0][1],
                 **{f"recall_at_{k}": float(np.mean([min(1.0, k / size[g]) for g in groups])) for k in (1, 5, 10)}}
  print(json.dumps({"pairs": len(val), "findings": findings, "ceiling": out}, indent=1))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/ablation")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--table", action="store_true", help="print the table of the recorded runs and stop")
  parser.add_argument("--ceiling", action="store_true",
                      help="print the recall@K a perfect reader of the labelled findings would reach on the "
                           "validation pairs of --workdir's corpus, and stop")
  args = parser.parse_args()
  if args.table:
    table()
    return
  if args.ceiling:
    ceiling(Path(args.workdir))
    return
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
  run(Path(args.workdir), arms, args.seeds)


if __name__ == "__main__":
  main()
