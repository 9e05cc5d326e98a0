"""A synthetic corpus of OCT B-scans with reports: the project's demo data and a ground truth for experiments.

Each B-scan is drawn from a layered retina model — vitreous, ILM, RNFL, GCL, IPL, INL, OPL, ONL, ELM,
ellipsoid zone, interdigitation zone, RPE/Bruch, choroid, sclera — with a foveal pit, curvature, tilt,
depth attenuation and multiplicative speckle. A condition (normal, dry AMD, neovascular AMD, DME, epiretinal
membrane, macular hole, glaucomatous thinning) decides which findings are drawn, each with a location and a
size: drusen, pigment epithelial detachment, intraretinal cysts, subretinal fluid, epiretinal membrane,
macular hole, geographic atrophy with hypertransmission, retinal thinning. A report is written from the
findings with varied phrasing, including negations ("no subretinal fluid").

    python -m retfiner_jax.data.synthetic --out data/synthetic --count 2000 --seed 0

writes images/*.png, manifest.csv (image, report, id, patient, eye, split), labels.csv (every finding per
image) and ImageFolder tasks tasks/<task>/{train,val,test}/<class>/*.png for the linear probe. Deterministic
by seed: image i depends only on (seed, i).
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

FINDINGS = ("drusen", "ped", "cysts", "srf", "erm", "hole", "ga", "thinning")
CONDITIONS = {  # condition: (probability, findings always present, findings present with probability 0.4)
    "normal": (0.30, (), ()),
    "dry_amd": (0.16, ("drusen",), ("ga",)),
    "wet_amd": (0.12, ("ped", "srf"), ("cysts", "drusen")),
    "dme": (0.14, ("cysts",), ("srf",)),
    "erm": (0.10, ("erm",), ("cysts",)),
    "hole": (0.08, ("hole",), ("erm",)),
    "glaucoma": (0.10, ("thinning",), ()),
}
TASKS = {  # ImageFolder tasks derived from the labels, for the linear probe.
    "diagnosis": lambda lab: lab["condition"],
    "fluid": lambda lab: "fluid" if (lab["cysts"] or lab["srf"]) else "no_fluid",
    "drusen": lambda lab: "drusen" if lab["drusen"] else "no_drusen",
}

# Layers below the ILM: (name, thickness in pixels at 256 rows, reflectivity).
LAYERS = (("rnfl", 7, 0.78), ("gcl", 9, 0.42), ("ipl", 7, 0.55), ("inl", 7, 0.28), ("opl", 5, 0.58),
          ("onl", 14, 0.18), ("elm", 1.5, 0.55), ("myoid", 3, 0.25), ("ez", 2.5, 0.85), ("iz", 2.5, 0.35),
          ("rpe", 4, 0.97))


def _side(rng, centre):
  if abs(centre - 0.5) < 0.06:
    return "subfoveal"
  if abs(centre - 0.5) < 0.18:
    return rng.choice(["parafoveal", f"{'nasal' if centre < 0.5 else 'temporal'} parafoveal"])
  return "nasal" if centre < 0.5 else "temporal"


def sample_labels(rng: np.random.Generator) -> dict:
  names = list(CONDITIONS)
  condition = names[rng.choice(len(names), p=[CONDITIONS[c][0] for c in names])]
  _, always, maybe = CONDITIONS[condition]
  lab = {"condition": condition, **{f: (f in always) or (f in maybe and rng.random() < 0.4) for f in FINDINGS}}
  for f in FINDINGS:
    if lab[f]:
      centre = 0.5 + rng.normal(0, 0.12) if f not in ("hole",) else 0.5
      lab[f + "_centre"] = float(np.clip(centre, 0.15, 0.85))
      lab[f + "_size"] = str(rng.choice(["small", "medium", "large"], p=[0.35, 0.4, 0.25]))
  return lab


def render(lab: dict, rng: np.random.Generator, height=256, width=256) -> np.ndarray:
  """The B-scan of the given findings as uint8 (height, width)."""
  s = height / 256.0
  x = np.linspace(0, 1, width)
  rows = np.arange(height)[:, None].astype(np.float32)
  size_of = {"small": 0.6, "medium": 1.0, "large": 1.5}
  fovea = 0.5 + rng.normal(0, 0.03)
  base = height * rng.uniform(0.28, 0.36)
  ilm = (base + height * rng.uniform(0.0, 0.25) * (x - 0.5) ** 2 + height * rng.uniform(-0.08, 0.08) * (x - 0.5)
         + height * 0.04 * np.sin(2 * np.pi * (x * rng.uniform(0.3, 0.8) + rng.random())) * 0.3)
  pit = np.exp(-((x - fovea) / 0.07) ** 2)
  thin_factor = 0.55 if lab["thinning"] else 1.0
  thick = {name: np.full(width, t * s) for name, t, _ in LAYERS}
  thick["rnfl"] = thick["rnfl"] * thin_factor * (1 + 0.9 * np.clip((0.5 - x) * 2.5, 0, 1)) * (1 - 0.9 * pit)
  thick["gcl"] = thick["gcl"] * thin_factor * (1 + 0.4 * np.exp(-((x - fovea) / 0.18) ** 2)) * (1 - 0.95 * pit)
  thick["ipl"] = thick["ipl"] * (1 - 0.9 * pit)
  thick["inl"] = thick["inl"] * (1 - 0.85 * pit)
  thick["opl"] = thick["opl"] * (1 - 0.6 * pit)
  thick["onl"] = thick["onl"] * (1 + 0.5 * pit)
  if lab["erm"]:
    thickening = 1 + 0.5 * size_of[lab["erm_size"]] * np.exp(-((x - lab["erm_centre"]) / 0.25) ** 2)
    for n in ("gcl", "ipl", "inl", "onl"):
      thick[n] = thick[n] * thickening
  # The RPE line, raised by drusen and PED; everything above it is stacked from the RPE upwards.
  # The RPE follows the eye's curvature; the retina is stacked on it, so thinner inner layers at the fovea
  # make the foveal pit.
  rpe_top_normal = ilm + sum(t for _, t, _ in LAYERS[:-1]) * s * thin_factor ** 0.5 + height * 0.05
  rpe_lift = np.zeros(width)
  drusen_mask = np.zeros(width)
  if lab["drusen"]:
    for _ in range(int(rng.integers(2, 6) * size_of[lab["drusen_size"]]) + 1):
      c = lab["drusen_centre"] + rng.normal(0, 0.08)
      w = rng.uniform(0.012, 0.03) * size_of[lab["drusen_size"]]
      bump = height * rng.uniform(0.012, 0.03) * size_of[lab["drusen_size"]] * np.exp(-((x - c) / w) ** 2)
      rpe_lift += bump
      drusen_mask = np.maximum(drusen_mask, bump)
  ped_mask = np.zeros(width)
  if lab["ped"]:
    w = 0.06 * size_of[lab["ped_size"]]
    dome = height * 0.07 * size_of[lab["ped_size"]] * np.sqrt(np.clip(1 - ((x - lab["ped_centre"]) / w) ** 2, 0, 1))
    rpe_lift += dome
    ped_mask = dome
  srf = np.zeros(width)
  if lab["srf"]:
    w = 0.08 * size_of[lab["srf_size"]]
    srf = height * 0.05 * size_of[lab["srf_size"]] * np.clip(1 - ((x - lab["srf_centre"]) / w) ** 2, 0, 1) ** 1.5
  rpe_top = rpe_top_normal - rpe_lift
  top = rpe_top - srf - sum(thick[n] for n, _, _ in LAYERS[:-1])  # The ILM, pushed up by what lies below.

  image = np.zeros((height, width), np.float32)
  bounds = top.copy()
  edges = {}
  for name, _, refl in LAYERS[:-1]:
    lower = bounds + thick[name]
    edges[name] = (bounds, lower)
    image += refl * ((rows >= bounds) & (rows < lower))
    bounds = lower
    if name == "iz":  # Subretinal fluid between the photoreceptors and the RPE.
      bounds = bounds + srf
  rpe_lower = rpe_top + thick["rpe"]
  image += LAYERS[-1][2] * ((rows >= rpe_top) & (rows < rpe_lower))
  # Sub-RPE: drusen material (medium), PED (dark), Bruch's membrane at the unlifted position.
  bruch = rpe_top_normal + thick["rpe"]
  under = (rows >= rpe_lower) & (rows < bruch)
  image += under * np.where(ped_mask > drusen_mask, 0.06, 0.45)
  choroid_top = bruch
  choroid = (rows >= choroid_top) & (rows < choroid_top + height * 0.12)
  vessels = (0.5 + 0.25 * np.sin(rows / (3 * s) + rng.random() * 6)
             * np.sin(np.arange(width) / (5 * s) + rng.random() * 6))
  hyper = np.zeros(width)
  if lab["ga"]:
    w = 0.05 * size_of[lab["ga_size"]]
    ga = np.abs(x - lab["ga_centre"]) < w
    image[:, ga] *= np.where((rows >= edges["ez"][0]) & (rows < rpe_lower), 0.25, 1.0)[:, ga]
    hyper = ga * 0.45
  image += choroid * (vessels * 0.55 + hyper)
  image += (rows >= choroid_top + height * 0.12) * (0.12 + hyper * 0.5)
  # Intraretinal cysts: dark ovals in the INL / ONL.
  if lab["cysts"]:
    n = int(rng.integers(2, 5) * size_of[lab["cysts_size"]]) + 1
    for _ in range(n):
      c = lab["cysts_centre"] + rng.normal(0, 0.06)
      col = int(np.clip(c, 0, 0.999) * width)
      layer = edges["inl" if rng.random() < 0.5 else "onl"]
      cy = (layer[0][col] + layer[1][col]) / 2
      ry = max(2.0, (layer[1][col] - layer[0][col])) * rng.uniform(0.5, 1.0) * size_of[lab["cysts_size"]]
      rx = width * rng.uniform(0.012, 0.03) * size_of[lab["cysts_size"]]
      oval = ((rows - cy) / ry) ** 2 + ((np.arange(width) - col) / rx) ** 2 < 1
      image[oval] = 0.05
  if lab["erm"]:
    wavy = top - 1.5 * s + 1.2 * s * np.sin(np.arange(width) / (4 * s))
    span = np.abs(x - lab["erm_centre"]) < 0.3 * size_of[lab["erm_size"]]
    image[(np.abs(rows - wavy) < 1.0 * s) & span] = 0.95
  if lab["hole"]:
    w = 0.035 * size_of[lab["hole_size"]]
    hole_cols = np.abs(x - lab["hole_centre"]) < w * (1 + 0.5 * np.clip((rows - top) / (rpe_top - top + 1e-6), 0, 1))
    image[(rows >= top - 1) & (rows < rpe_top) & hole_cols] = 0.04
  # Depth attenuation below the ILM, speckle, noise floor, mild blur along depth.
  depth = np.clip(rows - top, 0, None)
  image *= np.exp(-depth / (height * rng.uniform(0.5, 0.8)))
  image *= rng.gamma(4.0, 1 / 4.0, image.shape)
  image += np.abs(rng.normal(0, 0.04, image.shape))
  image = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0)) / 3
  image *= rng.uniform(0.85, 1.15)
  return (np.clip(image, 0, 1) * 255).astype(np.uint8)


_PHRASES = {
    "drusen": ["{size} drusen {where}", "{size} drusenoid deposits {where}", "drusen ({size}) {where}"],
    "ped": ["{size} pigment epithelial detachment {where}", "{size} PED {where}", "RPE detachment {where}, {size}"],
    "cysts": ["intraretinal cysts {where}", "{size} intraretinal cystoid spaces {where}",
              "cystoid macular edema {where}"],
    "srf": ["subretinal fluid {where}", "{size} amount of subretinal fluid {where}", "SRF present {where}"],
    "erm": ["epiretinal membrane with retinal thickening", "{size} epiretinal membrane {where}", "ERM {where}"],
    "hole": ["full-thickness macular hole", "{size} full-thickness macular hole at the fovea", "macular hole present"],
    "ga": ["geographic atrophy {where} with hypertransmission", "{size} area of RPE atrophy {where}",
           "outer retinal atrophy {where} with choroidal hypertransmission"],
    "thinning": ["diffuse thinning of the inner retina", "thin retinal nerve fibre layer",
                 "generalised retinal thinning"],
}
_NEGATIONS = {"srf": ["no subretinal fluid", "no SRF"], "cysts": ["no intraretinal fluid", "no cysts"],
              "drusen": ["no drusen"], "ped": ["no PED"], "erm": ["no epiretinal membrane"],
              "hole": ["no macular hole"], "ga": ["no atrophy"], "thinning": ["normal retinal thickness"]}
_NORMAL = ["normal foveal contour", "normal retinal layers", "unremarkable macula", "preserved foveal depression",
           "normal OCT of the macula"]

# Zero-shot prompts for the tasks' classes, in the reports' own phrasing (the demo's zero-shot row).
ZERO_SHOT_PROMPTS = {
    "fluid": {"fluid": ["subretinal fluid", "intraretinal cysts", "cystoid macular edema", "SRF present"],
              "no_fluid": ["no subretinal fluid", "no intraretinal fluid", "normal foveal contour"]},
    "drusen": {"drusen": ["drusen", "drusenoid deposits"], "no_drusen": ["no drusen", "normal foveal contour"]},
    "diagnosis": {"dme": ["intraretinal cysts", "cystoid macular edema"],
                  "dry_amd": ["drusen", "drusenoid deposits", "geographic atrophy"],
                  "erm": ["epiretinal membrane with retinal thickening", "ERM"],
                  "glaucoma": ["diffuse thinning of the inner retina", "thin retinal nerve fibre layer"],
                  "hole": ["full-thickness macular hole", "macular hole present"],
                  "normal": list(_NORMAL),
                  "wet_amd": ["pigment epithelial detachment", "subretinal fluid", "PED"]},
}


def write_report(lab: dict, rng: np.random.Generator) -> str:
  parts = []
  present = [f for f in FINDINGS if lab[f]]
  rng.shuffle(present)
  for f in present:
    phrase = str(rng.choice(_PHRASES[f]))
    parts.append(phrase.format(size=lab[f + "_size"], where=_side(rng, lab[f + "_centre"])).strip())
  if not present:
    parts.append(str(rng.choice(_NORMAL)))
  absent = [f for f in FINDINGS if not lab[f]]
  for f in rng.permutation(absent)[: rng.integers(0, 3)]:
    parts.append(str(rng.choice(_NEGATIONS[f])))
  text = ", ".join(parts)
  return text if rng.random() < 0.5 else text.replace(", ", "; ", 1)


def make_example(seed: int, index: int, height=256, width=256):
  rng = np.random.default_rng([seed, index])
  lab = sample_labels(rng)
  return render(lab, rng, height, width), write_report(lab, rng), lab


def _assign_split(rng) -> str:
  u = rng.random()
  return "train" if u < 0.7 else ("val" if u < 0.85 else "test")


def _write_chunk(args):
  out, seed, start, stop, height, width = args
  from PIL import Image
  rows = []
  for i in range(start, stop):
    image, report, lab = make_example(seed, i, height, width)
    name = f"images/oct_{i:06d}.png"
    Image.fromarray(image).save(out / name, compress_level=1)
    patient = i // 2  # Two eyes per patient; the split is per patient.
    split = _assign_split(np.random.default_rng([seed, 10 ** 9 + patient]))
    rows.append({"image": name, "report": report, "id": f"oct_{i:06d}", "patient": f"p{patient:05d}",
                 "eye": "OD" if i % 2 == 0 else "OS", "split": split, **{k: lab.get(k) for k in
                 ["condition", *FINDINGS]}})
  return rows


def generate(out, count=2000, seed=0, height=256, width=256, workers=None, log=print) -> Path:
  """Writes the corpus under `out` (see the module docstring). Returns the manifest path."""
  out = Path(out)
  (out / "images").mkdir(parents=True, exist_ok=True)
  workers = workers or min(os.cpu_count() or 1, 8)
  chunks = [(out, seed, a, min(a + 100, count), height, width) for a in range(0, count, 100)]
  start, rows = time.time(), []
  # spawn, not fork: the caller may have JAX's threads running.
  with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    for k, chunk_rows in enumerate(pool.map(_write_chunk, chunks), 1):
      rows += chunk_rows
      if k % 5 == 0 or k == len(chunks):
        log(f"synthetic OCT: {len(rows)}/{count} images ({time.time() - start:.1f} s)")
  with (out / "manifest.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "report", "id", "patient", "eye", "split"])
    w.writeheader()
    w.writerows({k: r[k] for k in w.fieldnames} for r in rows)
  with (out / "labels.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["image", "split", "condition", *FINDINGS])
    w.writeheader()
    w.writerows({k: (int(r[k]) if isinstance(r[k], bool) else r[k]) for k in w.fieldnames} for r in rows)
  for split in ("train", "val", "test"):
    part = [r for r in rows if r["split"] == split]
    with (out / f"manifest_{split}.csv").open("w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["image", "report", "id", "patient", "eye", "split"])
      w.writeheader()
      w.writerows({k: r[k] for k in w.fieldnames} for r in part)
  for task, label_of in TASKS.items():
    for r in rows:
      target = out / "tasks" / task / r["split"] / label_of(r) / Path(r["image"]).name
      target.parent.mkdir(parents=True, exist_ok=True)
      if not target.exists():
        try:
          os.link(out / r["image"], target)
        except OSError:
          target.write_bytes((out / r["image"]).read_bytes())
  (out / "DONE").write_text(f"count={count} seed={seed} size={height}x{width}\n")
  log(f"synthetic OCT: wrote {count} images, manifest.csv, labels.csv and tasks {list(TASKS)} under {out} "
      f"in {time.time() - start:.1f} s")
  return out / "manifest.csv"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--count", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--workers", type=int, default=None)
  a = p.parse_args(argv)
  generate(a.out, a.count, a.seed, a.height, a.width, a.workers)


if __name__ == "__main__":
  main()
