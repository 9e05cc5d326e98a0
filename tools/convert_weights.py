"""Converts PyTorch checkpoints (RETFound, VisionFM, UrFound, RetFiner, Hugging Face BERT) to Flax, and back.

  python tools/convert_weights.py --input RETFound_mae_natureOCT.pth --output weights/retfound
  python tools/convert_weights.py --input VFM_OCT_weights.pth --output weights/visionfm
  python tools/convert_weights.py --input bert-base-uncased/ --output weights/bert
  python tools/convert_weights.py --input best-model.ckpt --output weights/retfiner --variant retfound

Writes DIR/params (Orbax) and DIR/model.json (the model config). The export options go the other way, from a
converted folder (or any checkpoint): --export-vision FILE (the vision encoder in the FM's key layout),
--export-bert DIR (two Hugging Face folders, see DIR/README.md; needs the model's vocabulary: --tokenizer,
unless the input is a BERT folder holding it), --export-lightning FILE (the whole model in RetFiner's layout).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retfiner_jax.errors import UserError  # noqa: E402
from retfiner_jax.models.config import VARIANTS  # noqa: E402
from retfiner_jax.runs import whole_files  # noqa: E402
from retfiner_jax.weights import convert  # noqa: E402
from retfiner_jax.weights import exports  # noqa: E402
from retfiner_jax.weights import files as weight_files  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="PyTorch checkpoint file, Hugging Face BERT folder, or a "
                      "converted folder (with --export-*)")
  parser.add_argument("--output", help="folder for the converted Flax checkpoint")
  parser.add_argument("--format", choices=convert.FORMATS, help="checkpoint format (detected if omitted)")
  parser.add_argument("--variant", choices=sorted(VARIANTS), help="model sizes the checkpoint cannot tell")
  parser.add_argument("--model-config", help="JSON model config (a bundle's expected.json works)")
  parser.add_argument("--ignore-key", action="append", default=[], metavar="PATTERN",
                      help="also ignore checkpoint keys matching this glob pattern (repeatable)")
  parser.add_argument("--export-vision", metavar="FILE", help="write the vision encoder as a PyTorch state_dict")
  parser.add_argument("--export-bert", metavar="DIR", help="write the text encoder as Hugging Face folders")
  parser.add_argument("--export-lightning", metavar="FILE", help="write the whole model in RetFiner's layout")
  parser.add_argument("--tokenizer", help="the model's vocab.txt (or a folder holding one), for --export-bert")
  args = parser.parse_args(argv)
  if not (args.output or args.export_vision or args.export_bert or args.export_lightning):
    parser.error("give --output, --export-vision, --export-bert or --export-lightning")
  try:
    cfg, params, meta = weight_files.load_weights(args.input, fmt=args.format, variant=args.variant,
                                             model_config=args.model_config, extra_ignore=args.ignore_key)
    pooler = weight_files.source_pooler(args.input)
    if args.output:
      weight_files.save_converted(args.output, cfg, params, meta, pooler=pooler, vocabulary_from=args.input)
      kept = [n for n in weight_files.TOKENIZER_FILES if (Path(args.output) / n).exists()]
      print(f"wrote {args.output}/params and {args.output}/model.json"
            + (f" (and the source's {', '.join(kept)})" if kept else ""))
    if args.export_vision:
      if "vision_encoder" not in params:
        raise convert.CheckpointError(f"{args.input}: holds no vision encoder to export")
      vision = exports.vision_state_dict(cfg, params)
      whole_files.make_whole(args.export_vision, lambda path: exports.save_torch(vision, path))
      print(f"wrote {args.export_vision} (vision encoder, {cfg.backbone} key layout)")
    if args.export_bert:
      if "text_encoder" not in params:
        raise convert.CheckpointError(f"{args.input}: holds no text encoder to export")
      tokenizer = args.tokenizer or _vocabulary_beside(args.input)
      if tokenizer is None:
        raise convert.CheckpointError(f"{args.input}: --export-bert needs the vocabulary the model was trained "
                                      f"with: give --tokenizer VOCAB.txt (RetFiner's: bert-base-uncased's)")
      paths = exports.hf_bert(cfg, params, args.export_bert, tokenizer, pooler)
      print(f"wrote {paths['hf_encoder']} (AutoModel) and {paths['hf_cross_attention']} (BertLMHeadModel)")
    if args.export_lightning:
      if set(params) != weight_files.WHOLE_MODEL:
        raise convert.CheckpointError(f"{args.input}: holds {sorted(params)}, not a whole RetFiner model")
      whole_files.make_whole(args.export_lightning, lambda path: exports.save_lightning(cfg, params, path))
      print(f"wrote {args.export_lightning} (RetFiner's Lightning layout)")
  except (UserError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _vocabulary_beside(path):
  """The vocabulary of a BERT folder (a Hugging Face one, or a converted folder written with one)."""
  path = Path(path)
  return str(path) if path.is_dir() and (path / "vocab.txt").exists() else None


if __name__ == "__main__":
  sys.exit(main())
