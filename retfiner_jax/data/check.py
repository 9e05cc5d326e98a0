"""Validates every row of a manifest before training.

    python -m retfiner_jax.data.check MANIFEST [--image-column image] [--report-column report] [--workers 8]

Checks each row: image path given and present, decodes, 2-D after slice selection, slice index in range,
finite pixels, report non-empty and valid UTF-8. Prints a table of problems by kind with the first offending
rows (row number, path) and exits 0 only when there is no problem.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from retfiner_jax.data.images import ImageError, read_image
from retfiner_jax.data.manifest import Columns, ManifestError, read_manifest

KINDS = {
    "missing_path": "no image path in the row",
    "missing_file": "image file not found",
    "unsupported_format": "unsupported image format",
    "undecodable": "image does not decode",
    "not_2d": "not a 2-D B-scan after slice selection",
    "slice_out_of_range": "slice index out of range",
    "non_finite": "NaN or infinite pixels",
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
      read_image(record["image"], record.get("slice"))
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


def problem_table(records, bad, first=5) -> str:
  by_kind = defaultdict(list)
  paths = {r["row"]: r["image"] for r in records}
  for row, problems in sorted(bad.items()):
    for kind, _ in problems:
      by_kind[kind].append(row)
  lines = [f"{'problem':<44}{'rows':>7}  first rows (row: path)"]
  for kind, rows in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
    examples = "; ".join(f"{r}: {paths[r] or '-'}" for r in rows[:first])
    lines.append(f"{KINDS.get(kind, kind):<44}{len(rows):>7}  {examples}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("manifest")
  p.add_argument("--image-column", default="image")
  p.add_argument("--report-column", default="report")
  p.add_argument("--slice-column", default="slice")
  p.add_argument("--workers", type=int, default=8)
  a = p.parse_args(argv)
  try:
    records = read_manifest(a.manifest, Columns(image=a.image_column, report=a.report_column, slice=a.slice_column))
  except ManifestError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  bad = check_records(records, a.workers, log=print)
  if not bad:
    print(f"{a.manifest}: all {len(records)} rows are usable")
    return 0
  print(f"{a.manifest}: {len(bad)} of {len(records)} rows have problems (rows numbered from 1, header excluded)")
  print(problem_table(records, bad))
  return 1


if __name__ == "__main__":
  sys.exit(main())
