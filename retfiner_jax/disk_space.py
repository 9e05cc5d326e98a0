"""Free disk space against what a write needs: checkpoints (runs/checkpoints.py) and exports (weights/exports.py)
are refused before they start, rather than failing halfway in a background writer."""
from __future__ import annotations

import shutil
from pathlib import Path

import jax


def tree_nbytes(tree) -> int:
  """Bytes of a tree's arrays (device or host)."""
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def size_text(nbytes: int) -> str:
  """Bytes for a message: '1.5 MB', '41.2 GB' (binary units, one decimal)."""
  return f"{nbytes / 2**30:.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MB"


def shortfall(folder: Path, nbytes: int, reclaimable: int = 0) -> tuple[int, int] | None:
  """(bytes needed, bytes free) where `nbytes` of arrays, plus 5 % and 1 MB of metadata, would not fit in
  `folder`'s free space plus `reclaimable` (bytes of files the write replaces); None where they fit."""
  need = int(nbytes * 1.05) + (1 << 20)
  free = shutil.disk_usage(folder).free + reclaimable
  return (need, free) if free < need else None
