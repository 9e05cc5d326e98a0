"""The demo as an experiment: its two corpora share no image, its reports are written as clinicians write them
(at the documented rates) and their coupling to the labels is measured by scikit-learn, the control draws its own
randomness, and the spread over seeds is computed as by hand. (The whole demo runs, tiny, in test_configs.py.)"""
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import configs
from retfiner_jax import demo
from retfiner_jax.data import pipeline, synthetic
from retfiner_jax.data.manifest import read_manifest
from retfiner_jax.data.report_coupling import report_to_label_bacc
from retfiner_jax.errors import ConfigError
from retfiner_jax.mae.masking import sample_patch_masks


def sampled_reports(n, seed=0):
  rng = np.random.default_rng(seed)
  labs = [synthetic.sample_labels(rng) for _ in range(n)]
  return labs, [synthetic.write_report(lab, rng) for lab in labs]


DRUSEN_WORDS = re.compile(r"drusen|sub-rpe deposits")


def test_reports_leave_out_findings_at_the_documented_rates_small_ones_more_often():
  labs, reports = sampled_reports(6000)
  for size, p in synthetic.OMIT_PROBABILITY.items():
    # Drusen of this size: no sentence names them (no impression names drusen, and an absent finding is never
    # mentioned because it is present).
    rows = [r.lower() for lab, r in zip(labs, reports) if lab["drusen"] and lab["drusen_size"] == size]
    omitted = np.mean([not DRUSEN_WORDS.search(r) for r in rows])
    sigma = np.sqrt(p * (1 - p) / len(rows))
    assert abs(omitted - p) < 4 * sigma + 1e-9, (size, omitted, p, len(rows))
  assert synthetic.OMIT_PROBABILITY["small"] > synthetic.OMIT_PROBABILITY["medium"] > \
      synthetic.OMIT_PROBABILITY["large"]


def test_reports_carry_synonyms_abbreviations_hedges_comparisons_and_sentences_without_findings():
  labs, reports = sampled_reports(3000, seed=1)
  text = "\n".join(reports)
  for word in ("SRF", "IRF", "PED", "ERM", "FTMH", "GA", "subretinal fluid", "epiretinal membrane"):
    assert re.search(rf"\b{re.escape(word)}\b", text), word
  for phrase in ("Possible", "cannot be excluded", "compared with the previous visit", "resolved",
                 "Signal strength", "Follow-up", "Impression:"):
    assert phrase in text, phrase
  assert len({r.split(".")[0] for lab, r in zip(labs, reports) if lab["condition"] == "normal"}) >= 6
  # Absent findings are sometimes mentioned as possible: a report naming SRF does not mean SRF is there.
  no_srf = [r for lab, r in zip(labs, reports) if not lab["srf"]]
  assert any(re.search(r"(possible|questionable|cannot be excluded).*\b(SRF|subretinal fluid)\b", r, re.I)
             for r in no_srf)


def test_report_coupling_is_scikit_learns_cross_validated_balanced_accuracy():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  named = [f"finding {'yes' if y else 'no'} today" for y in labels]
  assert report_to_label_bacc(named, labels) == 1.0
  unrelated = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 4)) for _ in labels]
  assert abs(report_to_label_bacc(unrelated, labels) - 0.5) < 0.12
  # Half the reports name the label, half say nothing: about 0.75.
  half = [t if i % 2 else "nothing to report" for i, t in enumerate(named)]
  assert abs(report_to_label_bacc(half, labels) - 0.75) < 0.08
  with pytest.raises(ValueError, match="two classes"):
    report_to_label_bacc(["a", "b"], [1, 1])
  with pytest.raises(ValueError, match="too few"):
    report_to_label_bacc(["a", "b", "c"], [0, 0, 1])


def test_the_probe_site_is_another_acquisition():
  clinic = [synthetic.make_example(0, i, 64, 64)[0] for i in range(12)]
  probe = [synthetic.make_example(0, i, 64, 64, site="probe")[0] for i in range(12)]
  assert not any(np.array_equal(a, b) for a in clinic for b in probe)
  assert np.mean(probe) > np.mean(clinic)  # Its display is brighter (contrast gamma < 1) and noisier.
  with pytest.raises(ValueError, match="unknown site 'x'"):
    synthetic.make_example(0, 0, site="x")


def tiny_demo_config():
  c = configs.load("demo")
  c.demo.update(refinement_count=40, probe_count=40, image_height=48, tasks=("fluid",))
  return c


def test_refinement_and_probe_corpora_share_no_image_and_the_check_can_fail(tmp_path):
  config = tiny_demo_config()
  corpus = demo.prepare_corpora(config, tmp_path, log=lambda *a: None)
  assert corpus["shared_images"] == 0
  refinement = read_manifest(corpus["refinement_manifest"])
  probe_rows = read_manifest(tmp_path / "data" / "probe" / "manifest.csv")
  assert not {r["patient"] for r in refinement} & {r["patient"] for r in probe_rows}
  assert set(corpus["report_to_label_bacc"]) == {"fluid"} and 0 <= corpus["report_to_label_bacc"]["fluid"] <= 1
  saved = json.loads((tmp_path / "data" / "corpus.json").read_text())
  assert saved["probe_roots"] == {"fluid": str(tmp_path / "data" / "probe" / "tasks" / "fluid")}
  # An image of the refinement corpus copied into the probe's data is found by its pixels, under another name.
  leaked = next((tmp_path / "data" / "refinement" / "images").glob("*.png"))
  target = next((tmp_path / "data" / "probe" / "tasks" / "fluid" / "test").iterdir()) / "renamed.png"
  shutil.copy(leaked, target)
  assert demo.shared_images(tmp_path / "data" / "refinement" / "images", corpus["probe_roots"].values()) == 1
  (tmp_path / "data" / "corpus.json").unlink()
  with pytest.raises(ConfigError, match="1 image.* both in the refinement corpus"):
    demo.prepare_corpora(config, tmp_path, log=lambda *a: None)


def test_every_stage_and_run_draws_its_own_randomness_and_the_controls_masks_and_order_differ(tmp_path):
  config = tiny_demo_config()
  seeds = [demo.stage_seeds(config, k) for k in range(3)]
  scalars = [s[k] for s in seeds for k in ("fm", "refinement", "control")]
  assert len(set(scalars)) == len(scalars)
  assert len({p for s in seeds for p in s["probe"]}) == 3 * len(config.demo.probe.seeds)
  fm, control = seeds[0]["fm"], seeds[0]["control"]
  # The MAE step's masks come from fold_in(PRNGKey(seed), step); the control starts at step 0 as stage 1 did.
  masks = [sample_patch_masks(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(s), 0))[0], 8, 16, 0.75)[2]
           for s in (fm, control)]
  assert not np.array_equal(*masks)
  # The data order and augmentation: the first batch of each seed's stream differs.
  manifest = synthetic.generate(tmp_path, count=24, seed=0, height=32, width=32, workers=1, log=lambda *a: None)
  records = read_manifest(manifest, need_reports=False)
  spec = pipeline.ImageSpec(image_size=32, augment=True)
  first = [next(iter(pipeline.train_dataset(records, spec, 8, s, images_only=True)))["images"] for s in (fm, control)]
  assert not np.array_equal(*first)


def fake_seed_run(after, before, control, random=0.5):
  row = lambda b: {"bacc": b, "auroc": b}
  return {"status": "finished", "tasks": {t: {"after": row(after[i]), "before": row(before[i]),
                                              "control": row(control[i]), "random": row(random),
                                              "zero_shot": {**row(0.6), "classes": 2}}
                                          for i, t in enumerate(("a", "b"))}}


def test_the_spread_over_seeds_is_the_sample_std_by_hand():
  runs = [fake_seed_run((0.70, 0.60), (0.60, 0.60), (0.65, 0.55)),
          fake_seed_run((0.72, 0.64), (0.62, 0.60), (0.70, 0.60)),
          fake_seed_run((0.74, 0.62), (0.61, 0.58), (0.66, 0.66))]
  tasks, gains = demo.aggregate(runs, ("a", "b"))
  assert tasks["a"]["after"]["bacc_mean"] == pytest.approx(0.72)
  assert tasks["a"]["after"]["bacc_std"] == pytest.approx(0.02)  # Deviations -0.02, 0, 0.02: sqrt(0.0008 / 2).
  assert tasks["a"]["after"]["bacc"] == tasks["a"]["after"]["bacc_mean"]
  # Gains per run on task a: 0.10, 0.10, 0.13 -> mean 0.11, std sqrt((1e-4 + 1e-4 + 4e-4) / 2).
  assert gains["a"]["after_vs_before"]["mean"] == pytest.approx(0.11)
  assert gains["a"]["after_vs_before"]["std"] == pytest.approx(np.sqrt(3e-4))
  # The average over tasks per run, then the spread of those: run 1 (0.05 + 0.05) / 2, run 2 (0.02 + 0.04) / 2,
  # run 3 (0.08 - 0.04) / 2.
  assert gains["average"]["after_vs_control"]["mean"] == pytest.approx(np.mean([0.05, 0.03, 0.02]))
  assert gains["average"]["after_vs_control"]["std"] == pytest.approx(np.std([0.05, 0.03, 0.02], ddof=1))
  one_tasks, one_gains = demo.aggregate(runs[:1], ("a", "b"))
  assert one_tasks["a"]["after"]["bacc_std"] is None and one_gains["a"]["after_vs_before"]["std"] is None


def test_the_ablations_recall_ceiling_by_hand(tmp_path):
  """benchmarks/demo_ablation.py --ceiling: 6 validation pairs in finding groups of 3, 2 and 1. A perfect reader of
  the findings ranks its own group first, in random order: recall@1 = mean of 1/3, 1/3, 1/3, 1/2, 1/2, 1 = 1/2;
  recall@5 = 1. By diagnosis alone (groups of 5 and 1): recall@1 = (5 * 1/5 + 1) / 6 = 1/3."""
  import importlib.util
  script = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_ablation.py"
  spec = importlib.util.spec_from_file_location("demo_ablation", script)
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  data = tmp_path / "data" / "refinement"
  data.mkdir(parents=True)
  findings = [("amd", 1), ("amd", 1), ("amd", 1), ("amd", 0), ("amd", 0), ("dme", 0)]
  (data / "manifest_val.csv").write_text("image,report\n" + "".join(f"i{k}.png,r{k}\n" for k in range(6)))
  (data / "labels.csv").write_text("image,split,condition,drusen\n" + "".join(
      f"i{k}.png,val,{c},{d}\n" for k, (c, d) in enumerate(findings)) + "other.png,train,dme,1\n")
  out = ablation.ceiling(tmp_path)
  assert out["every labelled finding"]["groups"] == 3 and out["every labelled finding"]["largest"] == 3
  assert out["every labelled finding"]["recall_at_1"] == pytest.approx(0.5)
  assert out["every labelled finding"]["recall_at_5"] == 1.0
  assert out["the diagnosis alone"]["recall_at_1"] == pytest.approx(1 / 3)
