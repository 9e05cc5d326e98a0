"""Manifests, image formats, bad-input checks, Grain pipelines and the synthetic corpus."""
import csv

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from retfiner_jax.data import check, images, manifest, pipeline, synthetic

VOCAB_WORDS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
    ["fluid", "no", "drusen", "normal", "cysts", "sub", "##retinal", "retina", "large", "small"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(VOCAB_WORDS) + "\n")
  return path


def _gray(h=40, w=52, dtype=np.uint8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, np.iinfo(dtype).max, (h, w), dtype=dtype, endpoint=True)


def test_every_image_format_reads_as_2d(tmp_path):
  import tifffile
  g8, g16 = _gray(), _gray(dtype=np.uint16)
  rgb = np.stack([g8, g8 // 2, 255 - g8], -1)
  Image.fromarray(g8).save(tmp_path / "a.png")
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  Image.fromarray(g8).save(tmp_path / "a.jpg", quality=100)
  tifffile.imwrite(tmp_path / "a8.tif", g8)
  tifffile.imwrite(tmp_path / "a16.tiff", g16)
  tifffile.imwrite(tmp_path / "rgb.tif", rgb)
  np.save(tmp_path / "f.npy", g8.astype(np.float32) / 255)
  np.save(tmp_path / "vol.npy", np.stack([g16, g16 // 2, g16 // 3, g16 // 4]))
  np.testing.assert_array_equal(images.read_image(tmp_path / "a.png"), g8)
  np.testing.assert_array_equal(images.read_image(tmp_path / "a8.tif"), g8)
  np.testing.assert_array_equal(images.read_image(tmp_path / "a16.tiff"), g16)
  assert images.read_image(tmp_path / "a16.tiff").dtype == np.uint16
  luma = np.round(rgb.astype(np.float64) @ images.LUMA).astype(np.uint8)
  np.testing.assert_array_equal(images.read_image(tmp_path / "rgb.png"), luma)
  np.testing.assert_array_equal(images.read_image(tmp_path / "rgb.tif"), luma)
  assert np.abs(images.read_image(tmp_path / "a.jpg").astype(int) - g8).mean() < 3
  np.testing.assert_array_equal(images.read_image(tmp_path / "vol.npy", 2), g16 // 3)
  # Intensity scaling by bit depth (hand-computed) and min-max.
  np.testing.assert_allclose(images.scale_intensity(g16), g16 / 65535.0, rtol=1e-6)
  np.testing.assert_allclose(images.scale_intensity(images.read_image(tmp_path / "f.npy")), g8 / 255.0, rtol=1e-6)
  mm = images.scale_intensity(np.array([[2.0, 4.0], [6.0, 10.0]]), "minmax")
  np.testing.assert_allclose(mm, [[0, 0.25], [0.5, 1.0]])


def test_dicom_single_and_multi_frame(tmp_path):
  pytest.importorskip("pydicom")
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  def write(path, pixels):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
      ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)

  g = _gray(dtype=np.uint16)
  write(tmp_path / "one.dcm", g)
  write(tmp_path / "vol.dcm", np.stack([g, g // 2, g // 5]))
  np.testing.assert_array_equal(images.read_image(tmp_path / "one.dcm"), g)
  np.testing.assert_array_equal(images.read_image(tmp_path / "vol.dcm", 1), g // 2)
  with pytest.raises(images.ImageError, match="slice index 3 outside 0..2"):
    images.read_image(tmp_path / "vol.dcm", 3)
  # Volume rows of a manifest: the multi-frame DICOM's frame count from its header, a 3-D .npy's and a TIFF
  # stack's from theirs; single images are no volumes (a colour .npy neither).
  import tifffile
  np.save(tmp_path / "vol.npy", np.stack([g, g + 1]))
  np.save(tmp_path / "rgb.npy", np.zeros((20, 30, 3), np.uint8))
  tifffile.imwrite(tmp_path / "stack.tif", np.stack([g, g, g, g]), photometric="minisblack")
  assert [images.volume_length(tmp_path / f) for f in ("vol.dcm", "vol.npy", "stack.tif")] == [3, 2, 4]
  for single in ("one.dcm", "rgb.npy"):
    assert images.folder_items(tmp_path / single, "all") == [tmp_path / single]
  with pytest.raises(images.ImageError, match="holds one image"):
    images.volume_length(tmp_path / "one.dcm")
  (tmp_path / "m.csv").write_text("image,report,slice\nvol.dcm,a,*\nvol.npy,b,1-1\nstack.tif,c,1-3\none.dcm,d,\n")
  records = manifest.read_manifest(tmp_path / "m.csv")
  assert [(r["row"], r["slice"]) for r in records] == [(1, 0), (1, 1), (1, 2), (2, 1), (3, 1), (3, 2), (3, 3),
                                                       (4, None)]
  np.testing.assert_array_equal(images.read_image(records[2]["image"], records[2]["slice"]), g // 5)
  assert [it.index for it in images.folder_items(tmp_path / "vol.dcm", "all")] == [0, 1, 2]
  assert [it.index for it in images.folder_items(tmp_path / "stack.tif", "centre")] == [2]


def test_real_bscans_read_and_preprocess():
  folder = shared_path("data", "real-oct-samples")
  files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
  assert len(files) == 9
  shapes = set()
  for path in files:
    a = images.read_image(path)
    assert a.ndim == 2 and a.dtype == np.uint8
    shapes.add(a.shape)
    x = images.preprocess(a, 224, "retfound")
    assert x.shape == (224, 224, 3) and np.isfinite(x).all()
    # Channel 0 undone by hand: x * std + mean = the resized [0, 1] image.
    gray = x[..., 0] * 0.229 + 0.485
    assert -0.05 < gray.min() and gray.max() < 1.05
    np.testing.assert_allclose(x[..., 1] * 0.224 + 0.456, gray, atol=1e-5)
  assert len(shapes) > 1  # Mixed sizes.


def test_manifest_formats_agree(tmp_path):
  rows = [{"image": f"img{i}.png", "report": f"report {i}", "id": f"s{i // 2}", "split": "train", "slice": ""}
          for i in range(4)]
  base = None
  for suffix in ("csv", "tsv", "jsonl", "parquet"):
    path = tmp_path / f"m.{suffix}"
    manifest.write_manifest(path, rows)
    records = manifest.read_manifest(path)
    assert [r["row"] for r in records] == [1, 2, 3, 4]
    assert records[1]["image"] == str((tmp_path / "img1.png").resolve())
    assert records[3]["id"] == "s1" and records[0]["slice"] is None
    if base is None:
      base = records
    assert records == base
  (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
  with pytest.raises(manifest.ManifestError, match=r"bad.csv: required column 'image' not found"):
    manifest.read_manifest(tmp_path / "bad.csv")
  with pytest.raises(manifest.ManifestError, match="no_such.csv: manifest not found"):
    manifest.read_manifest(tmp_path / "no_such.csv")


def _bad_manifest(tmp_path):
  Image.fromarray(_gray()).save(tmp_path / "good.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  np.save(tmp_path / "vol.npy", np.zeros((3, 8, 8), np.uint8))
  np.save(tmp_path / "nan.npy", np.full((8, 8), np.nan, np.float32))
  lines = ["image,report,slice", "good.png,normal retina,", "missing.png,fluid,", "broken.png,fluid,",
           "vol.npy,fluid,", "vol.npy,fluid,7", "nan.npy,fluid,", "good.png,,", ",no image,"]
  data = ("\n".join(lines) + "\n").encode() + b"good.png,caf\xff report,\n"
  (tmp_path / "m.csv").write_bytes(data)
  return tmp_path / "m.csv"


def test_checker_reports_every_kind_with_rows(tmp_path, capsys):
  path = _bad_manifest(tmp_path)
  records = manifest.read_manifest(path)
  bad = check.check_records(records, workers=2)
  kinds = {row: [k for k, _ in problems] for row, problems in bad.items()}
  assert kinds == {2: ["missing_file"], 3: ["undecodable"], 4: ["not_2d"], 5: ["slice_out_of_range"],
                   6: ["non_finite"], 7: ["empty_report"], 8: ["missing_path"], 9: ["invalid_utf8"]}
  assert "missing.png: file not found" in bad[2][0][1]
  assert check.main([str(path)]) == 1
  out = capsys.readouterr().out
  assert "image file not found" in out and "2: " + str(tmp_path / "missing.png") in out
  assert "slice index out of range" in out and "5: " in out
  good = tmp_path / "good.csv"
  good.write_text("image,report\ngood.png,normal retina\n")
  assert check.main([str(good)]) == 0


def _pairs(tmp_path, vocab, n=12):
  for i in range(n):
    Image.fromarray(_gray(30 + i, 34, seed=i)).save(tmp_path / f"{i}.png")
  with (tmp_path / "m.csv").open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "report", "id"])
    for i in range(n):
      w.writerow([f"{i}.png", " ".join(["no fluid"] * (i + 1)) + " drusen", f"id{i // 2}"])
  return pipeline.load_pairs(tmp_path / "m.csv", vocab, max_length=8)


def test_tokenisation_truncation_and_pair_ids(tmp_path, vocab):
  records, truncated = _pairs(tmp_path, vocab)
  assert truncated == sum(2 * (i + 1) + 1 + 2 > 8 for i in range(12))
  # Report 0 is "no fluid drusen": [CLS] no fluid drusen [SEP] and padding, ids from the vocabulary above.
  word = {w: i for i, w in enumerate(VOCAB_WORDS)}
  want = [word["[CLS]"], word["no"], word["fluid"], word["drusen"], word["[SEP]"], 0, 0, 0]
  assert records[0]["input_ids"].tolist() == want and records[0]["input_ids"].dtype == np.int32
  assert records[0]["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
  assert records[11]["input_ids"][-1] == word["[SEP]"]  # Truncated, still ends with [SEP].
  # The same as the tokenizer's own padding and truncation.
  from retfiner_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(vocab)
  reports = [r["report"] for r in records]
  want = tok(reports, padding="max_length", truncation=True, max_length=8)
  np.testing.assert_array_equal(np.stack([r["input_ids"] for r in records]), want["input_ids"])
  np.testing.assert_array_equal(np.stack([r["attention_mask"] for r in records]), want["attention_mask"])
  assert records[0]["pair_id"] == records[1]["pair_id"] != records[2]["pair_id"]


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)], it


def test_same_batches_for_any_worker_count(tmp_path, vocab):
  records, _ = _pairs(tmp_path, vocab)
  spec = pipeline.ImageSpec(image_size=16, augment=True, augment_kw=(("crop_scale", (0.7, 1.0)),))
  base, _ = _take(pipeline.train_dataset(records, spec, 4, seed=3), 5)
  other, _ = _take(pipeline.train_dataset(records, spec, 4, seed=3, num_workers=2), 5)
  for a, b in zip(base, other):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert base[0]["images"].shape == (4, 16, 16)
  different, _ = _take(pipeline.train_dataset(records, spec, 4, seed=4), 1)
  assert not np.array_equal(different[0]["images"], base[0]["images"])


def test_iterator_state_restores_to_the_next_batch(tmp_path, vocab):
  import grain
  import orbax.checkpoint as ocp
  records, _ = _pairs(tmp_path, vocab)
  spec = pipeline.ImageSpec(image_size=16)
  first, it = _take(pipeline.train_dataset(records, spec, 4, seed=0), 4)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  fresh = iter(pipeline.train_dataset(records, spec, 4, seed=0))
  mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["images"], want["images"])
    np.testing.assert_array_equal(got["pair_ids"], want["pair_ids"])


def test_eval_keeps_every_example_and_marks_padding(tmp_path, vocab):
  records, _ = _pairs(tmp_path, vocab, n=10)
  batches = list(pipeline.eval_dataset(records, pipeline.ImageSpec(image_size=16), 4))
  assert len(batches) == 3
  assert [int(b["valid"].sum()) for b in batches] == [4, 4, 2]
  assert batches[-1]["images"].shape == (4, 16, 16)
  seen = np.concatenate([b["pair_ids"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(seen, [r["pair_id"] for r in records])


def test_bad_file_mid_run_raises_with_row_or_is_skipped(tmp_path, vocab):
  records, _ = _pairs(tmp_path, vocab)
  (tmp_path / "5.png").write_bytes(b"corrupt")
  spec = pipeline.ImageSpec(image_size=16)
  with pytest.raises(images.ImageError, match=r"row 6: .*5.png: cannot decode"):
    list(pipeline.eval_dataset(records, spec, 4, source="m.csv"))
  batches = list(pipeline.eval_dataset(records, spec, 4, source="skip.csv", skip_bad=True))
  assert sum(int(b["valid"].sum()) for b in batches) == 11
  assert pipeline.skipped_records("skip.csv") == 1


def test_synthetic_generator_is_deterministic(tmp_path):
  a_img, a_rep, a_lab = synthetic.make_example(0, 7)
  b_img, b_rep, b_lab = synthetic.make_example(0, 7)
  np.testing.assert_array_equal(a_img, b_img)
  assert a_rep == b_rep and a_lab == b_lab
  assert not np.array_equal(synthetic.make_example(1, 7)[0], a_img)
  m1 = synthetic.generate(tmp_path / "one", count=24, seed=5, height=64, width=64, workers=1, log=lambda *a: None)
  m2 = synthetic.generate(tmp_path / "two", count=24, seed=5, height=64, width=64, workers=2, log=lambda *a: None)
  assert m1.read_text() == m2.read_text()
  for name in ("oct_000000.png", "oct_000023.png"):
    assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes()
  labels = list(csv.DictReader((tmp_path / "one" / "labels.csv").open()))
  assert all(row["condition"] in synthetic.CONDITIONS for row in labels)
  tasks = tmp_path / "one" / "tasks" / "fluid"
  assert {p.name for p in tasks.iterdir()} <= {"train", "val", "test"}
  assert sum(1 for _ in tasks.rglob("*.png")) == 24


def test_tfds_path_gives_the_same_examples(tmp_path, vocab):
  pytest.importorskip("tensorflow_datasets")
  from retfiner_jax.data import tfds_builders
  records, _ = _pairs(tmp_path, vocab, n=6)
  data_dir = tfds_builders.build("pairs", tmp_path / "m.csv", tmp_path / "tfds")
  tf_records = tfds_builders.pairs_records(data_dir.parent.parent, "train")
  assert [r["report"] for r in tf_records] == [r["report"] for r in records]
  tf_records, _ = pipeline.tokenise_records(tf_records, vocab, 8)
  spec = pipeline.ImageSpec(image_size=16)
  direct = list(pipeline.eval_dataset(records, spec, 3))
  via_tfds = list(pipeline.eval_dataset(tf_records, spec, 3))
  for a, b in zip(direct, via_tfds):
    np.testing.assert_allclose(a["images"], b["images"], atol=1e-5)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  # ImageFolder classification data.
  root = tmp_path / "folder"
  for split in ("train", "test"):
    for label in ("a", "b"):
      (root / split / label).mkdir(parents=True)
      Image.fromarray(_gray(seed=hash((split, label)) % 100)).save(root / split / label / "x.png")
  built = tfds_builders.build("folder", root, tmp_path / "tfds_folder")
  import tensorflow_datasets as tfds
  source = tfds.data_source("oct_image_folder", data_dir=str(built.parent.parent), split="test")
  example = source[0]
  want = images.read_image(root / example["path"].decode()).astype(np.uint16) * 257
  np.testing.assert_array_equal(tfds_builders.decode_png16(example["image"]), want)


def test_the_demo_vocabulary_is_deterministic_and_covers_every_report(tmp_path):
  import random
  from retfiner_jax.data.tokenizer import load_tokenizer, tokenize
  from retfiner_jax.data.vocab import build_vocab
  reports = ["Subretinal fluid, 250 um.", "Drusen present; no fluid.", "Normal foveal contour.",
             "Intraretinal cysts and subretinal fluid."] * 3 + ["Épiretinal membrane."]
  shuffled = list(reports)
  random.Random(0).shuffle(shuffled)
  a, b = build_vocab(reports, 600, tmp_path / "a.txt"), build_vocab(shuffled, 600, tmp_path / "b.txt")
  assert a.read_text() == b.read_text()
  vocab = a.read_text().splitlines()
  assert vocab[:4] == ["[PAD]", "[unused0]", "[unused1]", "[unused2]"] and vocab[101:104] == ["[CLS]", "[SEP]", "[MASK]"]
  assert "fluid" in vocab and "##d" in vocab and vocab.index("fluid") < vocab.index("drusen")  # By frequency.
  out = tokenize(load_tokenizer(a), reports, 30)
  assert 100 not in out["input_ids"]  # [UNK]: every word is covered.
  pieces = sum(1 for t in vocab[106:] if len(t.removeprefix("##")) == 1)  # Characters, alone and as ##c.
  small = build_vocab(reports, 106 + pieces + 2, tmp_path / "small.txt").read_text().splitlines()
  assert small[-2:] == ["fluid", "subretinal"]  # Room for two words: the two most frequent (9 and 6 times).


def test_the_shipped_channel_normalised_on_the_device_equals_the_reference_preprocessing(tmp_path, vocab):
  """The pipeline ships one channel in [0, 1]; the model repeats and normalises it on the device. Against the
  original's preprocessing written out here with PIL and torch: pixels / 255, a bicubic resize of that float
  image, the channel repeated to three, Normalize(mean, std)."""
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp
  from retfiner_jax.models.common import model_images
  records, _ = _pairs(tmp_path, vocab, n=4)
  shipped = next(iter(pipeline.eval_dataset(records, pipeline.ImageSpec(image_size=16), 4)))["images"]
  assert shipped.shape == (4, 16, 16) and shipped.dtype == np.float32
  for backbone in ("retfound", "visionfm"):
    on_device = np.asarray(model_images(jnp.asarray(shipped), backbone))
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in images.NORMALISATION[backbone])
    for i, r in enumerate(records):
      pixels = np.asarray(Image.open(r["image"]).convert("L"), np.float32) / 255.0
      resized = np.asarray(Image.fromarray(pixels, mode="F").resize((16, 16), Image.BICUBIC), np.float32)
      np.testing.assert_array_equal(shipped[i], resized)
      want = ((torch.from_numpy(resized.copy())[None].repeat(3, 1, 1) - mean) / std).permute(1, 2, 0).numpy()
      np.testing.assert_allclose(on_device[i], want, rtol=1e-6, atol=1e-6)
      # The host-side path (the probe and the text side) gives the same input.
      np.testing.assert_allclose(images.preprocess(np.asarray(Image.open(r["image"])), 16, backbone), want,
                                 rtol=1e-6, atol=1e-6)


def test_a_bfloat16_channel_stays_within_its_rounding_of_the_float32_one(tmp_path, vocab):
  import jax.numpy as jnp
  from retfiner_jax.models.common import model_images
  records, _ = _pairs(tmp_path, vocab, n=4)
  exact, half = (next(iter(pipeline.eval_dataset(records, pipeline.ImageSpec(image_size=16, image_dtype=d), 4)))
                 ["images"] for d in ("float32", "bfloat16"))
  assert half.dtype == np.dtype(pipeline.IMAGE_DTYPES["bfloat16"]) and half.nbytes * 2 == exact.nbytes
  # bfloat16 keeps 8 significant bits: rounded to nearest, a value is off by at most 2^-8 of itself.
  bound = 2.0 ** -8 * np.abs(exact)
  assert (np.abs(half.astype(np.float32) - exact) <= bound).all()
  error = np.abs(np.asarray(model_images(jnp.asarray(half), "retfound") - model_images(jnp.asarray(exact), "retfound")))
  assert error.max() > 0 and (error <= bound[..., None] / 0.224 * 1.001).all()  # 0.224: the smallest std.
  with pytest.raises(ValueError, match="config.data.image_dtype must be one of"):
    pipeline.ImageSpec(image_dtype="uint8")
