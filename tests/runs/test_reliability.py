"""Faults a long run meets: a kill between the best and the regular checkpoint, a signal at an epoch's end, a
damaged checkpoint, a second run on the same workdir, non-finite parameters or validation losses."""
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retfiner_jax import disk_space
from retfiner_jax.errors import ConfigError, DiskFull
from retfiner_jax.refine import inputs, trainer
from retfiner_jax.runs.checkpoints import NoRestorableCheckpoint, ResumeMismatch, RunCheckpoints
from retfiner_jax.runs import whole_files
from retfiner_jax.runs.run_log import read_metrics
from retfiner_jax.runs.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLocked
from retfiner_jax.weights import files as weight_files
from conftest import ROOT, random_batch, tiny_config, train_losses


def test_kill_after_the_best_checkpoint_and_a_signal_at_an_epoch_end_resume(corpus, tmp_path):
  """Run 1 (6 steps, a checkpoint every 4) ends at an epoch with checkpoints 4 and 6 and best/6. Deleting
  checkpoints/6 leaves the workdir as a kill between the two saves of step 6 does: the next run resumes from 4,
  reaches 6 again, where best/6 exists (it used to die with StepAlreadyExistsError), and is SIGTERMed at the
  epoch's end, which asks for step 6 twice. A third run resumes from 6 and finishes; every step's loss is
  logged exactly once, and the steps and validation that the second run redid from step 4 equal run 1's
  (an exact resume mid-epoch)."""
  work = tmp_path / "run"
  config = tiny_config(corpus, max_steps=6)
  config.checkpoint.every_steps = 4
  first = trainer.run(config, work, log=lambda *a: None)
  assert first["status"] == "finished" and first["steps"] == 6
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [4, 6]
  assert [p.name for p in (work / "best").iterdir()] == ["6"]
  losses_1 = train_losses(work)
  val_1 = [r for r in read_metrics(work / "metrics.jsonl") if r["kind"] == "val"]
  assert len(val_1) == 1 and val_1[0]["step"] == 6 and 0 <= val_1[0]["recall_i2t_at_5"] <= 1
  import shutil
  shutil.rmtree(work / "checkpoints" / "6")
  saved_config = (work / "config.json").read_text()
  changed = tiny_config(corpus, epochs=2)
  changed.model.text_dropout = 0.0
  changed.data.augment = True
  with pytest.raises(ConfigError, match=r"other settings.*Changed: data.augment: False -> True; "
                                        r"model.text_dropout: 0.1 -> 0.0\. Use a new --workdir"):
    trainer.run(changed, work, log=lambda *a: None)
  assert (work / "config.json").read_text() == saved_config  # A refused run leaves it as it was.

  config = tiny_config(corpus, epochs=2)
  config.checkpoint.every_steps = 4
  lines = []

  def log(line, **_):
    lines.append(line)
    if line.startswith("epoch") and "step      6/" in line:
      os.kill(os.getpid(), signal.SIGTERM)
  second = trainer.run(config, work, log=log)
  assert any("resumed" in line and "step 4" in line for line in lines), lines
  assert any(line.startswith("resuming with changed settings: ") and "train.epochs: 20 -> 2" in line
             and "train.max_steps: 6 -> -1" in line for line in lines)
  assert second["status"] == "interrupted" and second["steps"] == 6
  third = trainer.run(config, work, log=lambda *a: None)
  assert third["status"] == "finished" and third["steps"] == 12
  rows = [r["step"] for r in read_metrics(work / "metrics.jsonl") if r["kind"] == "train"]
  assert rows == list(range(1, 13))  # No row twice: the resumed runs dropped the rows after their start.
  losses = train_losses(work)
  assert all(losses[s] == losses_1[s] for s in range(1, 7)), (losses, losses_1)  # Exact resume from step 4.
  val = [r for r in read_metrics(work / "metrics.jsonl") if r["kind"] == "val"]
  assert [r["step"] for r in val] == [6, 12] and val[0]["loss"] == val_1[0]["loss"]
  assert not (work / LOCK_NAME).exists()
  # Outputs a person reads: curves, TensorBoard events, the exported encoder in both forms.
  assert (work / "training_curves.png").exists()
  # TensorBoard holds what metrics.jsonl holds, under the same names (`<kind>/<key>`), and nothing else.
  logged = {(f"{r['kind']}/{k}", r["step"]): v for r in read_metrics(work / "metrics.jsonl")
            for k, v in r.items() if k not in ("kind", "step", "epoch")}
  events = tensorboard_scalars(work / "tensorboard")
  assert set(events) == set(logged)
  assert all(np.isclose(events[key], value, rtol=1e-6) for key, value in logged.items())
  assert {"train/loss_itc", "train/input_wait_fraction", "val/loss", "val/recall_i2t_at_1"} <= {t for t, _ in
                                                                                                logged}
  assert Path(third["exported"]["retfiner_flax"], "model.json").exists() and Path(third["exported"]["pytorch"]).exists()


def tensorboard_scalars(folder) -> dict:
  """{(tag, step): value} of the scalars in a folder's event files (TFRecord framing read by hand; the last
  write of a step wins, as TensorBoard shows it)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(Path(folder).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for value in event.summary.value:
        out[(value.tag, event.step)] = value.simple_value
  return out


def _two_checkpoints(folder):
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  saver = RunCheckpoints(folder, keep=2, log=lambda *a: None)
  for step in (1, 2):
    next(iterator)
    saver.save(step, {"w": jnp.full(3, float(step))}, iterator, {"epoch": step})
  assert not saver.save(2, {"w": jnp.zeros(3)}, iterator, {"epoch": 9})  # A step saved already: left alone.
  saver.close()
  return folder / "checkpoints" / "2"


def _largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated data file": lambda ck: _largest_file(ck / "state").write_bytes(b"\0" * 7),
    "missing iterator file": lambda ck: [p.unlink() for p in (ck / "data").glob("process_*")],
    "bad metadata": lambda ck: (ck / "state" / "_METADATA").write_text("{not json"),
    "missing state": lambda ck: __import__("shutil").rmtree(ck / "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  latest = _two_checkpoints(tmp_path)
  DAMAGE[damage](latest)
  lines = []
  restorer = RunCheckpoints(tmp_path, keep=2, log=lines.append)
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  state, progress, step = restorer.restore(abstract, iterator)
  assert step == 1 and progress == {"epoch": 1} and np.all(np.asarray(state["w"]) == 1.0)
  assert next(iterator) == 1  # The iterator continues after the one element read before step 1.
  assert any("checkpoint 2 is damaged" in line and "resuming from checkpoint 1" in line for line in lines)
  kept = list((tmp_path / "damaged_checkpoints").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("2-")  # Kept aside, not deleted.
  assert restorer.latest_step() == 1
  restorer.close()


def test_no_restorable_checkpoint_moves_nothing_and_names_each_error(tmp_path):
  _two_checkpoints(tmp_path)
  restorer = RunCheckpoints(tmp_path, keep=2, log=lambda *a: None)
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  wrong = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}  # As after a change of config.model.
  with pytest.raises(NoRestorableCheckpoint, match=r"(?s)did the model config change.*step 2: .*step 1: "):
    restorer.restore(wrong, iterator)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  assert not (tmp_path / "damaged_checkpoints").exists()


def test_checkpoints_of_another_process_count_are_refused_untouched(tmp_path):
  """Each process's data position is saved apart: checkpoints written by two processes do not resume in one
  (the two-process run itself: test_multihost.py)."""
  latest = _two_checkpoints(tmp_path)
  (latest / "data" / "process_0-of-1.json").rename(latest / "data" / "process_0-of-2.json")
  restorer = RunCheckpoints(tmp_path, keep=2, log=lambda *a: None)
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  with pytest.raises(ResumeMismatch, match=r"step 2 was written by 2 process\(es\), this run has 1: .*with 2"):
    restorer.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, iterator)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  restorer.close()


def test_one_run_per_workdir(tmp_path):
  """A live holder (another process holding the OS lock) stops a second run with one message naming it; a SIGKILL
  frees the workdir at once, the killed process still a zombie (not reaped); a lock file that names this very
  process (a PID reused after a restart) but is not locked does not fool it."""
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                             "from retfiner_jax.runs.workdir_lock import WorkdirLock\n"
                             f"WorkdirLock({str(tmp_path)!r}).acquire()\n"
                             "print('held', flush=True)\n"
                             "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirLocked, match=rf"in use by another run \(PID {holder.pid} on "):
      WorkdirLock(tmp_path).acquire()
    out = subprocess.run([sys.executable, "-m", "retfiner_jax.main", "--config=configs/retfound.py",
                          f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and f"PID {holder.pid}" in out.stderr
    assert "Traceback" not in out.stderr
    holder.send_signal(signal.SIGKILL)
    for _ in range(100):  # Until the kernel has ended it; it stays a zombie, since nobody waits for it yet.
      if Path(f"/proc/{holder.pid}/status").read_text().find("State:\tZ") >= 0:
        break
      time.sleep(0.05)
    lines = []
    with WorkdirLock(tmp_path, log=lines.append):  # At once: the kernel released the dead holder's lock.
      assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(f"taking over the lock left by PID {holder.pid}" in line for line in lines)
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / LOCK_NAME).exists()
  (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": "x"}))
  with WorkdirLock(tmp_path, log=lambda *a: None):  # Names this process, but nobody holds it: not fooled.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["started"] != "x"
  with pytest.raises(ValueError):  # Released however the run ends.
    with WorkdirLock(tmp_path):
      raise ValueError("a failing run")
  assert not (tmp_path / LOCK_NAME).exists()


def test_non_finite_parameters_are_caught_before_any_checkpoint():
  """A step whose loss is finite but whose update makes the parameters NaN is stopped at the check that
  precedes every save."""
  from retfiner_jax.models.config import get_variant
  from retfiner_jax.models.retfiner import RetFiner, init_params
  from retfiner_jax.refine.objectives import ObjectiveSettings
  from retfiner_jax.refine.step import make_train_step
  cfg = get_variant("tiny-retfound").replace(dtype="float32", text_dropout=0.0)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tx = optax.sgd(float("nan"))
  step = jax.jit(make_train_step(RetFiner(cfg), ObjectiveSettings(), tx, 1))
  _, metrics = step({"params": params, "opt": tx.init(params), "step": jnp.int32(0)}, random_batch(cfg), jnp.int32(0))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["params_finite"]) == 0.0
  run = types.SimpleNamespace(workdir=Path("w"), checkpoints=types.SimpleNamespace(latest_step=lambda: 3))
  with pytest.raises(trainer.NonFiniteLoss, match=r"non-finite parameters after step 7 .*last good checkpoint .* 3"):
    trainer.check_finite(run, 7, metrics)


def test_a_non_finite_validation_loss_stops_the_run(monkeypatch):
  monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"loss": float("nan")})
  saved = []
  config = types.SimpleNamespace(eval=types.SimpleNamespace(seed=0, recall_at=(1,), fixed_sampling=True))
  run = types.SimpleNamespace(
      progress=trainer.Progress(epoch=2), config=config, model=None, state={"params": None}, settings=None,
      val_batches=lambda: [], global_batch=None, eval_loss_fn=None, embed_fn=None, log=lambda *a: None,
      workdir=Path("w"), save=saved.append,
      checkpoints=types.SimpleNamespace(latest_step=lambda: 12, save_best=lambda *a: saved.append(a)))
  run_log = types.SimpleNamespace(write=lambda *a, **k: None)
  with pytest.raises(trainer.NonFiniteLoss, match=r"non-finite validation loss nan after epoch 3 \(step 18\)"):
    trainer.end_of_epoch(run, 18, run_log)
  assert saved == []  # Neither labelled best nor saved.


# ---------------------------------------------------------------------------------------------------------
# Records, manifests and probe folders.

def _write_pngs(folder, names, size=(40, 30)):
  from PIL import Image
  folder.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    Image.fromarray(np.full(size, 40 * i % 255, np.uint8)).save(folder / name)


def test_bad_records_are_caught_by_the_checker_before_tokenising(corpus, tmp_path):
  from retfiner_jax.data import check, images
  np.save(tmp_path / "huge.npy", np.full((8, 8), 1e300))  # float64 beyond float32: NaN in training.
  np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
  for name, kind in (("huge.npy", "overflow"), ("text.npy", "not_pixels")):
    with pytest.raises(images.ImageError, match=name) as e:
      images.read_image(tmp_path / name)
    assert e.value.kind == kind
  _write_pngs(tmp_path, ["ok.png"])
  manifest = tmp_path / "m.csv"
  manifest.write_bytes(b"image,report\nok.png,fine report\nok.png,caf\xe9 not utf-8\nhuge.npy,big\n"
                       b"text.npy,strings\nok.png,another fine report\n")
  config = tiny_config(corpus)
  config.data.train_manifest = str(manifest)
  with pytest.raises(ValueError, match=r"(?s)3 rows have problems.*not valid UTF-8.*overflow float32.*not pixels"):
    inputs.load_split(config, "train", log=lambda *a: None)
  config.data.skip_bad_records = True
  lines = []
  records, _ = inputs.load_split(config, "train", log=lines.append)
  assert [r["row"] for r in records] == [1, 5] and all(len(r["input_ids"]) for r in records)
  assert any("leaving out 3 bad rows" in line for line in lines)
  assert set(check.check_records([{"row": 1, "image": str(tmp_path / "huge.npy"), "report": "x"}])[1][0][:1]) \
      == {"overflow"}


def test_a_file_that_fails_while_loading_is_named_or_skipped(tmp_path, monkeypatch):
  from retfiner_jax.data import images, pipeline
  _write_pngs(tmp_path, ["a.png"])
  record = {"row": 7, "image": str(tmp_path / "a.png"), "input_ids": np.zeros(4, np.int32),
            "attention_mask": np.ones(4, np.int32), "pair_id": 0}
  spec = pipeline.ImageSpec(32, "retfound")

  def broken(*a, **k):
    raise RuntimeError("decoder crashed")
  monkeypatch.setattr(pipeline, "preprocess_gray", broken)
  with pytest.raises(images.ImageError, match=r"m.csv row 7: .*a.png: RuntimeError: decoder crashed"):
    pipeline.LoadPair(spec, "m.csv").random_map(record, np.random.default_rng(0))
  assert pipeline.LoadPair(spec, "m2.csv", skip_bad=True).random_map(record, np.random.default_rng(0)) is None
  assert pipeline.skipped_records("m2.csv") == 1


@pytest.mark.parametrize("content, message", [
    (b"image,report\na.png,\"never closed\nb.png,fine\n", r"row 1 \(line 2\) cannot be parsed.*never closed"),
    (b"image,report\na.png,x\nb.png,one, two\n", r"row 2 \(line 3\) has 3 fields, the header 2"),
], ids=["unterminated quote", "extra field"])
def test_manifest_rows_that_would_be_lost_are_errors(tmp_path, content, message):
  from retfiner_jax.data.manifest import ManifestError, read_manifest
  (tmp_path / "m.csv").write_bytes(content)
  with pytest.raises(ManifestError, match=message):
    read_manifest(tmp_path / "m.csv")


def test_manifest_formats_a_user_meets(tmp_path):
  from retfiner_jax.data.manifest import ManifestError, read_manifest
  (tmp_path / "excel.csv").write_bytes("\ufeffimage,report\na.png,x\n".encode("utf-8"))
  assert read_manifest(tmp_path / "excel.csv")[0]["report"] == "x"  # The BOM is not part of the first name.
  (tmp_path / "m.jsonl").write_text('{"image": "a.png", "report": "x"}\n["a.png", "x"]\n')
  with pytest.raises(ManifestError, match=r"m.jsonl: row 2 \(line 2\) is a JSON list, not an object"):
    read_manifest(tmp_path / "m.jsonl")
  (tmp_path / "m.parquet").write_bytes(b"PAR1 damaged")
  with pytest.raises(ManifestError, match=r"m.parquet: cannot read as Parquet"):
    read_manifest(tmp_path / "m.parquet")


def test_probe_folders_hidden_folders_single_images_and_bad_files(tmp_path):
  from retfiner_jax.probe import folders
  from retfiner_jax.probe.run import dataset_splits
  root = tmp_path / "ds"
  _write_pngs(root / "train" / "cnv", ["1.png", "2.png", "3.png"])
  _write_pngs(root / "train" / "dme", ["1.png"])  # One image, and no val folder.
  _write_pngs(root / "train" / ".ipynb_checkpoints", ["x.png"])
  _write_pngs(root / "test" / "cnv", ["1.png"])
  _write_pngs(root / "test" / "dme", ["1.png", "2.png"])
  (root / "test" / "dme" / "2.png").write_bytes((root / "test" / "dme" / "2.png").read_bytes()[:40])  # Truncated.
  lines = []
  splits, classes = dataset_splits(root, lines.append)
  assert classes == ["cnv", "dme"]
  assert sorted(y for _, y in splits["train"]) == [0, 0, 1] and [y for _, y in splits["val"]] == [0]
  assert any("classes ['dme'] have a single training image" in line for line in lines)
  with pytest.raises(folders.ProbeDataError, match=r"unreadable image .*test/dme/2.png"):
    folders.load_gray_u8([p for p, _ in splits["test"]], 16)
  lines = []
  splits, _ = dataset_splits(root, lines.append, skip_bad_images=True)
  assert len(splits["test"]) == 2 and any("leaving out" in line and "dme/2.png" in line for line in lines)


def test_user_mistakes_are_one_line_with_the_fix(corpus, tmp_path, capsys):
  from retfiner_jax.data import check
  from retfiner_jax.errors import ConfigError
  for key, value in (("log_every", 0), ("batch_size", 0), ("micro_batches", 0)):
    config = tiny_config(corpus, **{key: value})
    with pytest.raises(ConfigError, match=rf"config.train.{key} must be at least 1, got 0: set "
                                          rf"--config.train.{key}=N"):
      trainer.run(config, tmp_path / key, log=lambda *a: None)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ConfigError, match="workdir .*a_file is a file"):
    trainer.run(tiny_config(corpus), tmp_path / "a_file", log=lambda *a: None)
  with pytest.raises(SystemExit) as e:
    check.main([str(tmp_path / "m.csv"), "--workers", "0"])
  assert e.value.code == 2 and "must be a whole number of at least 1, got '0'" in capsys.readouterr().err
  out = subprocess.run([sys.executable, "-m", "retfiner_jax.main", "--config=configs/retfound.py",
                        f"--workdir={tmp_path / 'w'}", "--config.train.log_every=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == ["error: config.train.log_every must be at least 1, got 0: set "
                                             "--config.train.log_every=N with N >= 1"]


def test_the_checker_names_every_bad_row_and_warns_about_conversions(tmp_path, capsys):
  from PIL import Image
  from retfiner_jax.data import check
  Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(tmp_path / "rgba.png")
  Image.fromarray(np.zeros((20, 30), np.uint16)).save(tmp_path / "deep.png")
  lines = ["image,report"] + [f"missing{i}.png,report {i}" for i in range(25)]
  lines += ["rgba.png,fine", "deep.png,fine", "rgba.png,fine"]
  (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
  report = tmp_path / "problems.csv"
  assert check.main([str(tmp_path / "m.csv"), "--report", str(report)]) == 1
  out = capsys.readouterr().out
  assert "image file not found" in out and "... 5 more" in out and f"every bad row with its reasons: {report}" in out
  import csv
  rows = list(csv.DictReader(report.open()))
  assert [int(r["row"]) for r in rows] == list(range(1, 26))  # All 25, not the first few.
  assert all(r["problem"] == "missing_file" and "file not found" in r["message"] for r in rows)
  assert "warning: 2 rows: alpha channel dropped (rows 26, 28)" in out
  assert "warning: 1 rows: 16-bit, scaled by its bit depth (rows 27)" in out
  assert "warning: 1 duplicate rows, same image, slice and report as an earlier row (28 = 26)" in out


def test_exports_count_as_free_only_the_files_they_have_replaced(tmp_path, monkeypatch):
  """Each format is written beside its earlier export until complete, so an earlier export of a chosen format
  counts as free only for the formats written after it; one of a format not chosen stays on the disk."""
  from retfiner_jax.weights import exports
  params = {"vision_encoder": {"w": np.zeros(1 << 18, np.float32)}, "text_encoder": {"w": np.zeros(4, np.float32)}}
  paths = exports.export_paths(types.SimpleNamespace(backbone="retfound"), tmp_path)
  one = exports.export_shares(params)["pytorch"]  # 1 MB of vision weights, as the safetensors format writes.
  mb = 1 << 20
  real = disk_space.shutil.disk_usage

  def free(nbytes):
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: real(p)._replace(free=nbytes))
  # One format: about 1.05 MB + 1 MB of room; its earlier file is no help, it stays until the new one is whole.
  paths["pytorch"].write_bytes(b"\0" * one)
  free(int(1.5 * mb))
  with pytest.raises(DiskFull, match=r"exports \(pytorch\): they need about 2.0 MB, 1.5 MB are free"):
    exports.check_space(params, paths, tmp_path, ["pytorch"])
  free(int(2.5 * mb))
  exports.check_space(params, paths, tmp_path, ["pytorch"])
  # Two formats (3.2 MB with the margin): the earlier .pth, replaced first, makes room for the safetensors.
  exports.check_space(params, paths, tmp_path, ["pytorch", "safetensors"])
  paths["pytorch"].unlink()
  paths["lightning"].write_bytes(b"\0" * one)  # A format not chosen: stays, so it is no help.
  with pytest.raises(DiskFull, match=r"exports \(pytorch, safetensors\): they need about 3.1 MB, 2.5 MB are free"):
    exports.check_space(params, paths, tmp_path, ["pytorch", "safetensors"])


def test_a_checkpoint_that_cannot_fit_on_disk_stops_with_one_message(tmp_path, monkeypatch):
  import shutil
  from retfiner_jax.runs import checkpoints
  folder = _two_checkpoints(tmp_path)  # Steps 1 and 2 exist.
  saver = RunCheckpoints(tmp_path, keep=2, log=lambda *a: None)
  real = shutil.disk_usage
  monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: real(p)._replace(free=100 << 10))
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  big = {"w": jnp.zeros((1 << 20,), jnp.float32)}  # 4 MB.
  with pytest.raises(checkpoints.DiskFull, match=r"checkpoint 3: it needs about 5.2 MB, 0.1 MB are free.*resumes "
                                                  r"from step 2"):
    saver.save(3, big, iterator, {"epoch": 3})
  with pytest.raises(checkpoints.DiskFull, match=r"best checkpoint 3"):
    saver.save_best(3, big, {"val_loss": 1.0})
  saver.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"] and folder.exists()


def test_a_device_makers_oct_file_gets_the_way_to_export_it(tmp_path):
  """A format no reader here opens (Topcon .fds) names the way out; one that eyepy reads but that is damaged
  names the parser's complaint (tests/data/test_vendor.py tests the files that read)."""
  from retfiner_jax.data import images
  (tmp_path / "scan.fds").write_bytes(b"FOCT")
  with pytest.raises(images.ImageError, match=r"scan.fds: a device maker's OCT file.*no reader here opens.*"
                                              r"oct-converter.*\.vol"):
    images.read_image(tmp_path / "scan.fds")
  pytest.importorskip("eyepy", reason="the vendor extra: pip install eyepy")
  (tmp_path / "scan.e2e").write_bytes(b"CMDb")
  with pytest.raises(images.ImageError, match=r"scan.e2e: cannot read as Heidelberg E2E \(StreamError"):
    images.read_image(tmp_path / "scan.e2e")


def test_a_save_cut_off_by_a_kill_is_ignored_and_redone(tmp_path):
  """A SIGKILL during an Orbax write leaves only a temporary folder: restoring ignores it and the step is
  saved again when the resumed run reaches it."""
  _two_checkpoints(tmp_path)
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "_METADATA").write_text("{")
  saver = RunCheckpoints(tmp_path, keep=3, log=lambda *a: None)
  assert saver.latest_step() == 2
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  state, _, step = saver.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, iterator)
  assert step == 2 and np.all(np.asarray(state["w"]) == 2.0)
  assert saver.save(3, {"w": jnp.full(3, 3.0)}, iterator, {"epoch": 3})
  saver.close()
  again = RunCheckpoints(tmp_path, keep=3, log=lambda *a: None)
  assert again.latest_step() == 3
  state, _, _ = again.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, iter(grain.MapDataset.range(10)
                                                                                   .to_iter_dataset()))
  assert np.all(np.asarray(state["w"]) == 3.0)
  again.close()


def test_exports_follow_config_and_a_death_during_them_is_finished_by_a_rerun_without_training(corpus, tmp_path,
                                                                                               monkeypatch):
  """Issue 36: `config.export.formats` chooses what a finished run writes (the default: the whole model's Flax
  folder and the FM's PyTorch layout); a format that cannot be written is an error before training. A process
  that dies while exporting (here: an exception out of the Lightning writer, after the Flax folder and the .pth
  were written) leaves the final checkpoint complete: the rerun resumes at the last step, trains nothing, and
  writes every export, with the weights the first attempt wrote."""
  from retfiner_jax.weights import exports
  with pytest.raises(ConfigError, match="unknown.*onnx"):
    trainer.run(with_export_formats(tiny_config(corpus, max_steps=4), formats="retfiner_flax,onnx"), tmp_path / "x")
  work = tmp_path / "run"
  config = with_export_formats(tiny_config(corpus, max_steps=4), formats="retfiner_flax,pytorch,lightning")

  def dies(*args, **kwargs):
    raise RuntimeError("the process died while exporting")
  monkeypatch.setattr(exports, "save_lightning", dies)
  with pytest.raises(RuntimeError, match="died while exporting"):
    trainer.run(config, work, log=lambda *a: None)
  assert not (work / "summary.json").exists() and (work / "export" / "retfiner_flax").exists()
  _, first, _ = weight_files.load_converted(work / "export" / "retfiner_flax")
  rows = (work / "metrics.jsonl").read_text()
  monkeypatch.undo()
  # Exports that cannot fit on the disk are refused before any is written, naming the way on.
  import shutil
  real = shutil.disk_usage
  monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
  with pytest.raises(DiskFull, match=r"for the exports \(retfiner_flax, pytorch, lightning\): they need about [\d.]+ MB, "
                     r"[\d.]+ MB are free.*rerun the same command: the run's final checkpoint is complete"):
    trainer.run(config, work, log=lambda *a: None)
  assert not (work / "export" / "retfiner_lightning.ckpt").exists()
  monkeypatch.undo()
  lines = []
  summary = trainer.run(config, work, log=lambda line, **_: lines.append(line))
  assert summary["status"] == "finished" and summary["steps"] == 4
  assert any(line.startswith("resumed") and "step 4" in line for line in lines)
  assert not any("compiling the train step" in line for line in lines)  # Nothing trained again.
  assert (work / "metrics.jsonl").read_text() == rows
  assert set(summary["exported"]) == {"retfiner_flax", "pytorch", "lightning"}
  assert Path(summary["exported"]["lightning"]).exists() and not (work / "export" / "vision_flax").exists()
  _, again, _ = weight_files.load_converted(summary["exported"]["retfiner_flax"])
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))
  assert any(line.startswith("exported the refined model") and "lightning (" in line for line in lines)


def test_an_export_killed_mid_file_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
  """Each export format is written under a `.partial` name and renamed when complete: a process killed half-way
  through a file (here a writer that writes part of it, then dies) leaves the earlier export of that format whole
  under its name, and the next export replaces both it and the leftover."""
  import torch
  from retfiner_jax.models.config import get_variant
  from retfiner_jax.models.retfiner import init_params
  from retfiner_jax.weights import exports
  cfg = get_variant("tiny-retfound").replace(dtype="float32")
  before, after = (jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(seed))) for seed in (0, 1))
  out = tmp_path / "export"
  formats = "retfiner_flax,pytorch"
  paths = exports.export_model(cfg, before, out, log=lambda *a: None, formats=formats)
  pth, flax_folder = Path(paths["pytorch"]), Path(paths["retfiner_flax"])
  vision_key = next(iter(exports.vision_state_dict(cfg, before)))

  def saved_vision(path):
    return torch.load(path, weights_only=True)[vision_key].numpy()

  def saved_flax(folder):
    return jax.tree.leaves(weight_files.load_converted(folder)[1])
  assert np.array_equal(saved_vision(pth), exports.vision_state_dict(cfg, before)[vision_key])
  real_save_torch = exports.save_torch

  def dies_half_way(state, path, **extra):
    real_save_torch(state, path, **extra)
    Path(path).write_bytes(Path(path).read_bytes()[:1000])  # What a kill in mid-write leaves.
    raise KeyboardInterrupt("killed while writing the .pth")
  monkeypatch.setattr(exports, "save_torch", dies_half_way)
  with pytest.raises(KeyboardInterrupt):
    exports.export_model(cfg, after, out, log=lambda *a: None, formats=formats)
  monkeypatch.undo()
  # The Flax folder (written first) is the new one; the .pth under its name is the earlier one, whole.
  assert all(np.array_equal(a, b) for a, b in zip(saved_flax(flax_folder), jax.tree.leaves(after)))
  assert np.array_equal(saved_vision(pth), exports.vision_state_dict(cfg, before)[vision_key])
  leftover = whole_files.partial_path(pth)
  assert leftover.exists() and leftover.stat().st_size == 1000
  with pytest.raises(Exception):
    torch.load(leftover, weights_only=True)
  exports.export_model(cfg, after, out, log=lambda *a: None, formats=formats)
  assert np.array_equal(saved_vision(pth), exports.vision_state_dict(cfg, after)[vision_key])
  assert not leftover.exists() and not whole_files.partial_path(flax_folder).exists()
  assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", pth.name, flax_folder.name])


def test_files_a_later_run_reads_are_whole_or_absent(tmp_path):
  """whole_files: a write that dies half-way leaves what was under the name before (or nothing), never a part;
  the next write replaces the leftover. Used for every JSON a rerun reads (summaries, the demo's stage results,
  the workdir's config) and for the exports."""
  summary = tmp_path / "summary.json"
  whole_files.write_json(summary, {"status": "finished", "steps": 3})

  def dies_half_way(path):
    path.write_text('{"status": "fini')
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    whole_files.make_whole(summary, dies_half_way)
  assert json.loads(summary.read_text()) == {"status": "finished", "steps": 3}
  with pytest.raises(KeyboardInterrupt):
    whole_files.make_whole(tmp_path / "results.json", dies_half_way)
  assert not (tmp_path / "results.json").exists()
  whole_files.write_json(summary, {"status": "finished", "steps": 4}, allow_nan=False)
  assert json.loads(summary.read_text()) == {"status": "finished", "steps": 4}
  with pytest.raises(ValueError):  # allow_nan=False reaches json.dumps; the earlier file stays.
    whole_files.write_json(summary, {"loss": float("nan")}, allow_nan=False)
  assert json.loads(summary.read_text())["steps"] == 4
  # A folder: the earlier one stays whole until the new one is complete, then is replaced.
  folder = tmp_path / "text_flax"

  def folder_of(text, dies=False):
    def write(path):
      path.mkdir()
      (path / "a").write_text(text)
      if dies:
        raise KeyboardInterrupt
      (path / "b").write_text(text)
    return write
  whole_files.make_whole(folder, folder_of("old"))
  with pytest.raises(KeyboardInterrupt):
    whole_files.make_whole(folder, folder_of("new", dies=True))
  assert {p.name: p.read_text() for p in folder.iterdir()} == {"a": "old", "b": "old"}
  whole_files.make_whole(folder, folder_of("new"))
  assert {p.name: p.read_text() for p in folder.iterdir()} == {"a": "new", "b": "new"}
  # What the dead write left stays beside (never under) the name until that name is written again.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json.partial", "summary.json", "text_flax"]
  whole_files.write_json(tmp_path / "results.json", [])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "summary.json", "text_flax"]


def with_export_formats(config, formats):
  config.export.formats = formats
  return config
