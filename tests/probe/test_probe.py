"""The linear probe: agreement with scikit-learn, early stopping, vmapped seeds, metrics, folders, the CLI."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from retfiner_jax.data import synthetic
import configs
from retfiner_jax.probe import folders, heads, metrics, run
from retfiner_jax.probe.settings import ProbeSettings


def _blobs(n=240, dim=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 1.5, (classes, dim))
  y = rng.integers(0, classes, n)
  return (centres[y] + rng.normal(0, 1.0, (n, dim))).astype(np.float32), y


def test_converged_probe_agrees_with_sklearn_logistic_regression():
  from sklearn.linear_model import LogisticRegression
  x, y = _blobs()
  c = 0.5
  settings = ProbeSettings(seeds=(0,), max_epochs=4000, patience=10 ** 9, learning_rate=0.05,
                           weight_decay=0.0, l2=1.0 / (c * len(y)), label_smoothing=0.0, batch_size=-1)
  # sklearn minimises C * sum(CE) + |W|^2 / 2, i.e. mean(CE) + |W|^2 / (2 C n): our loss with l2 = 1 / (C n).
  trained = heads.train_heads(x, y, x, y, 3, settings)
  ours = heads.predict_proba(trained, x)[0]
  sk = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x, y)
  want = sk.predict_proba(x)
  np.testing.assert_array_equal(ours.argmax(-1), want.argmax(-1))
  np.testing.assert_allclose(ours, want, atol=2e-3)


def test_early_stopping_rule_on_constructed_curves():
  s = ProbeSettings()

  def run_curve(bacc, loss):
    state, stopped_at = heads.Stopping.start(), None
    for epoch, (b, l) in enumerate(zip(bacc, loss)):
      state, improved, stop = heads.stopping_update(state, epoch, jnp.float32(b), jnp.float32(l), s)
      if bool(stop):
        stopped_at = epoch
        break
    return int(state.best_epoch), stopped_at

  # Rising to 0.8 at epoch 30, then flat (ties within min delta) with a rising loss: best 30, stop after 20
  # epochs without improvement, at epoch 50.
  bacc = [0.5 + 0.01 * min(e, 30) for e in range(200)]
  loss = [1.0 - 0.01 * min(e, 30) + 0.001 * max(e - 30, 0) for e in range(200)]
  assert run_curve(bacc, loss) == (30, 50)
  # A tie (within 0.001) with a lower loss at epoch 40 is an improvement: best 40, stop at 60.
  loss2 = list(loss)
  loss2[40] = 0.1
  bacc2 = list(bacc)
  bacc2[40] = 0.8 + 0.0005
  assert run_curve(bacc2, loss2) == (40, 60)
  # Flat from the start: the patience only counts from epoch 20, so the stop comes at epoch 39.
  assert run_curve([0.5] * 100, [1.0 + 0.01 * e for e in range(100)]) == (0, 39)


def test_all_seeds_at_once_equal_separate_runs():
  x, y = _blobs(n=200)
  settings = ProbeSettings(seeds=(0, 1, 2), max_epochs=60, batch_size=32, learning_rate=1e-2, weight_decay=0.05)
  together = heads.train_heads(x[:150], y[:150], x[150:], y[150:], 3, settings)
  for i, seed in enumerate(settings.seeds):
    alone = heads.train_heads(x[:150], y[:150], x[150:], y[150:], 3,
                              settings.replace(seeds=(seed,)))
    np.testing.assert_allclose(together["kernel"][i], alone["kernel"][0], rtol=1e-5, atol=1e-7)
    assert int(together["best_epoch"][i]) == int(alone["best_epoch"][0])
  assert not np.allclose(together["kernel"][0], together["kernel"][1])  # Seeds differ (minibatch order, init).


def test_metrics_against_hand_computation():
  y = np.array([0, 0, 1, 1, 1])
  p1 = np.array([0.2, 0.6, 0.7, 0.4, 0.9])  # P(class 1); predictions: 0, 1, 1, 0, 1
  got = metrics.classification_metrics(y, np.stack([1 - p1, p1], 1))
  # Recall: class 0 = 1/2, class 1 = 2/3 -> bacc = 7/12.
  assert got["bacc"] == pytest.approx(7 / 12)
  # AUROC: positive/negative pairs ranked correctly: (0.7,0.9,0.4) vs (0.2,0.6): 3 + 2 + 1 = 5 of 6.
  assert got["auroc"] == pytest.approx(5 / 6)
  # AP (the original's: one-vs-rest per class, weighted by support). Class 1, ranking 0.9(+), 0.7(+), 0.6(-),
  # 0.4(+), 0.2(-): precision at each positive 1, 1, 3/4. Class 0 (scores 1 - p): 0.8(+), 0.6(-), 0.4(+),
  # 0.3(-), 0.1(-): 1, 2/3. AUROC is 5/6 for both columns, so its weighted mean is too.
  assert got["ap"] == pytest.approx((2 * (1 + 2 / 3) / 2 + 3 * (1 + 1 + 0.75) / 3) / 5)
  # F1: class 0: P=1/2, R=1/2 -> 1/2; class 1: P=2/3, R=2/3 -> 2/3; weighted by support 2 and 3.
  assert got["f1"] == pytest.approx((2 * 0.5 + 3 * 2 / 3) / 5)
  # MCC from TP=2, TN=1, FP=1, FN=1.
  assert got["mcc"] == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))


def test_real_bscans_through_the_folder_reader(tmp_path):
  samples = shared_path("data", "real-oct-samples")
  for path in samples.rglob("*.jp*g"):
    label = path.name.split("-")[0]
    if label == "VMA":
      continue
    split = "train" if path.parent.name == "LOCT" else "test"
    (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
    shutil.copy(path, tmp_path / split / label / path.name)
  splits, classes = folders.read_image_folder(tmp_path)
  assert classes == ["CNV", "DME", "DRUSEN", "NORMAL"] and len(splits["train"]) == 4 and len(splits["test"]) == 4
  x = folders.load_images([p for p, _ in splits["test"]], 48, "visionfm")
  assert x.shape == (4, 48, 48, 3) and np.isfinite(x).all()


def test_bad_inputs_name_the_path(tmp_path):
  def make(root, layout):
    for rel in layout:
      p = root / rel
      p.parent.mkdir(parents=True, exist_ok=True)
      if p.suffix:
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(p)
      else:
        p.mkdir(parents=True, exist_ok=True)
  make(tmp_path / "empty", ["train/a/1.png", "train/b", "test/a/1.png", "test/b/1.png"])
  with pytest.raises(folders.ProbeDataError, match=r"empty/train/b: empty class folder"):
    folders.read_image_folder(tmp_path / "empty")
  make(tmp_path / "differ", ["train/a/1.png", "train/b/1.png", "test/a/1.png", "test/c/1.png"])
  with pytest.raises(folders.ProbeDataError, match=r"differ/test: classes \['a', 'c'\] differ"):
    folders.read_image_folder(tmp_path / "differ")
  make(tmp_path / "one", ["train/a/1.png", "test/a/1.png"])
  with pytest.raises(folders.ProbeDataError, match=r"one/train: a split needs at least two classes"):
    folders.read_image_folder(tmp_path / "one")
  with pytest.raises(folders.ProbeDataError, match=r"absent: no such folder"):  # Not "expected ImageFolder layout".
    folders.read_image_folder(tmp_path / "absent")
  make(tmp_path / "flat", ["a/1.png", "b/1.png"])  # A folder, but without the splits.
  with pytest.raises(folders.ProbeDataError, match=r"flat: expected ImageFolder layout"):
    folders.read_image_folder(tmp_path / "flat")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(folders.ProbeDataError, match=r"bad.png: cannot decode"):
    folders.load_images([tmp_path / "bad.png"], 16, "retfound")
  torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "weights.pth")
  with pytest.raises(ValueError, match=r"weights.pth: unknown checkpoint format"):
    run.load_encoder(tmp_path / "weights.pth")


def test_probe_cli_with_two_encoders_and_the_feature_cache(tmp_path):
  from torch_reference import TorchViT
  synthetic.generate(tmp_path / "data", count=60, seed=1, height=64, width=64, workers=1, log=lambda *a: None)
  for i, name in enumerate(("first", "second")):
    torch.manual_seed(i)
    net = TorchViT(dim=48, mlp=192)
    torch.save(net.state_dict(), tmp_path / f"{name}.pth")
  config = configs.load("probe")
  config.encoder = f"a={tmp_path / 'first.pth'},b={tmp_path / 'second.pth'}"
  config.variant = "tiny-visionfm"
  config.data.root = f"fluid={tmp_path / 'data/tasks/fluid'},drusen={tmp_path / 'data/tasks/drusen'}"
  config.workdir = str(tmp_path / "out")
  config.probe.protocol = "features"
  config.probe.seeds = (0, 1)
  config.probe.max_epochs = 50
  results = run.run(config, log=lambda *a: None)
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert set(saved) == {"fluid", "drusen"} and set(saved["fluid"]) == {"a", "b"}
  for m in metrics.METRICS:
    assert len(saved["fluid"]["a"][m]["per_seed"]) == 2
  comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
  assert comparison["pairs"] == 4 and 0 <= comparison["wilcoxon_p"] <= 1
  for name in ("results.csv", "results.md", "comparison.png", "confusion_fluid_a.png"):
    assert (tmp_path / "out" / name).exists()
  lines = []
  again = run.run(config, log=lines.append)
  assert sum("features from the cache" in line for line in lines) == 4
  assert again == results
  earlier = list((tmp_path / "out" / "previous").iterdir())  # The first run's outputs are kept, set aside.
  assert len(earlier) == 1 and json.loads((earlier[0] / "results.json").read_text()) == saved
  assert (earlier[0] / "confusion_fluid_a.png").exists() and (tmp_path / "out" / "confusion_fluid_a.png").exists()


def test_a_built_tfds_folder_probes_as_the_image_folder_it_came_from(tmp_path):
  """Round trip: an ImageFolder dataset built into TFDS (data/tfds_builders.py `folder`) gives the same splits,
  classes and pixels, and so the same probe results, under both protocols."""
  from torch_reference import TorchViT
  from retfiner_jax.data import tfds_builders
  synthetic.generate(tmp_path / "data", count=60, seed=1, height=64, width=64, workers=1, log=lambda *a: None)
  folder = tmp_path / "data" / "tasks" / "fluid"
  tfds_builders.build("folder", folder, tmp_path / "tfds")
  splits, classes = folders.read_image_folder(folder)
  built_splits, built_classes = folders.read_image_folder(tmp_path / "tfds")
  assert built_classes == classes and {k: len(v) for k, v in built_splits.items()} == {k: len(v) for k, v in
                                                                                      splits.items()}
  for split in splits:
    assert [y for _, y in built_splits[split]] == [y for _, y in splits[split]]
    np.testing.assert_array_equal(folders.load_gray_u8([p for p, _ in built_splits[split]], 32),
                                  folders.load_gray_u8([p for p, _ in splits[split]], 32))
  torch.manual_seed(0)
  torch.save(TorchViT(dim=48, mlp=192).state_dict(), tmp_path / "enc.pth")
  for protocol in ("features", "paper"):
    outcomes = []
    for name, root in (("folder", folder), ("tfds", tmp_path / "tfds")):
      config = configs.load("probe")
      config.encoder, config.variant = str(tmp_path / "enc.pth"), "tiny-visionfm"
      config.data.root = f"fluid={root}"
      config.workdir = str(tmp_path / f"{protocol}_{name}")
      config.probe.update(protocol=protocol, seeds=(0,), max_epochs=3)
      outcomes.append(run.run(config, log=lambda *a: None)["fluid"])
    assert outcomes[0] == outcomes[1], protocol
  with pytest.raises(tfds_builders.TfdsDataError,
                     match=r"holds built \['oct_image_folder'\] data, not 'oct_report_pairs'"):
    tfds_builders.pairs_records(tmp_path / "tfds", "train")


def test_paired_comparison_by_hand():
  """Two datasets x seeds: the per-dataset difference of means, the mean of the paired differences, and the
  Wilcoxon signed-rank p-value, computed here by hand (five positive differences of distinct sizes: the exact
  two-sided p is 2 / 2^5)."""
  results = {"a": {"fm": {"bacc": {"per_seed": [0.50, 0.60, 0.70]}}, "refined": {"bacc": {"per_seed": [0.51, 0.63, 0.74]}}},
             "b": {"fm": {"bacc": {"per_seed": [0.40, 0.45]}}, "refined": {"bacc": {"per_seed": [0.45, 0.51]}}}}
  got = metrics.paired_comparison(results, "fm", "refined")
  assert got["difference_per_dataset"]["a"] == pytest.approx((0.01 + 0.03 + 0.04) / 3)
  assert got["difference_per_dataset"]["b"] == pytest.approx((0.05 + 0.06) / 2)
  assert got["mean_difference"] == pytest.approx((0.01 + 0.03 + 0.04 + 0.05 + 0.06) / 5)
  assert got["pairs"] == 5 and got["wilcoxon_p"] == pytest.approx(2 / 2 ** 5)
  same = metrics.paired_comparison(results, "fm", "fm")
  assert same["mean_difference"] == 0 and same["wilcoxon_p"] == 1.0
