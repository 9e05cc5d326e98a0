"""Converts PyTorch checkpoints (RETFound, VisionFM, UrFound, RetFiner, Hugging Face BERT) to Flax, and back.

  python tools/convert_weights.py --input RETFound_mae_natureOCT.pth --output weights/retfound
  python tools/convert_weights.py --input VFM_OCT_weights.pth --output weights/visionfm
  python tools/convert_weights.py --input bert-base-uncased/ --output weights/bert
  python tools/convert_weights.py --input best-model.ckpt --output weights/retfiner --variant retfound

Writes DIR/params (Orbax) and DIR/model.json (the model config). With --export-vision FILE or --export-bert
DIR it goes the other way: a converted folder (or any checkpoint) to a PyTorch state_dict of the vision
encoder in the FM's key layout, or to a Hugging Face BERT folder.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retfiner_jax import convert, weights  # noqa: E402
from retfiner_jax.models.config import VARIANTS  # noqa: E402


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
  parser.add_argument("--export-bert", metavar="DIR", help="write the text encoder as a Hugging Face folder")
  args = parser.parse_args(argv)
  if not (args.output or args.export_vision or args.export_bert):
    parser.error("give --output, --export-vision or --export-bert")
  try:
    cfg, params, meta = weights.load_weights(args.input, fmt=args.format, variant=args.variant,
                                             model_config=args.model_config, extra_ignore=args.ignore_key)
    if args.output:
      weights.save_converted(args.output, cfg, params, meta)
      print(f"wrote {args.output}/params and {args.output}/model.json")
    if args.export_vision:
      if "vision_encoder" not in params:
        raise convert.CheckpointError(f"{args.input}: holds no vision encoder to export")
      weights.save_torch_state_dict(weights.export_vision_state_dict(cfg, params), args.export_vision)
      print(f"wrote {args.export_vision} (vision encoder, {cfg.backbone} key layout)")
    if args.export_bert:
      if "text_encoder" not in params:
        raise convert.CheckpointError(f"{args.input}: holds no text encoder to export")
      weights.export_hf_bert(cfg, params, args.export_bert)
      print(f"wrote {args.export_bert}/config.json and model.safetensors")
  except (convert.CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
