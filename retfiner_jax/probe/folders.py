"""Classification datasets in ImageFolder layout: root/{train,val,test}/<class>/<image>.

A file may be a volume of B-scans (a device maker's volume, or a 3-D .npy, TIFF or DICOM): `slices` says which
of its B-scans the probe takes, "centre" (index n // 2, the default) or "all" (each one an item of the file's
class; a volume's B-scans then stay in one split, as the folder puts them)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retfiner_jax.data.images import (IMAGE_SUFFIXES, SLICE_RULES, ImageError, folder_items, preprocess,
                                       read_image, scale_intensity)
from retfiner_jax.errors import UserError

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


class ProbeDataError(UserError, ValueError):
  pass


def is_built_dataset(root) -> bool:
  """Whether `root` is (or holds) a dataset built by data/tfds_builders.py: a dataset_info.json in it, in the
  dataset's folder or in its version folder."""
  return any(any(Path(root).glob(f"{depth}dataset_info.json")) for depth in ("", "*/", "*/*/"))


def read_image_folder(root, slices: str = "centre", on_bad=None):
  """-> ({split: [(path or VolumeSlice, class_index)]}, class names). Every split must hold the same >= 2
  classes. A dataset built from such a folder by data/tfds_builders.py (`folder`) reads as the folder did.
  A volume whose header does not read stops with its path and reason, or, with `on_bad(path, reason)`, is
  left out after that call."""
  if slices not in SLICE_RULES:
    raise ProbeDataError(f"data.slices must be one of {SLICE_RULES}, got {slices!r}")
  root = Path(root)
  if not root.is_dir():
    raise ProbeDataError(f"{root}: no such folder (expected an ImageFolder dataset ROOT/{{train,val,test}}/<class>/"
                         f"<image>, or a dataset built from one)")
  if not (root / "train").is_dir() and is_built_dataset(root):
    from retfiner_jax.data import tfds_builders
    return tfds_builders.folder_items(root)
  if not (root / "train").is_dir() or not (root / "test").is_dir():
    raise ProbeDataError(f"{root}: expected ImageFolder layout {root}/{{train,val,test}}/<class>/<image> "
                         f"(val optional)")
  splits, classes = {}, None
  for split in ("train", "val", "test"):
    folder = root / split
    if not folder.is_dir():
      continue
    # Hidden folders (.ipynb_checkpoints, .DS_Store's kin) are not classes.
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
      raise ProbeDataError(f"{folder}: a split needs at least two classes, found {names}")
    if classes is None:
      classes = names
    elif names != classes:
      raise ProbeDataError(f"{folder}: classes {names} differ from those of {root / 'train'}: {classes}")
    items = []
    for index, name in enumerate(names):
      files = sorted(p for p in (folder / name).iterdir()
                     if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
      if not files:
        raise ProbeDataError(f"{folder / name}: empty class folder (no {sorted(IMAGE_SUFFIXES)} files)")
      for p in files:
        try:
          items += [(item, index) for item in folder_items(p, slices)]
        except ImageError as e:
          if on_bad is None:
            raise ProbeDataError(f"unreadable volume: {e}") from None
          on_bad(p, f"{type(e).__name__}: {e}")
    splits[split] = items
  return splits, classes


def stratified_split(items, fraction=0.15, seed=0):
  """(train, val, classes left without validation images): a stratified `fraction` of `items` for validation,
  per class at least one, but never a class's only training image."""
  rng = np.random.default_rng(seed)
  labels = np.array([y for _, y in items])
  val = np.zeros(len(items), bool)
  without_val = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < 2:
      without_val.append(int(c))
      continue
    val[rng.permutation(idx)[:max(1, int(round(fraction * len(idx))))]] = True
  return ([it for it, v in zip(items, val) if not v], [it for it, v in zip(items, val) if v], without_val)


def unreadable(paths, workers: int = 8) -> dict:
  """{path: reason} of the images that do not open and decode fully (truncated, corrupt, unsupported)."""
  def one(path):
    try:
      _as_pil_rgb(path).load()
      return None
    except (ImageError, OSError, ValueError, SyntaxError) as e:
      return f"{type(e).__name__}: {e}"
  with ThreadPoolExecutor(workers) as pool:
    return {p: why for p, why in zip(paths, pool.map(one, paths)) if why is not None}


def load_images(paths, image_size: int, backbone: str, workers: int = 8) -> np.ndarray:
  """Images of any size and format -> (N, size, size, 3) model inputs (the FM's preprocessing)."""
  def one(path):
    try:
      return preprocess(read_image(path), image_size, backbone)
    except ImageError as e:
      raise ProbeDataError(f"unreadable image: {e}") from e
  with ThreadPoolExecutor(workers) as pool:
    return np.stack(list(pool.map(one, paths)))


def _as_pil_rgb(path):
  """The image as the original's loader opens it: PIL, converted to 8-bit RGB. Formats PIL cannot read (.npy,
  DICOM) are read by the project's reader and scaled to 8 bits by their bit depth first."""
  from PIL import Image
  if not hasattr(path, "read_pixels") and Path(path).suffix.lower() in PIL_SUFFIXES:
    with Image.open(path) as img:
      return img.convert("RGB")
  gray = np.round(scale_intensity(read_image(path)) * 255).astype(np.uint8)
  return Image.fromarray(gray).convert("RGB")


def load_gray_u8(paths, image_size: int, workers: int = 8) -> np.ndarray:
  """The original probe's preprocessing up to `ToTensor`, in its order: 8-bit RGB, PIL bilinear resize to
  (size, size), grey (PIL's "L"). -> (N, size, size) uint8; /255, augmentation and normalisation follow on
  device (augment.py)."""
  from PIL import Image

  def one(path):
    try:
      img = _as_pil_rgb(path).resize((image_size, image_size), Image.BILINEAR)
    except (ImageError, OSError, ValueError) as e:
      raise ProbeDataError(f"unreadable image {path}: {e}") from e
    return np.asarray(img.convert("L"), np.uint8)
  with ThreadPoolExecutor(workers) as pool:
    return np.stack(list(pool.map(one, paths)))
