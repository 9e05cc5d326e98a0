"""Device makers' OCT volumes, read through eyepy (the optional extra `pip install "retfiner-jax[vendor]"`).

  Heidelberg HEYEX VOL (.vol), HEYEX XML export (.xml beside its B-scan TIFFs), Heidelberg E2E (.e2e),
  Topcon FDA (.fda, eyepy reads it through oct-converter), Duke's MATLAB volumes (.mat).

Every volume becomes a uint8 array (B-scans, height, width). A VOL file stores float reflectivity; it is shown as
Heidelberg's viewer shows it, by the transform eyepy applies to VOL data (tested equal to eyepy's own):
  v <= 1: (ln(v + 2.44e-4) + 8.3) / 8.285, clipped to [0, 1];   float32's largest value (no data): 0;
then x 255, rounded. The other formats take eyepy's display data as it gives them (XML exports are 8-bit TIFFs).
A volume is read whole; the last few read are kept, so the rows of one volume read it once.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

# suffix: (what it is, eyepy's reader, extra packages the reader needs beyond eyepy)
READERS = {
    ".vol": ("Heidelberg HEYEX VOL", "import_heyex_vol", ()),
    ".xml": ("Heidelberg HEYEX XML export", "import_heyex_xml", ()),
    ".e2e": ("Heidelberg E2E", "import_heyex_e2e", ()),
    ".fda": ("Topcon FDA", "import_topcon_fda", ("oct_converter",)),
    ".mat": ("Duke MATLAB volume", "import_duke_mat", ()),
}
INSTALL = {"eyepy": 'pip install "retfiner-jax[vendor]" (or: pip install eyepy)',
           "oct_converter": "pip install oct-converter"}
NO_DATA = np.finfo(np.float32).max


class VendorError(ValueError):
  """A volume that cannot be read; `kind` as images.ImageError's ("missing_reader", "undecodable", ...)."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def heyex_vol_display(raw: np.ndarray) -> np.ndarray:
  """VOL reflectivity (float) -> the 8-bit grey Heidelberg's viewer shows (module docstring)."""
  raw = np.asarray(raw, np.float64)
  shown = np.where(raw <= 1, (np.log(np.clip(raw, 0, None) + 2.44e-4) + 8.3) / 8.285, raw)
  shown = np.where(raw == NO_DATA, 0.0, shown)
  return np.round(np.clip(shown, 0, 1) * 255).astype(np.uint8)


def _reader(path: Path):
  what, name, extras = READERS[path.suffix.lower()]
  for module in ("eyepy",) + extras:
    try:
      __import__(module)
    except ImportError:
      raise VendorError("missing_reader", f"{path}: reading a {what} file needs {module}: {INSTALL[module]}") from None
  import eyepy
  return getattr(eyepy, name)


@functools.lru_cache(maxsize=4)
def _read(path: str, _mtime_ns: int, _size: int) -> np.ndarray:
  p = Path(path)
  reader = _reader(p)
  try:
    quiet = logging.getLogger("eyepy")  # It warns of layer annotations, which are not read here.
    level, quiet.level = quiet.level, logging.ERROR
    try:
      volume = reader(p)
    finally:
      quiet.setLevel(level)
    if p.suffix.lower() == ".vol":
      data = heyex_vol_display(volume.raw_data)
    else:
      data = np.asarray(volume.data)
  except VendorError:
    raise
  except Exception as e:  # noqa: BLE001 - parsers raise many types for truncated or garbled files.
    raise VendorError("undecodable", f"{p}: cannot read as {READERS[p.suffix.lower()][0]} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if data.ndim == 2:
    data = data[None]
  if data.ndim != 3 or 0 in data.shape:
    raise VendorError("undecodable", f"{p}: the {READERS[p.suffix.lower()][0]} file holds no B-scans "
                      f"(shape {data.shape})")
  data.setflags(write=False)
  return data


def read_volume(path) -> np.ndarray:
  """The volume's B-scans, uint8 (n, height, width), read-only (shared by the rows that read it)."""
  p = Path(path)
  if p.suffix.lower() not in READERS:
    raise VendorError("unsupported_format", f"{p}: not a device maker's volume ({sorted(READERS)})")
  if not p.exists():
    raise VendorError("missing_file", f"{p}: file not found")
  stat = p.stat()
  return _read(str(p.resolve()), stat.st_mtime_ns, stat.st_size)
