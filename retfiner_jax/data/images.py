"""Reading OCT B-scans of every common export format into one 2-D array, and preprocessing them for an FM.

Formats: `.npy` (2-D, or a 3-D volume with a slice index), PNG, JPEG, TIFF (8/16-bit, grayscale or RGB),
DICOM (single frame, or one frame of a multi-frame volume; needs pydicom), and device makers' volumes through
eyepy (Heidelberg VOL, XML export and E2E, Topcon FDA, Duke .mat: data/vendor.py). Colour images become one channel
(ITU-R 601 luma, as PIL's "L" conversion). Preprocessing follows the FM's recipe: intensity scaled to [0, 1]
(by bit depth, or min-max), bicubic resize to the model's size, one channel repeated to three, the FM's
normalisation.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from retfiner_jax.data import vendor

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NORMALISATION = {
    "retfound": IMAGENET,
    "urfound": IMAGENET,
    "visionfm": ((0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)),
}
VOLUME_SUFFIXES = {".npy", ".tif", ".tiff", ".dcm", ".dicom"} | set(vendor.READERS)  # May hold several B-scans.
IMAGE_SUFFIXES = VOLUME_SUFFIXES | {".png", ".jpg", ".jpeg"}
LUMA = np.array([0.299, 0.587, 0.114])
# Device makers' OCT files that no reader here opens (Topcon .fds, Zeiss .img): export their B-scans first.
UNREAD_VENDOR_SUFFIXES = {".fds", ".img"}


class ImageError(ValueError):
  """An image that cannot be used; `kind` names the problem for the data checker."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def _to_gray(a: np.ndarray) -> np.ndarray:
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    dtype = a.dtype
    a = (a[..., :3].astype(np.float64) @ LUMA)
    return np.round(a).astype(dtype) if np.issubdtype(dtype, np.integer) else a.astype(dtype)
  if a.ndim == 3 and a.shape[-1] == 1:
    return a[..., 0]
  return a


def _stacks_bscans(shape) -> bool:
  """Whether an array of this shape is a volume (N, H, W[, C]) rather than one image (H, W) or (H, W, C)."""
  return len(shape) == 4 or (len(shape) == 3 and shape[-1] not in (1, 3, 4))


def _select_slice(a: np.ndarray, slice_index, path, volume_capable: bool) -> np.ndarray:
  """Picks one B-scan of a volume (N, H, W[, C]); a 2-D image accepts no slice index but 0. A 3-D array with a
  slice index is a volume whatever its last axis."""
  is_volume = volume_capable and (_stacks_bscans(a.shape) or (a.ndim == 3 and slice_index is not None))
  if is_volume:
    if slice_index is None:
      raise ImageError("not_2d", f"{path}: a volume of shape {a.shape} needs a slice index")
    if not 0 <= int(slice_index) < a.shape[0]:
      raise ImageError("slice_out_of_range", f"{path}: slice index {slice_index} outside 0..{a.shape[0] - 1}")
    return a[int(slice_index)]
  if slice_index is not None and int(slice_index) != 0:
    raise ImageError("slice_out_of_range", f"{path}: slice index {slice_index} given for a single image")
  return a


@dataclasses.dataclass(frozen=True)
class VolumeSlice:
  """One B-scan of a volume file: it stands where an image path would (read_image reads it, the probe's feature
  cache identifies it by the file's size and time)."""
  path: str
  index: int

  def __str__(self):
    return f"{self.path}[slice {self.index}]"

  def read_pixels(self) -> np.ndarray:
    return read_image(self.path, self.index)

  def identity(self) -> str:
    stat = os.stat(self.path)
    return f"{self}|{stat.st_size}|{stat.st_mtime_ns}"


def read_image(path, slice_index=None) -> np.ndarray:
  """Any supported file -> a 2-D array in its stored dtype (uint8, uint16 or float). `path` may also be an
  image stored in a built dataset (tfds_builders.TfdsImage), already 2-D, or a VolumeSlice."""
  if hasattr(path, "read_pixels"):
    try:
      return path.read_pixels()
    except ImageError:  # Already named (a VolumeSlice's file).
      raise
    except Exception as e:  # noqa: BLE001 - a damaged record is that image's problem, named.
      raise ImageError("undecodable", f"{path}: {type(e).__name__}: {e}") from e
  path = Path(path)
  if not path.exists():
    raise ImageError("missing_file", f"{path}: file not found")
  suffix = path.suffix.lower()
  try:
    if suffix in vendor.READERS:
      try:
        a = vendor.read_volume(path)
      except vendor.VendorError as e:
        raise ImageError(e.kind, str(e)) from None
    elif suffix == ".npy":
      a = np.load(path, allow_pickle=False, mmap_mode="r")  # A volume's one B-scan is read, not all of them.
    elif suffix in (".tif", ".tiff"):
      import tifffile
      a = tifffile.imread(path)
    elif suffix in (".dcm", ".dicom"):
      try:
        import pydicom
      except ImportError as e:
        raise ImageError("undecodable", f"{path}: reading DICOM needs pydicom (pip install pydicom)") from e
      a = pydicom.dcmread(path).pixel_array
    elif suffix in IMAGE_SUFFIXES:
      from PIL import Image
      with Image.open(path) as im:
        if im.mode in ("P", "LA", "PA", "1", "CMYK", "YCbCr"):
          im = im.convert("RGB")
        a = np.asarray(im)
    elif suffix in UNREAD_VENDOR_SUFFIXES:
      raise ImageError("unsupported_format", f"{path}: a device maker's OCT file ({suffix}) that no reader here "
                       f"opens; export its B-scans as images first (e.g. with oct-converter), and list those in the "
                       f"manifest. Read here: {sorted(vendor.READERS)}")
    else:
      raise ImageError("unsupported_format", f"{path}: unsupported image format {suffix!r} "
                       f"(supported: {sorted(IMAGE_SUFFIXES)})")
  except ImageError:
    raise
  except Exception as e:  # Decoders raise many types for corrupt files.
    raise ImageError("undecodable", f"{path}: cannot decode ({type(e).__name__}: {e})") from e
  if a.dtype == bool:
    a = a.astype(np.uint8) * 255
  if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
    raise ImageError("not_pixels", f"{path}: holds {a.dtype} values, not pixel values (integers or floats)")
  a = _select_slice(a, slice_index, path, volume_capable=suffix in VOLUME_SUFFIXES)
  if suffix == ".npy" or suffix in vendor.READERS:  # A view of a memory-mapped file or a shared volume: copied.
    a = np.array(a)
  a = _to_gray(a)
  if a.ndim != 2:
    raise ImageError("not_2d", f"{path}: expected a 2-D B-scan after slice selection, got shape {a.shape}")
  if min(a.shape) < 2:
    raise ImageError("not_2d", f"{path}: image of shape {a.shape} is too small")
  if np.issubdtype(a.dtype, np.floating):
    if not np.isfinite(a).all():
      raise ImageError("non_finite", f"{path}: image holds NaN or infinite pixels")
    if np.abs(a).max() > np.finfo(np.float32).max:  # Training reads pixels as float32.
      raise ImageError("overflow", f"{path}: pixel values up to {np.abs(a).max():.3g} overflow float32")
  return a


def volume_shape(path) -> tuple:
  """The array shape a file holds, from its header where the format has one (.npy, TIFF, DICOM); device makers'
  volumes are read whole (and kept). Images give their 2-D (or colour 3-D) shape."""
  path = Path(path)
  if not path.exists():
    raise ImageError("missing_file", f"{path}: file not found")
  suffix = path.suffix.lower()
  if suffix not in VOLUME_SUFFIXES:
    raise ImageError("not_a_volume", f"{path}: a slice range or * needs a volume file ({sorted(VOLUME_SUFFIXES)})")
  try:
    if suffix in vendor.READERS:
      try:
        return tuple(vendor.read_volume(path).shape)
      except vendor.VendorError as e:
        raise ImageError(e.kind, str(e)) from None
    if suffix == ".npy":
      return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    if suffix in (".tif", ".tiff"):
      import tifffile
      with tifffile.TiffFile(path) as f:
        return tuple(f.series[0].shape)
    import pydicom
    header = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    return (frames, int(header.Rows), int(header.Columns)) if frames > 1 else (int(header.Rows), int(header.Columns))
  except ImageError:
    raise
  except Exception as e:  # noqa: BLE001 - as read_image: a damaged file is named with the decoder's words.
    raise ImageError("undecodable", f"{path}: cannot read its header ({type(e).__name__}: {e})") from e


def volume_length(path) -> int:
  """How many B-scans the volume file holds (its first axis), for a manifest's slice range or `*`."""
  shape = volume_shape(path)
  if len(shape) < 3:
    raise ImageError("not_a_volume", f"{path}: holds one image (shape {shape}), not a volume of B-scans")
  return int(shape[0])


SLICE_RULES = ("centre", "all")


def folder_items(path, rule: str) -> list:
  """The images a folder's file stands for: itself, or, for a volume of B-scans, its centre B-scan (index
  n // 2) or all of them (VolumeSlice each), by `rule`. Device makers' volumes are always volumes; a .npy, TIFF
  or DICOM file is one when its header says it holds several B-scans (a colour image is not one)."""
  if rule not in SLICE_RULES:
    raise ValueError(f"slices must be one of {SLICE_RULES}, got {rule!r}")
  path = Path(path)
  if path.suffix.lower() not in VOLUME_SUFFIXES:
    return [path]
  shape = volume_shape(path)
  if path.suffix.lower() not in vendor.READERS and not _stacks_bscans(shape):
    return [path]
  indices = [shape[0] // 2] if rule == "centre" else range(shape[0])
  return [VolumeSlice(str(path), int(i)) for i in indices]


def scale_intensity(a: np.ndarray, mode: str = "bit_depth") -> np.ndarray:
  """-> float32 in [0, 1]. `bit_depth`: uint8 / 255, uint16 / 65535, floats kept if already in [0, 1] else
  min-max; `minmax`: (a - min) / (max - min)."""
  if mode == "bit_depth":
    if a.dtype == np.uint8:
      return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
      return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.floating) and a.min() >= 0 and a.max() <= 1:
      return a.astype(np.float32)
  elif mode != "minmax":
    raise ValueError(f"intensity scaling must be 'bit_depth' or 'minmax', got {mode!r}")
  a = a.astype(np.float32)
  low, high = float(a.min()), float(a.max())
  return (a - low) / (high - low) if high > low else np.zeros_like(a)


def resize_bicubic(a: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of a float image to (size, size), as PIL does it."""
  from PIL import Image
  if a.shape == (size, size):
    return a.astype(np.float32)
  return np.asarray(Image.fromarray(a.astype(np.float32)).resize((size, size), Image.BICUBIC), np.float32)


def normalise(gray01: np.ndarray, backbone: str) -> np.ndarray:
  """(S, S) in [0, 1] -> (S, S, 3) float32 with the FM's per-channel mean/std."""
  mean, std = (np.asarray(v, np.float32) for v in NORMALISATION[backbone])
  return (np.repeat(gray01[..., None], 3, axis=-1) - mean) / std


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a crop as RandomResizedCrop draws it: an area share uniform in `scale` and an
  aspect ratio (width / height) log-uniform in `ratio`, ten tries, then the largest centred crop whose ratio is
  within `ratio`."""
  area = h * w
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(*log_ratio)))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  if w / h < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif w / h > max(ratio):
    ch, cw = h, int(round(h * max(ratio)))
  else:
    ch, cw = h, w
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment(gray01: np.ndarray, rng: np.random.Generator, flip=True, intensity_jitter=0.1,
            crop_scale=(0.8, 1.0), crop_ratio=None) -> np.ndarray:
  """Training augmentation on a [0, 1] image: a random crop (resized to the model's size by `preprocess`,
  bicubic), a horizontal flip, a brightness/contrast jitter. `crop_ratio` None: the crop keeps the image's aspect
  ratio (area share uniform in `crop_scale`); a (low, high) pair: RandomResizedCrop's draw
  (`random_resized_crop_box`), as MAE pretrains with scale (0.2, 1) and ratio (3/4, 4/3)."""
  h, w = gray01.shape
  if crop_ratio is not None:
    top, left, ch, cw = random_resized_crop_box(h, w, rng, crop_scale, crop_ratio)
    gray01 = gray01[top:top + ch, left:left + cw]
  elif crop_scale is not None and crop_scale[0] < 1.0:
    scale = rng.uniform(*crop_scale)
    ch, cw = max(2, int(round(h * np.sqrt(scale)))), max(2, int(round(w * np.sqrt(scale))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    gray01 = gray01[top:top + ch, left:left + cw]
  if flip and rng.random() < 0.5:
    gray01 = gray01[:, ::-1]
  if intensity_jitter:
    gain = 1 + rng.uniform(-intensity_jitter, intensity_jitter)
    bias = rng.uniform(-intensity_jitter, intensity_jitter) / 2
    gray01 = np.clip(gray01 * gain + bias, 0, 1)
  return np.ascontiguousarray(gray01, np.float32)


def preprocess_gray(a: np.ndarray, size: int, intensity: str = "bit_depth", rng=None, augment_kw=None) -> np.ndarray:
  """A 2-D image as read -> (size, size) float32: intensity scaled to [0, 1], augmented when `rng` is given,
  resized (bicubic, so values may overshoot [0, 1] slightly). What the training pipeline ships; the model
  expands and normalises it on the device (models/common.py, model_images)."""
  gray = scale_intensity(a, intensity)
  if rng is not None:
    gray = augment(gray, rng, **(augment_kw or {}))
  return resize_bicubic(gray, size)


def preprocess(a: np.ndarray, size: int, backbone: str, intensity: str = "bit_depth", rng=None,
               augment_kw=None) -> np.ndarray:
  """A 2-D image as read -> the model's (size, size, 3) float32 input, normalised on the host."""
  return normalise(preprocess_gray(a, size, intensity, rng, augment_kw), backbone)
