"""TensorFlow-Datasets builders (array_record; no TensorFlow needed) for data prepared once, trained on often.

- `oct_report_pairs`: a manifest of OCT–report pairs, split by its `split` column (rows without one: train).
- `oct_image_folder`: an ImageFolder classification dataset root/{train,val,test}/<class>/<image>.

Every B-scan is stored as the bytes of a 16-bit greyscale PNG (`decode_png16` reads it) of its 2-D array after
slice selection: 8-bit images are multiplied by 257 (so bit-depth scaling gives exactly the same [0, 1]
values), 16-bit images are kept, float images are min-max scaled to 16 bits. Read back with
`tfds.data_source`, records feed the same Grain pipeline; training takes a built `oct_report_pairs` folder as
`config.data.train_manifest`/`val_manifest` (splits "train"/"val", or `DIR:split`), the probe a built
`oct_image_folder` as a dataset:

    python -m retfiner_jax.data.tfds_builders pairs MANIFEST --data-dir DIR
    python -m retfiner_jax.data.tfds_builders folder ROOT --data-dir DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from retfiner_jax.data.images import IMAGE_SUFFIXES, read_image
from retfiner_jax.data.manifest import Columns, read_manifest
from retfiner_jax.errors import UserError


def to_uint16(a: np.ndarray) -> np.ndarray:
  if a.dtype == np.uint8:
    return a.astype(np.uint16) * 257
  if a.dtype == np.uint16:
    return a
  a = a.astype(np.float64)
  low, high = a.min(), a.max()
  return np.round((a - low) / (high - low) * 65535).astype(np.uint16) if high > low else np.zeros(a.shape, np.uint16)


def png16(a: np.ndarray) -> bytes:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(to_uint16(a)).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


# The PNG bytes, decoded by us with PIL (TFDS's own Image feature needs TensorFlow or OpenCV for 16 bits).
IMAGE = tfds.features.Tensor(shape=(), dtype=np.object_)


def decode_png16(data: bytes) -> np.ndarray:
  from PIL import Image
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im).astype(np.uint16)


class OctReportPairs(tfds.core.GeneratorBasedBuilder):
  """OCT B-scans with their reports, from a manifest (volume rows give one example per B-scan)."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "B-scans, reports, ids, patients, eyes, manifest rows.",
                   "1.1.0": "Each example's B-scan index in its volume (slice, -1 for a single image)."}

  def __init__(self, *, manifest=None, columns: Columns = Columns(), **kwargs):
    self._manifest, self._columns = manifest, columns
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": IMAGE, "report": tfds.features.Text(), "id": tfds.features.Text(),
        "patient": tfds.features.Text(), "eye": tfds.features.Text(), "row": np.int64, "slice": np.int64}))

  def _split_generators(self, dl_manager):
    if self._manifest is None:
      raise ValueError("oct_report_pairs: give manifest= to build the dataset")
    records = read_manifest(self._manifest, self._columns)
    splits: dict = {}
    for r in records:
      splits.setdefault(r["split"] or "train", []).append(r)
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, records):
    for r in records:
      # A row whose slice is a range or * gives one example per B-scan (read_manifest expands it): keyed apart.
      yield f"{r['row']}:{r['slice']}", {
          "image": png16(read_image(r["image"], r["slice"])), "report": r["report"], "id": r["id"] or "",
          "patient": r["patient"] or "", "eye": r["eye"] or "", "row": r["row"],
          "slice": -1 if r["slice"] is None else int(r["slice"])}


class OctImageFolder(tfds.core.GeneratorBasedBuilder):
  """An ImageFolder classification dataset of B-scans."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, root=None, **kwargs):
    self._root = Path(root) if root is not None else None
    self._classes = sorted(p.name for p in (self._root / "train").iterdir() if p.is_dir()) if root else None
    super().__init__(**kwargs)

  def _info(self):
    label = tfds.features.ClassLabel(names=self._classes) if self._classes else tfds.features.ClassLabel(num_classes=2)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": IMAGE, "label": label, "path": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    if self._root is None:
      raise ValueError("oct_image_folder: give root= to build the dataset")
    return {s: self._generate_examples(self._root / s) for s in ("train", "val", "test") if (self._root / s).is_dir()}

  def _generate_examples(self, folder):
    for label in self._classes:
      for path in sorted(p for p in (folder / label).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = str(path.relative_to(self._root))
        yield rel, {"image": png16(read_image(path)), "label": label, "path": rel}


def build(kind: str, source, data_dir) -> Path:
  builder = (OctReportPairs(manifest=source, data_dir=str(data_dir), file_format="array_record") if kind == "pairs"
             else OctImageFolder(root=source, data_dir=str(data_dir), file_format="array_record"))
  builder.download_and_prepare()
  return Path(builder.data_dir)


# ---------------------------------------------------------------------------------------------------------
# Reading back: training (`config.data.train_manifest=DIR`) and the probe (`--data=DIR`) take a built folder.

class TfdsDataError(UserError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class TfdsImage:
  """One B-scan of a built dataset, read on demand: it stands where a file path would (`images.read_image`
  reads it, the probe's feature cache identifies it by the dataset's files)."""
  version_dir: str
  split: str
  index: int

  def __str__(self):
    return f"{self.version_dir}:{self.split}[{self.index}]"

  def read_pixels(self) -> np.ndarray:
    return decode_png16(_source(self.version_dir, self.split)[self.index]["image"])

  def identity(self) -> str:
    return f"{self}|{_split_files(self.version_dir, self.split)}"


@functools.lru_cache(maxsize=None)
def _split_files(version_dir: str, split: str) -> str:
  """Names, sizes and modification times of a split's record files."""
  files = sorted(Path(version_dir).glob(f"*-{split}.*"))
  return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def find_dataset(path, name: str) -> Path:
  """A built dataset's version folder, given it, the dataset's folder or the data_dir holding it."""
  path = Path(path)
  found = {}
  version = lambda info: tuple(int(v) if v.isdigit() else 0 for v in info.parent.name.split("."))
  for info in (path / "dataset_info.json", *sorted(path.glob("*/dataset_info.json"), key=version, reverse=True),
               *sorted(path.glob("*/*/dataset_info.json"), key=version, reverse=True)):  # The newest version.
    if info.exists():
      found.setdefault(json.loads(info.read_text()).get("name"), info.parent)
  if name in found:
    return found[name]
  if found:
    raise TfdsDataError(f"{path}: holds built {sorted(found)} data, not {name!r}")
  raise TfdsDataError(f"{path}: no built {name} dataset here (no dataset_info.json); build one with "
                      f"python -m retfiner_jax.data.tfds_builders")


_SOURCES: dict = {}


def _source(version_dir, split: str):
  key = (str(version_dir), split)
  if key not in _SOURCES:
    builder = tfds.builder_from_directory(str(version_dir))
    if split not in builder.info.splits:
      raise TfdsDataError(f"{version_dir}: no split {split!r}; it has {sorted(builder.info.splits)} (name one as "
                          f"DIR:split)")
    _SOURCES[key] = builder.as_data_source(split=split)
  return _SOURCES[key]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def pairs_records(path, split: str) -> list[dict]:
  """Manifest-like records of a built `oct_report_pairs` split (images are read lazily by the pipeline)."""
  version_dir = find_dataset(path, "oct_report_pairs")
  source = _source(version_dir, split)
  keyed = []
  for i in range(len(source)):
    ex = source[i]
    keyed.append(((int(ex["row"]), int(ex.get("slice", -1))),  # Built before 1.1.0: no slice.
                  {"row": int(ex["row"]), "image": TfdsImage(str(version_dir), split, i),
                   "report": _text(ex["report"]), "id": _text(ex["id"]) or None, "slice": None}))
  keyed.sort(key=lambda kv: kv[0])  # TFDS stores examples in hashed-key order.
  return [record for _, record in keyed]


def folder_items(path) -> tuple[dict, list[str]]:
  """A built `oct_image_folder` -> ({split: [(TfdsImage, class index)]}, class names), as
  probe/folders.read_image_folder gives for the folder it was built from (items in path order)."""
  version_dir = find_dataset(path, "oct_image_folder")
  builder = tfds.builder_from_directory(str(version_dir))
  classes = list(builder.info.features["label"].names)
  splits = {}
  for split in ("train", "val", "test"):
    if split not in builder.info.splits:
      continue
    source = _source(version_dir, split)
    rows = sorted((_text(source[i]["path"]), i, int(source[i]["label"])) for i in range(len(source)))
    splits[split] = [(TfdsImage(str(version_dir), split, i), label) for _, i, label in rows]
  if "train" not in splits or "test" not in splits:
    raise TfdsDataError(f"{version_dir}: the probe needs train and test splits, found {sorted(splits)}")
  return splits, classes


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("kind", choices=["pairs", "folder"])
  p.add_argument("source", help="a manifest (pairs) or an ImageFolder root (folder)")
  p.add_argument("--data-dir", required=True)
  a = p.parse_args(argv)
  print(f"built {build(a.kind, a.source, a.data_dir)}")


if __name__ == "__main__":
  main()
