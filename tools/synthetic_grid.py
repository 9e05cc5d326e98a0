"""Draws a grid of synthetic B-scans with their reports (the README's picture).

  python tools/synthetic_grid.py --out docs/synthetic_examples.png
"""
import argparse
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from retfiner_jax.data.synthetic import make_example  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="docs/synthetic_examples.png")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--indices", default="0,1,2,5,6,9,11,17")
  a = p.parse_args()
  indices = [int(i) for i in a.indices.split(",")]
  fig, axes = plt.subplots(2, (len(indices) + 1) // 2, figsize=(3.2 * ((len(indices) + 1) // 2), 8.4))
  for ax, i in zip(axes.flat, indices):
    image, report, lab = make_example(a.seed, i, 256, 256)
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{lab['condition']}\n" + "\n".join(textwrap.wrap(report, 34)), fontsize=8, loc="left")
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(a.out, dpi=90)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
