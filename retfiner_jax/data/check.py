"""Validates every row of a manifest before training.

    python -m retfiner_jax.data.check MANIFEST [--image-column image] [--report-column report] [--workers 8]
                                      [--report problems.csv]

Checks each row: image path given and present, decodes, 2-D after slice selection, slice index in range,
finite pixels that fit float32, pixel values (not strings), report non-empty and valid UTF-8. Prints a table of
problems by kind with the offending rows (row number, path; all of them up to 20 a kind) and writes every bad
row with its reasons to a CSV report when there are more. Also warns (without failing) about duplicate rows and
images the pipeline will convert: alpha or colour channels dropped, 16-bit scaled, very large images resized.
Exits 0 only when there is no problem.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from retfiner_jax.data.images import IMAGE_SUFFIXES, ImageError, read_image
from retfiner_jax.data.manifest import Columns, ManifestError, read_manifest, slice_indices

KINDS = {
    "missing_path": "no image path in the row",
    "missing_file": "image file not found",
    "unsupported_format": "unsupported image format",
    "undecodable": "image does not decode",
    "not_2d": "not a 2-D B-scan after slice selection",
    "slice_out_of_range": "slice index out of range",
    "not_a_volume": "slice range or * on a file that is not a volume",
    "missing_reader": "needs an optional reader (pip install)",
    "non_finite": "NaN or infinite pixels",
    "overflow": "pixel values overflow float32",
    "not_pixels": "array of strings or objects, not pixels",
    "empty_report": "empty report text",
    "invalid_utf8": "report is not valid UTF-8",
}


def check_record(record) -> list[tuple[str, str]]:
  """-> [(kind, message)] for one manifest record."""
  problems = []
  report = record["report"]
  try:
    report.encode("utf-8")
  except UnicodeEncodeError:
    problems.append(("invalid_utf8", "report holds bytes that are not UTF-8"))
  if not report.strip():
    problems.append(("empty_report", "report is empty"))
  if not record["image"]:
    problems.append(("missing_path", "no image path"))
  else:
    try:
      spec = record.get("slice")
      if isinstance(spec, str):  # A range or *: the volume's length from its header, then its first and last.
        indices = slice_indices(record["image"], spec)
        for index in sorted({indices[0], indices[-1]}):
          read_image(record["image"], index)
      else:
        read_image(record["image"], spec)
    except ImageError as e:
      problems.append((e.kind, str(e)))
  return problems


def check_records(records, workers: int = 8, log=None):
  """-> {row: [(kind, message)]} for every row with a problem."""
  bad, start = {}, time.time()
  with ThreadPoolExecutor(workers) as pool:
    for n, (record, problems) in enumerate(zip(records, pool.map(check_record, records)), 1):
      if problems:
        bad[record["row"]] = problems
      if log and (n % 2000 == 0 or n == len(records)):
        log(f"checked {n}/{len(records)} rows ({time.time() - start:.0f} s), {len(bad)} with problems")
  return bad


LARGE_SIDE = 4096  # Pixels; larger images are resized all the same, but it is worth a look.


def problem_table(records, bad, first=20, report_path=None) -> str:
  """Problems by kind with their rows (all of them, up to `first` a kind). With more, and a `report_path`, every
  bad row and its reasons go to that CSV and the table says so."""
  by_kind = defaultdict(list)
  paths = {r["row"]: r["image"] for r in records}
  for row, problems in sorted(bad.items()):
    for kind, _ in problems:
      by_kind[kind].append(row)
  lines = [f"{'problem':<44}{'rows':>7}  rows (row: path)"]
  cut = False
  for kind, rows in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
    examples = "; ".join(f"{r}: {paths[r] or '-'}" for r in rows[:first])
    more = f"; ... {len(rows) - first} more" if len(rows) > first else ""
    cut |= len(rows) > first
    lines.append(f"{KINDS.get(kind, kind):<44}{len(rows):>7}  {examples}{more}")
    reason = next(message for k, message in bad[rows[0]] if k == kind)
    lines.append(f"{'':<44}{'':>7}  e.g. row {rows[0]}: {reason}")  # The reason, and a fix where there is one.
  if cut and report_path is not None:
    write_problem_report(report_path, records, bad)
    lines.append(f"every bad row with its reasons: {report_path}")
  return "\n".join(lines)


def write_problem_report(path, records, bad):
  """CSV: row, image, problem, message; one line per problem of every bad row."""
  paths = {r["row"]: r["image"] for r in records}
  with Path(path).open("w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["row", "image", "problem", "message"])
    for row, problems in sorted(bad.items()):
      for kind, message in problems:
        w.writerow([row, paths[row], kind, message.encode("utf-8", "replace").decode("utf-8")])


def conversion_notes(record) -> list[str]:
  """What the pipeline will do to a usable image that is not a plain grey B-scan (not problems)."""
  if not record["image"] or hasattr(record["image"], "read_pixels"):  # Stored 16-bit grey by tfds_builders.
    return []
  path = Path(record["image"])
  if path.suffix.lower() not in IMAGE_SUFFIXES or not path.exists():
    return []
  from PIL import Image
  try:
    with Image.open(path) as im:
      mode, size = im.mode, im.size
  except Exception:  # noqa: BLE001 - an unreadable file is a problem reported by check_record.
    return []
  notes = []
  if mode in ("RGBA", "LA", "PA"):
    notes.append("alpha channel dropped")
  if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
    notes.append("colour converted to grey")
  if mode.startswith("I;16") or mode == "I":
    notes.append("16-bit, scaled by its bit depth")
  if max(size) > LARGE_SIDE:
    notes.append(f"very large ({size[0]}x{size[1]}), resized")
  return notes


def duplicate_rows(records) -> dict:
  """{row: the first row with the same image, slice and report}."""
  first, out = {}, {}
  for r in records:
    key = (r["image"], r.get("slice"), r["report"])
    if key in first:
      out[r["row"]] = first[key]
    else:
      first[key] = r["row"]
  return out


def warning_lines(records, workers: int = 8, first: int = 20) -> list[str]:
  notes = defaultdict(list)
  with ThreadPoolExecutor(workers) as pool:
    for record, found in zip(records, pool.map(conversion_notes, records)):
      for note in found:
        notes[note.split(" (")[0]].append(record["row"])
  lines = []
  for note, rows in sorted(notes.items()):
    more = f", ... {len(rows) - first} more" if len(rows) > first else ""
    lines.append(f"warning: {len(rows)} rows: {note} (rows {', '.join(map(str, rows[:first]))}{more})")
  duplicates = duplicate_rows(records)
  if duplicates:
    pairs = ", ".join(f"{row} = {orig}" for row, orig in list(duplicates.items())[:first])
    lines.append(f"warning: {len(duplicates)} duplicate rows, same image, slice and report as an earlier row "
                 f"({pairs}{', ...' if len(duplicates) > first else ''})")
  return lines


def _positive(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
  return int(text)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("manifest")
  p.add_argument("--image-column", default="image")
  p.add_argument("--report-column", default="report")
  p.add_argument("--slice-column", default="slice")
  p.add_argument("--workers", type=_positive, default=8, help="threads reading images (at least 1)")
  p.add_argument("--report", default=None, help="CSV of every bad row and its reasons, written when a kind has "
                 "more rows than the table shows (default: MANIFEST.problems.csv in the current folder)")
  a = p.parse_args(argv)
  try:
    records = read_manifest(a.manifest, Columns(image=a.image_column, report=a.report_column, slice=a.slice_column),
                            expand_volumes=False)
  except ManifestError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  bad = check_records(records, a.workers, log=print)
  for line in warning_lines(records, a.workers):
    print(line)
  if not bad:
    print(f"{a.manifest}: all {len(records)} rows are usable")
    return 0
  print(f"{a.manifest}: {len(bad)} of {len(records)} rows have problems (rows numbered from 1, header excluded)")
  print(problem_table(records, bad, report_path=a.report or f"{Path(a.manifest).stem}.problems.csv"))
  return 1


if __name__ == "__main__":
  sys.exit(main())
