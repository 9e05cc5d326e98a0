"""TensorFlow-Datasets builders (array_record; no TensorFlow needed) for data prepared once, trained on often.

- `oct_report_pairs`: a manifest of OCT–report pairs, split by its `split` column (rows without one: train).
- `oct_image_folder`: an ImageFolder classification dataset root/{train,val,test}/<class>/<image>.

Every B-scan is stored as the bytes of a 16-bit greyscale PNG (`decode_png16` reads it) of its 2-D array after
slice selection: 8-bit images are multiplied by 257 (so bit-depth scaling gives exactly the same [0, 1]
values), 16-bit images are kept, float images are min-max scaled to 16 bits. Read back with
`tfds.data_source`, records feed the same Grain pipeline:

    python -m retfiner_jax.data.tfds_builders pairs MANIFEST --data-dir DIR
    python -m retfiner_jax.data.tfds_builders folder ROOT --data-dir DIR
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from retfiner_jax.data.images import IMAGE_SUFFIXES, read_image
from retfiner_jax.data.manifest import Columns, read_manifest


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
  """OCT B-scans with their reports, from a manifest."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, manifest=None, columns: Columns = Columns(), **kwargs):
    self._manifest, self._columns = manifest, columns
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": IMAGE, "report": tfds.features.Text(), "id": tfds.features.Text(),
        "patient": tfds.features.Text(), "eye": tfds.features.Text(), "row": np.int64}))

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
      yield r["row"], {"image": png16(read_image(r["image"], r["slice"])), "report": r["report"],
                       "id": r["id"] or "", "patient": r["patient"] or "", "eye": r["eye"] or "", "row": r["row"]}


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
# Reading back into the Grain pipeline.

_SOURCES: dict = {}


def _source(data_dir, split):
  key = (str(data_dir), split)
  if key not in _SOURCES:
    _SOURCES[key] = tfds.data_source("oct_report_pairs", data_dir=str(data_dir), split=split)
  return _SOURCES[key]


def read_tfds_pixels(record) -> np.ndarray:
  data_dir, split, index = record["tfds"]
  return decode_png16(_source(data_dir, split)[index]["image"])


def pairs_records(data_dir, split: str) -> list[dict]:
  """Manifest-like records of a built `oct_report_pairs` split (images are read lazily by the pipeline)."""
  skip = _source(data_dir, split)
  records = []
  for i in range(len(skip)):
    ex = skip[i]
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    records.append({"row": int(ex["row"]), "image": f"tfds:{split}[{i}]", "tfds": (str(data_dir), split, i),
                    "report": text(ex["report"]), "id": text(ex["id"]) or None, "slice": None})
  return sorted(records, key=lambda r: r["row"])  # TFDS stores examples in hashed-key order.


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("kind", choices=["pairs", "folder"])
  p.add_argument("source", help="a manifest (pairs) or an ImageFolder root (folder)")
  p.add_argument("--data-dir", required=True)
  a = p.parse_args(argv)
  print(f"built {build(a.kind, a.source, a.data_dir)}")


if __name__ == "__main__":
  main()
