"""Device makers' OCT volumes, read through eyepy (the optional extra `pip install "retfiner-jax[vendor]"`).

  Heidelberg HEYEX VOL (.vol), HEYEX XML export (.xml beside its B-scan TIFFs), Heidelberg E2E (.e2e),
  Topcon FDA (.fda, eyepy reads it through oct-converter), Duke's MATLAB volumes (.mat).

Every volume becomes a uint8 array (B-scans, height, width). A VOL file stores float reflectivity; it is shown as
Heidelberg's viewer shows it, by the transform eyepy applies to VOL data (tested equal to eyepy's own):
  v <= 1: (ln(v + 2.44e-4) + 8.3) / 8.285, clipped to [0, 1];   float32's largest value (no data): 0;
then x 255, rounded. The other formats take eyepy's display data as it gives them (XML exports are 8-bit TIFFs).

A volume is parsed whole. So that training, which reads its B-scans in shuffled order and from several worker
processes, parses each volume once and not once per B-scan, the 8-bit B-scans are kept as a .npy file in a cache
folder (keyed by the file's path, size and modification time; written whole, then renamed) and read from it
memory-mapped: `RETFINER_VOLUME_CACHE` names the folder (default $XDG_CACHE_HOME or ~/.cache, then
retfiner_jax/volumes), `off` keeps nothing on disk. The last few volumes read are also kept in memory.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
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


def cache_dir() -> Path | None:
  """The folder of decoded volumes (module docstring), None when `RETFINER_VOLUME_CACHE=off`."""
  setting = os.environ.get("RETFINER_VOLUME_CACHE", "")
  if setting.lower() == "off":
    return None
  if setting:
    return Path(setting).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retfiner_jax" / "volumes"


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> np.ndarray:
  folder = cache_dir()
  if folder is None:
    return _parse(path)
  key = hashlib.sha256(f"{path}|{size}|{mtime_ns}|display-v1".encode()).hexdigest()[:32]
  cached = folder / f"{Path(path).stem[:40]}-{key}.npy"
  if cached.exists():
    try:
      return np.load(cached, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # A damaged cache file: parse the volume again and replace it.
      pass
  data = _parse(path)
  tmp = None
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      np.save(f, data, allow_pickle=False)
    os.replace(tmp, cached)  # Whole or not at all, also with several processes writing the same volume.
  except OSError as e:  # A cache that cannot be written costs time, not correctness: say so once per volume.
    logging.getLogger(__name__).warning("%s: not cached in %s (%s)", path, folder, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return data


def _parse(path: str) -> np.ndarray:
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
