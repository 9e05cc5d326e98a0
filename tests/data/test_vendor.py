"""Device makers' OCT volumes (data/vendor.py, through eyepy): the real HEYEX VOL and XML files of ../shared, a
larger VOL written by eyepy's own writer, volume rows in manifests (training, the checker, TFDS) and in the
probe's folders."""
import copy
import csv
import datetime
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path, tiny_config
from retfiner_jax.data import check, images, manifest, tfds_builders, vendor

eyepy = pytest.importorskip("eyepy", reason="the vendor extra: pip install eyepy")


def _vol():
  return shared_path("data", "vendor-oct", "heyex_vol", "test_volume.vol")


def _xml():
  return shared_path("data", "vendor-oct", "heyex_xml", "test_volume", "test_dummy.xml")


@pytest.fixture
def writable_heyex(monkeypatch):
  """eyepy 0.21's HeVolWriter cannot write a volume as shipped: it passes datetimes where its date encoder
  parses ISO strings, that encoder returns a float for an integer field, and it writes 17 segmentation rows
  while declaring as many as the B-scan's lazily filled layer dict holds (0). These three header fields are
  mended here; the pixel path (to_vol_intensity and the B-scan records) is eyepy's own."""
  from eyepy.io import utils as eyepy_utils
  from eyepy.io.he import vol_reader

  class IsoDates:
    @staticmethod
    def combine(day, time):
      return datetime.datetime.combine(day, time).isoformat()

  monkeypatch.setattr(vol_reader, "datetime", types.SimpleNamespace(datetime=IsoDates, time=datetime.time))
  encode = eyepy_utils.IntDate._encode
  monkeypatch.setattr(eyepy_utils.IntDate, "_encode", lambda obj, ctx, path: int(round(encode(obj, ctx, path))))
  monkeypatch.setattr(vol_reader.HeVolWriter, "_segmentations_from_bscan",
                      lambda self, bscan: np.zeros((0, bscan.volume.size_x), np.float32))

  def write(path, bscans_u8: np.ndarray):
    """A HEYEX VOL file whose B-scans show as `bscans_u8` (n, h, w) uint8, with the shared file's metadata."""
    template = eyepy.import_heyex_vol(_vol())
    meta = copy.deepcopy(template.meta)
    meta["bscan_meta"] = [copy.deepcopy(template.meta["bscan_meta"][i % len(template.meta["bscan_meta"])])
                          for i in range(len(bscans_u8))]
    day = datetime.date(2000, 1, 1)
    meta.update(exam_time=day, visit_date=day, intensity_transform="default",
                patient={"pid": 0, "patient_id": "test", "dob": day})
    volume = eyepy.EyeVolume(data=(bscans_u8 / 255).astype(np.float32), meta=meta, localizer=template.localizer)
    eyepy.io.HeVolWriter(volume).write(str(path))
    return path
  return write


def test_every_bscan_of_the_real_vol_and_xml_files_reads_as_eyepy_gives_it():
  for path, reader in ((_vol(), eyepy.import_heyex_vol), (_xml(), eyepy.import_heyex_xml)):
    theirs = reader(path if path.suffix == ".vol" else path.parent).data
    assert theirs.shape == (10, 40, 50) and theirs.dtype == np.uint8
    assert images.volume_length(path) == 10
    for i in range(10):
      ours = images.read_image(path, i)
      assert ours.dtype == np.uint8 and ours.shape == (40, 50)
      np.testing.assert_array_equal(ours, theirs[i])
    with pytest.raises(images.ImageError, match=r"slice index 10 outside 0\.\.9"):
      images.read_image(path, 10)


def test_vol_display_transform_by_hand():
  """Reflectivity v -> round(255 * clip((ln(v + 2.44e-4) + 8.3) / 8.285, 0, 1)); float32's largest value
  (HEYEX's "no data") -> 0; values above 1 -> 255."""
  shown = lambda g: np.exp(g * 8.285 - 8.3) - 2.44e-4  # The reflectivity that shows as grey g in [0, 1].
  raw = np.array([0.0, shown(0.4), shown(100 / 255), shown(1.0), 1.0, 7.0, np.finfo(np.float32).max], np.float32)
  np.testing.assert_array_equal(vendor.heyex_vol_display(raw), [0, 102, 100, 255, 255, 255, 0])


def test_a_larger_vol_written_by_eyepy_reads_back_to_its_arrays(tmp_path, writable_heyex):
  known = np.random.default_rng(0).integers(0, 256, (24, 96, 64), dtype=np.uint8)
  path = writable_heyex(tmp_path / "big.vol", known)
  assert images.volume_length(path) == 24
  np.testing.assert_array_equal(vendor.read_volume(path), known)
  np.testing.assert_array_equal(images.read_image(path, 17), known[17])


def _write_rows(path, rows, fields=("image", "report", "id", "slice")):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow(r)
  return path


def test_volume_rows_expand_and_share_the_row_id(tmp_path):
  Image.fromarray(np.full((30, 40), 7, np.uint8)).save(tmp_path / "a.png")
  path = _write_rows(tmp_path / "m.csv", [
      {"image": "a.png", "report": "normal", "id": "", "slice": ""},
      {"image": str(_vol()), "report": "drusen", "id": "", "slice": "*"},
      {"image": str(_xml()), "report": "fluid", "id": "visit9", "slice": "2-4"},
      {"image": str(_vol()), "report": "one", "id": "", "slice": "6"}])
  records = manifest.read_manifest(path)
  assert [(r["row"], r["slice"]) for r in records] == ([(1, None)] + [(2, i) for i in range(10)]
                                                       + [(3, 2), (3, 3), (3, 4)] + [(4, 6)])
  assert {r["id"] for r in records if r["row"] == 2} == {"m.csv:row2"}
  assert {r["id"] for r in records if r["row"] == 3} == {"visit9"}
  assert records[0]["id"] is None and records[-1]["id"] is None
  raw = manifest.read_manifest(path, expand_volumes=False)
  assert [r["slice"] for r in raw] == [None, "*", "2-4", 6]
  for bad, message in (("9-3", "runs backwards"), ("x", r"an inclusive range like 3-7, or \*"),
                       ("8-10", r"row 1: slice range 8-10 outside the volume's B-scans 0\.\.9")):
    _write_rows(tmp_path / "bad.csv", [{"image": str(_vol()), "report": "r", "id": "", "slice": bad}])
    with pytest.raises(manifest.ManifestError, match=message):
      manifest.read_manifest(tmp_path / "bad.csv")


def test_a_manifest_mixing_pngs_and_volumes_trains(corpus, tmp_path):
  from retfiner_jax.refine import trainer
  with open(corpus / "manifest.csv") as f:
    png_rows = [{"image": str(corpus / r["image"]), "report": r["report"], "id": r["id"], "slice": ""}
                for r in list(csv.DictReader(f))[:12]]
  path = _write_rows(tmp_path / "mixed.csv", png_rows + [
      {"image": str(_vol()), "report": "drusen in the right eye", "id": "", "slice": "*"},
      {"image": str(_xml()), "report": "subretinal fluid", "id": "", "slice": "0-1"}])
  assert len(manifest.read_manifest(path)) == 24
  config = tiny_config(corpus, max_steps=3)
  config.data.train_manifest = str(path)
  lines = []
  trainer.run(config, tmp_path / "run", log=lines.append)
  metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [m["loss"] for m in metrics if m.get("kind") == "train"]
  assert len(losses) == 3 and np.isfinite(losses).all()


def test_the_checker_names_broken_volumes_with_row_path_and_reason(tmp_path, capsys, monkeypatch):
  data = _vol().read_bytes()
  (tmp_path / "truncated.vol").write_bytes(data[:len(data) // 3])
  (tmp_path / "garbled.vol").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  (tmp_path / "empty.xml").write_text("<HEDX><BODY>")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat.png")
  path = _write_rows(tmp_path / "m.csv", [
      {"image": str(_vol()), "report": "fine", "id": "", "slice": "*"},
      {"image": "truncated.vol", "report": "r", "id": "", "slice": "3"},
      {"image": "garbled.vol", "report": "r", "id": "", "slice": "*"},
      {"image": "empty.xml", "report": "r", "id": "", "slice": "0"},
      {"image": str(_vol()), "report": "r", "id": "", "slice": "5-12"},
      {"image": str(_vol()), "report": "r", "id": "", "slice": "10"},
      {"image": "flat.png", "report": "r", "id": "", "slice": "*"}])
  assert check.main([str(path), "--workers", "2"]) == 1
  out = capsys.readouterr().out
  assert "6 of 7 rows have problems" in out
  assert f"2: {tmp_path / 'truncated.vol'}; 3: {tmp_path / 'garbled.vol'}; 4: {tmp_path / 'empty.xml'}" in out
  assert "cannot read as Heidelberg HEYEX VOL (StreamError" in out  # The reason, in the parser's words.
  assert "slice index out of range" in out and f"5: {_vol()}; 6: {_vol()}" in out
  assert "outside the volume's B-scans 0..9" in out
  assert "slice range or * on a file that is not a volume" in out and f"7: {tmp_path / 'flat.png'}" in out

  vendor._read.cache_clear()
  monkeypatch.setenv("RETFINER_VOLUME_CACHE", "off")  # A fresh machine: nothing decoded before.
  monkeypatch.setitem(sys.modules, "eyepy", None)  # As if the vendor extra were not installed.
  assert check.main([str(path), "--workers", "1"]) == 1
  out = capsys.readouterr().out
  assert "needs an optional reader (pip install)" in out and f"1: {_vol()}" in out
  assert 'needs eyepy: pip install "retfiner-jax[vendor]"' in out


def test_tfds_pairs_from_a_volume_manifest(tmp_path):
  path = _write_rows(tmp_path / "m.csv", [{"image": str(_vol()), "report": "drusen", "id": "", "slice": "*"},
                                          {"image": str(_xml()), "report": "fluid", "id": "x", "slice": "7"}])
  tfds_builders.build("pairs", path, tmp_path / "tfds")
  records = tfds_builders.pairs_records(tmp_path / "tfds", "train")
  expected = manifest.read_manifest(path)
  assert [(r["row"], r["report"], r["id"]) for r in records] == [(r["row"], r["report"], r["id"]) for r in expected]
  for r, e in zip(records, expected):
    np.testing.assert_array_equal(tfds_builders.to_uint16(images.read_image(e["image"], e["slice"])),
                                  images.read_image(r["image"]))


def test_the_probe_reads_a_folder_of_volumes_as_the_folder_of_its_bscans(tmp_path, writable_heyex):
  """An ImageFolder of VOL volumes (3 B-scans each) probes exactly as a folder of PNGs of their centre B-scans
  (data.slices="centre"), and of all their B-scans ("all"); a broken volume is named."""
  import configs
  import torch
  from torch_reference import TorchViT
  from retfiner_jax.probe import folders, run
  rng = np.random.default_rng(0)
  roots = {name: tmp_path / name for name in ("volumes", "centre", "all")}
  for split in ("train", "val", "test"):
    for label, level in (("normal", 60), ("fluid", 120)):
      for k in range(4):
        bscans = np.clip(rng.normal(level, 40, (3, 48, 48)), 0, 255).astype(np.uint8)
        for root in roots.values():
          (root / split / label).mkdir(parents=True, exist_ok=True)
        writable_heyex(roots["volumes"] / split / label / f"eye{k}.vol", bscans)
        Image.fromarray(bscans[1]).save(roots["centre"] / split / label / f"eye{k}.png")
        for i in range(3):
          Image.fromarray(bscans[i]).save(roots["all"] / split / label / f"eye{k}_{i}.png")
  centre, classes = folders.read_image_folder(roots["volumes"], "centre")
  assert classes == ["fluid", "normal"] and len(centre["train"]) == 8
  assert {item.index for item, _ in centre["test"]} == {1}
  everything, _ = folders.read_image_folder(roots["volumes"], "all")
  assert len(everything["train"]) == 24
  torch.manual_seed(0)
  torch.save(TorchViT(dim=48, mlp=192).state_dict(), tmp_path / "enc.pth")
  for rule in ("centre", "all"):
    outcomes = []
    for root in (roots["volumes"], roots[rule]):
      config = configs.load("probe")
      config.encoder, config.variant = str(tmp_path / "enc.pth"), "tiny-visionfm"
      config.data.root, config.data.slices = f"fluid={root}", rule
      config.workdir = str(tmp_path / f"out_{rule}_{root.name}")
      config.probe.update(protocol="features", seeds=(0,), max_epochs=3)
      outcomes.append(run.run(config, log=lambda *a: None)["fluid"])
    assert outcomes[0] == outcomes[1], rule
  shutil.copy(_vol(), roots["volumes"] / "test" / "fluid" / "broken.vol")
  (roots["volumes"] / "test" / "fluid" / "broken.vol").write_bytes(b"HSF-OCT-103" + bytes(40))
  with pytest.raises(folders.ProbeDataError, match=r"broken\.vol: cannot read as Heidelberg HEYEX VOL"):
    folders.read_image_folder(roots["volumes"], "centre")
  skipped = []
  splits, _ = run.dataset_splits(roots["volumes"], skipped.append, skip_bad_images=True)
  assert len(splits["test"]) == 8 and "broken.vol" in skipped[0] and "data.skip_bad_images" in skipped[0]
  with pytest.raises(folders.ProbeDataError, match="data.slices must be one of"):
    folders.read_image_folder(roots["volumes"], "middle")


def test_a_volume_is_parsed_once_and_read_from_the_cache_after(tmp_path, monkeypatch):
  """The decoded B-scans go to the cache folder; later reads (other processes, after the in-memory cache) take
  them from there without parsing; a changed file, or a damaged cache file, is parsed again; `off` keeps none."""
  monkeypatch.setenv("RETFINER_VOLUME_CACHE", str(tmp_path / "cache"))
  volume = tmp_path / "scan.vol"
  shutil.copy(_vol(), volume)
  parsed = []
  parse = vendor._parse
  monkeypatch.setattr(vendor, "_parse", lambda path: parsed.append(path) or parse(path))
  vendor._read.cache_clear()
  first = np.array(vendor.read_volume(volume))
  files = list((tmp_path / "cache").glob("scan-*.npy"))
  assert len(parsed) == 1 and len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
  np.testing.assert_array_equal(np.load(files[0]), first)
  for _ in range(3):
    vendor._read.cache_clear()  # As a new process would start.
    np.testing.assert_array_equal(images.read_image(volume, 7), first[7])
  assert len(parsed) == 1
  files[0].write_bytes(b"not an array")
  vendor._read.cache_clear()
  np.testing.assert_array_equal(vendor.read_volume(volume), first)
  assert len(parsed) == 2 and np.array_equal(np.load(files[0]), first)  # Parsed again and replaced.
  stat = volume.stat()
  os.utime(volume, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # The file changed: a new key.
  vendor._read.cache_clear()
  vendor.read_volume(volume)
  assert len(parsed) == 3 and len(list((tmp_path / "cache").glob("scan-*.npy"))) == 2
  monkeypatch.setenv("RETFINER_VOLUME_CACHE", "off")
  shutil.rmtree(tmp_path / "cache")
  vendor._read.cache_clear()
  np.testing.assert_array_equal(vendor.read_volume(volume), first)
  assert len(parsed) == 4 and not (tmp_path / "cache").exists()
