"""Manifests of OCT–report pairs: CSV, TSV, JSON Lines or Parquet, one row per B-scan.

Required columns: the image path (relative to the manifest's folder, or absolute) and the report text
(default names `image` and `report`). Optional: `id` (image/report id: pairs sharing it are never ITM
negatives of each other), `patient`, `eye`, `split`, `slice`: which B-scans of a volume file (.npy, TIFF, DICOM,
or a device maker's volume: data/vendor.py) the row means: an index (from 0), an inclusive range `3-7`, or `*`
for every B-scan. A range or `*` becomes one record per B-scan when the manifest is read, all with the row's
report and the row's `id` (one made from the row when it has none), so none is another's ITM negative.
Rows are numbered from 1 (the first data row) in every message.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from retfiner_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Columns:
  image: str = "image"
  report: str = "report"
  id: str = "id"
  patient: str = "patient"
  eye: str = "eye"
  split: str = "split"
  slice: str = "slice"


class ManifestError(UserError, ValueError):
  pass


def _read_csv(path: Path, delimiter: str) -> list[dict]:
  # utf-8-sig drops the byte-order mark Excel writes; surrogateescape keeps invalid UTF-8 bytes visible to the
  # checker instead of failing the whole file. strict: a quote never closed is an error, not rows swallowed.
  rows = []
  with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
    reader = csv.DictReader(f, delimiter=delimiter, strict=True)
    reader.fieldnames  # Reads the header, so that line numbers below count it.
    while True:
      line = reader.reader.line_num + 1
      try:
        row = next(reader)
      except StopIteration:
        return rows
      except csv.Error as e:
        raise ManifestError(f"{path}: row {len(rows) + 1} (line {line}) cannot be parsed ({e}); a quote that is "
                            f"never closed makes the rest of the file one field") from None
      if None in row:  # More fields than the header names.
        raise ManifestError(f"{path}: row {len(rows) + 1} (line {line}) has {len(row) - 1 + len(row[None])} "
                            f"fields, the header {len(row) - 1}; quote fields that hold a {delimiter!r}")
      rows.append(row)


def _read_rows(path: Path) -> list[dict]:
  suffix = path.suffix.lower()
  if suffix in (".csv", ".tsv", ".txt"):
    return _read_csv(path, "\t" if suffix == ".tsv" else ",")
  if suffix in (".jsonl", ".ndjson"):
    rows = []
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: row {len(rows) + 1} (line {n}) is not valid JSON: {e}") from None
          if not isinstance(row, dict):
            raise ManifestError(f"{path}: row {len(rows) + 1} (line {n}) is a JSON {type(row).__name__}, not an "
                                f"object with the columns as keys")
          rows.append(row)
    return rows
  if suffix == ".parquet":
    import pyarrow.parquet as pq
    try:
      return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file.
      raise ManifestError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
  raise ManifestError(f"{path}: unsupported manifest type {suffix!r} (use .csv, .tsv, .jsonl or .parquet)")


def _optional_int(value, path, row, column):
  if value is None or value == "":
    return None
  try:
    return int(float(value))
  except (TypeError, ValueError):
    raise ManifestError(f"{path}: row {row}: column {column!r} must be an integer, got {value!r}") from None


def _slice_spec(value, path, row, column):
  """None, an index, or a range / every B-scan kept as text ("3-7", "*") until the volume's length is known."""
  text = "" if value is None else str(value).strip()
  if text == "*":
    return "*"
  first, dash, last = text.partition("-")
  if dash and first.strip().isdigit() and last.strip().isdigit():
    if int(first) > int(last):
      raise ManifestError(f"{path}: row {row}: column {column!r}: range {text!r} runs backwards")
    return f"{int(first)}-{int(last)}"
  try:
    return _optional_int(value, path, row, column)
  except ManifestError:
    raise ManifestError(f"{path}: row {row}: column {column!r} must be a B-scan index, an inclusive range like "
                        f"3-7, or * (every B-scan), got {value!r}") from None


def slice_indices(image, spec) -> list[int]:
  """The B-scan indices of a range or `*` in the volume file `image`, its length read from the file
  (images.ImageError when it is not a volume, does not read, or the range is outside it)."""
  from retfiner_jax.data.images import ImageError, volume_length
  length = volume_length(image)
  if spec == "*":
    return list(range(length))
  first, last = (int(v) for v in str(spec).split("-"))
  if last >= length:
    raise ImageError("slice_out_of_range", f"slice range {spec} outside the volume's B-scans 0..{length - 1} "
                     f"of {image}")
  return list(range(first, last + 1))


def expand_slices(records: list[dict], path) -> list[dict]:
  """Each record whose slice is a range or `*` -> one record per B-scan (the volume's length read from its file),
  sharing the row's id (or one made from the row)."""
  from retfiner_jax.data.images import ImageError
  out = []
  for r in records:
    if not isinstance(r["slice"], str):
      out.append(r)
      continue
    try:
      indices = slice_indices(r["image"], r["slice"])
    except ImageError as e:
      raise ManifestError(f"{path}: row {r['row']}: {e}") from None
    ident = r["id"] or f"{Path(path).name}:row{r['row']}"
    out += [{**r, "slice": i, "id": ident} for i in indices]
  return out


def read_manifest(path, columns: Columns = Columns(), need_reports: bool = True,
                  expand_volumes: bool = True) -> list[dict]:
  """-> one dict per B-scan: row, image (absolute path), report, id, patient, eye, split, slice. `need_reports`:
  False for image-only uses (MAE pretraining), where a manifest may have no report column. `expand_volumes`:
  False keeps a row whose slice is a range or `*` as one record, its slice as written (the checker's view)."""
  path = Path(path)
  if not path.exists():
    raise ManifestError(f"{path}: manifest not found")
  rows = _read_rows(path)
  if not rows:
    raise ManifestError(f"{path}: the manifest has no rows")
  present = set(rows[0])
  for col in (columns.image, columns.report) if need_reports else (columns.image,):
    if col not in present:
      raise ManifestError(f"{path}: required column {col!r} not found; columns are {sorted(present)}")
  records = []
  for n, r in enumerate(rows, 1):
    image = r.get(columns.image)
    if image is None or str(image).strip() == "":
      image_path = ""
    else:
      image_path = str(image)
      if not Path(image_path).is_absolute():
        image_path = str((path.parent / image_path).resolve())
    ident = r.get(columns.id)
    records.append({
        "row": n,
        "image": image_path,
        "report": "" if r.get(columns.report) is None else str(r.get(columns.report)),
        "id": None if ident in (None, "") else str(ident),
        "patient": None if r.get(columns.patient) in (None, "") else str(r.get(columns.patient)),
        "eye": None if r.get(columns.eye) in (None, "") else str(r.get(columns.eye)),
        "split": None if r.get(columns.split) in (None, "") else str(r.get(columns.split)),
        "slice": _slice_spec(r.get(columns.slice), path, n, columns.slice),
    })
  return expand_slices(records, path) if expand_volumes else records


def write_manifest(path, records: list[dict], fields=("image", "report", "id", "patient", "eye", "split", "slice")):
  """Writes records as CSV/TSV/JSONL/Parquet by suffix (image paths as given)."""
  path = Path(path)
  rows = [{f: r.get(f) for f in fields if f in r} for r in records]
  suffix = path.suffix.lower()
  if suffix in (".csv", ".tsv"):
    with path.open("w", newline="", encoding="utf-8") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
      w.writeheader()
      w.writerows(rows)
  elif suffix == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  elif suffix == ".parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    raise ManifestError(f"{path}: unsupported manifest type {suffix!r}")


def tfds_split(value: str, which: str) -> tuple[str, str]:
  """A manifest setting -> (path, split): a built dataset folder is read at split `which` ("train", "val"), or
  at the split named after a colon (`DIR:validation`)."""
  head, sep, tail = str(value).rpartition(":")
  if sep and tail and "/" not in tail and Path(head).is_dir():
    return head, tail
  return str(value), which
