"""Checks this port against a reference bundle computed by the original PyTorch RetFiner.

  python tools/check_reference.py ../shared/reference/tiny-retfound

Loads the bundle's Lightning checkpoint through the converter, builds the model from expected.json's config,
computes the four losses with the bundle's masks and negatives (dropout off) and the gradient of their sum,
prints a table and exits 1 if a loss is off by more than 1e-4 (relative) or a gradient by more than 1e-3.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from retfiner_jax.refine.reference import check_bundle  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("bundles", nargs="+", help="reference bundle folder(s)")
  args = parser.parse_args()
  ok = True
  for folder in args.bundles:
    ok &= check_bundle(folder)
    print()
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
