"""Where the refined model looks in a B-scan for the words of a report: cross-attention maps, drawn over it.

  python -m retfiner_jax.explain --model=runs/retfound --image=scan.png --text="subretinal fluid nasal" \
      --out=explain.png [--image=... --text=... ...] [--tokens=4]

One row per (image, text) pair (every image with every text): the B-scan as the model sees it, the map of the
report's tokens (cross-attention of the matching pass, mean over heads, layers and tokens), the ITM Grad-CAM
map (ALBEF's: one cross-attention layer's probabilities times the positive part of the gradient of the "match"
logit with respect to them, mean over heads and tokens; --gradcam-layer, by default two thirds of the way up),
then maps of the first --tokens tokens one by one: their raw cross-attention ("attention: TOKEN"), their Grad-CAM
("Grad-CAM: TOKEN", as ALBEF draws its per-word maps), or both (--per-token, default both). Maps are over the
patch grid (the global image token's share is printed in the attention titles, the pair's ITM probability in
the Grad-CAM title) and drawn with one colour scale per panel. Also writes FILE.json with the maps' numbers and
each row's panel titles.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _panel(ax, gray, heat, title):
  from PIL import Image
  size = gray.shape[0]
  up = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((size, size), Image.BILINEAR))
  ax.imshow(gray, cmap="gray")
  ax.imshow(up, cmap="inferno", alpha=0.55)
  ax.set_title(title, fontsize=7)
  ax.axis("off")


PER_TOKEN = {"attention": ("attention",), "gradcam": ("gradcam",), "both": ("attention", "gradcam")}


def run(model, images, texts, out, tokens: int = 4, gradcam_layer: int | None = None, per_token: str = "both",
        log=print) -> dict:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pairs = [(i, t) for i in images for t in texts]
  results = []
  kinds = PER_TOKEN[per_token]
  columns = 3 + tokens * len(kinds)
  fig, axes = plt.subplots(len(pairs), columns, figsize=(1.9 * columns, 2.3 * len(pairs)), squeeze=False)
  prepared = {str(i): model.preprocess([i]) for i in images}  # Each image read and preprocessed once.
  for row, (image, text) in enumerate(pairs):
    pixels = prepared[str(image)]
    maps = model.attention_maps_prepared(pixels, text, gradcam_layer)
    gray = pixels[0, ..., 0]
    gray = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-6)
    axes[row, 0].imshow(gray, cmap="gray")
    axes[row, 0].set_title(Path(str(image)).name[:28], fontsize=7)
    axes[row, 0].axis("off")
    titles = [f"attention: all tokens (global {maps['global'].mean():.2f})\n{text[:40]}",
              f"ITM Grad-CAM, layer {maps['gradcam_layer']}\nmatch probability {maps['itm']:.2f}"]
    _panel(axes[row, 1], gray, maps["mean"], titles[0])
    _panel(axes[row, 2], gray, maps["gradcam"], titles[1])
    col = 3
    for kind in kinds:
      for t in range(tokens):
        if t < len(maps["tokens"]):
          if kind == "attention":
            title = f"attention: {maps['tokens'][t]} (global {maps['global'][t]:.2f})"
            _panel(axes[row, col], gray, maps["per_token"][t], title)
          else:
            title = f"Grad-CAM: {maps['tokens'][t]}"
            _panel(axes[row, col], gray, maps["gradcam_per_token"][t], title)
          titles.append(title)
        else:
          axes[row, col].axis("off")
        col += 1
    results.append({"image": str(image), "text": text, "tokens": maps["tokens"], "itm": maps["itm"],
                    **{k: maps[k].tolist() for k in ("mean", "per_token", "global", "gradcam", "gradcam_per_token")},
                    "gradcam_layer": maps["gradcam_layer"], "panels": titles})
  fig.tight_layout()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  out.with_suffix(".json").write_text(json.dumps(results))
  log(f"wrote {out} and {out.with_suffix('.json')} ({len(pairs)} image-text pairs)")
  return {"pairs": results}


def main(argv=None):
  from retfiner_jax.textside import api
  p = api.command_parser(__doc__, workdir=False)
  p.add_argument("--image", action="append", required=True, help="a B-scan (repeatable)")
  p.add_argument("--text", action="append", required=True, help="a report or phrase (repeatable)")
  p.add_argument("--out", required=True, help="the PNG to write (and its numbers beside it, .json)")
  p.add_argument("--tokens", type=int, default=4, help="per-token maps drawn after the mean")
  p.add_argument("--gradcam-layer", type=int, help="the cross-attention layer of the Grad-CAM map (0-based; "
                 "default two thirds of the way up, never the last)")
  p.add_argument("--per-token", choices=sorted(PER_TOKEN), default="both",
                 help="the per-token panels: raw cross-attention, Grad-CAM (ALBEF's per-word maps), or both")
  api.run_command(p, argv, lambda model, a: run(model, a.image, a.text, a.out, a.tokens, a.gradcam_layer,
                                                a.per_token))


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
