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
import dataclasses
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
    return _pick(rng, ["subfoveal", "at the fovea", "centrally"])
  side = "nasal" if centre < 0.5 else "temporal"
  if abs(centre - 0.5) < 0.18:
    return _pick(rng, ["parafoveal", "juxtafoveal", f"{side} parafoveal", f"just {side} to the fovea"])
  return _pick(rng, [side, f"{side} to the fovea", "extrafoveal", f"{side} macula"])


@dataclasses.dataclass(frozen=True)
class Site:
  """How a site's device acquires B-scans: the tilt of the retina across the scan (its range, as a fraction of
  the height per width), the speckle's gamma shape (lower = stronger speckle), the display's contrast gamma, the
  lateral blur (half-width in columns at 256 columns: coarser lateral resolution) and the noise floor."""
  tilt: tuple = (-0.08, 0.08)
  speckle_shape: float = 4.0
  contrast_gamma: float = 1.0
  lateral_blur: int = 0
  noise_floor: float = 0.04


# The demo's two sites: the clinic whose image-report pairs refine the FM, and the one whose labelled scans the
# probe uses (another device: tilted scans, stronger speckle, a brighter display, coarser lateral resolution).
SITES = {"clinic": Site(),
         "probe": Site(tilt=(0.02, 0.16), speckle_shape=2.5, contrast_gamma=0.85, lateral_blur=1, noise_floor=0.05)}


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


def render(lab: dict, rng: np.random.Generator, height=256, width=256, site: Site = Site()) -> np.ndarray:
  """The B-scan of the given findings as uint8 (height, width), as `site` acquires it."""
  s = height / 256.0
  x = np.linspace(0, 1, width)
  rows = np.arange(height)[:, None].astype(np.float32)
  size_of = {"small": 0.6, "medium": 1.0, "large": 1.5}
  fovea = 0.5 + rng.normal(0, 0.03)
  base = height * rng.uniform(0.28, 0.36)
  ilm = (base + height * rng.uniform(0.0, 0.25) * (x - 0.5) ** 2 + height * rng.uniform(*site.tilt) * (x - 0.5)
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
  image *= rng.gamma(site.speckle_shape, 1 / site.speckle_shape, image.shape)
  image += np.abs(rng.normal(0, site.noise_floor, image.shape))
  image = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0)) / 3
  blur = int(round(site.lateral_blur * width / 256))
  if blur:
    image = sum(np.roll(image, k, 1) for k in range(-blur, blur + 1)) / (2 * blur + 1)
  image *= rng.uniform(0.85, 1.15)
  return (np.clip(image, 0, 1) ** site.contrast_gamma * 255).astype(np.uint8)


# How reports are written. Real reports are incomplete, hedged and varied, so a report does not determine the
# probe's labels: the demo measures how much it does (`report_coupling.py`) and prints it.
OMIT_PROBABILITY = {"small": 0.35, "medium": 0.15, "large": 0.05}  # A present finding left out of the report.
HEDGE_PROBABILITY = {"small": 0.4, "medium": 0.1, "large": 0.0}  # A reported finding hedged ("possible ...").
FALSE_MENTION_PROBABILITY = 0.03  # Per absent finding: a hedged mention of it ("... cannot be excluded").
RESOLVED_PROBABILITY = 0.04  # Per absent finding: "resolved since the last visit".
COMPARISON_PROBABILITY = 0.25  # A reported finding compared with an earlier visit.
IMPRESSION_PROBABILITY = 0.4  # The condition named in a closing impression.

_TERMS = {  # Synonyms and abbreviations of each finding.
    "drusen": ["drusen", "drusenoid deposits", "sub-RPE deposits", "drusenoid PED"],
    "ped": ["PED", "pigment epithelial detachment", "RPE detachment", "serous PED", "fibrovascular PED"],
    "cysts": ["IRF", "intraretinal fluid", "intraretinal cysts", "cystoid spaces", "CMO", "cystoid macular oedema"],
    "srf": ["SRF", "subretinal fluid", "neurosensory detachment", "fluid under the neurosensory retina"],
    "erm": ["ERM", "epiretinal membrane", "epiretinal gliosis", "macular pucker"],
    "hole": ["FTMH", "full-thickness macular hole", "macular hole", "full thickness hole"],
    "ga": ["GA", "geographic atrophy", "RPE atrophy", "cRORA", "outer retinal atrophy with hypertransmission"],
    "thinning": ["inner retinal thinning", "thin RNFL", "GCL thinning", "generalised retinal thinning",
                 "reduced RNFL thickness"],
}
_NEGATED_TERMS = {"thinning": ["retinal thinning", "RNFL thinning", "GCL thinning"]}  # Where "no <term>" reads oddly.
_SIZE_WORDS = {"small": ["small", "trace", "minimal", "subtle", "tiny"], "medium": ["moderate", "medium", "some"],
               "large": ["large", "extensive", "marked", "significant"]}
_PRESENT = ["{size} {term} {where}", "{term} {where}, {size}", "there is {size} {term} {where}", "{term} noted {where}",
            "{term} seen {where}"]
_HEDGED = ["possible {size} {term} {where}", "{size} {term} {where} cannot be excluded", "questionable {term} {where}",
           "suspicious for {term} {where}", "?{term} {where}"]
_COMPARED = ["{term} {where}, {trend} compared with the previous visit", "{trend} {term} {where} since the last scan",
             "{term} {where} {trend} from prior"]
_TRENDS = ["stable", "unchanged", "increased", "decreased", "slightly reduced", "new"]
_ABSENT = ["no {term}", "no evidence of {term}", "{term} absent", "no {term} seen"]
_FALSE_MENTION = ["{term} cannot be excluded", "possible {term}", "questionable {term}"]
_RESOLVED = ["{term} resolved since the last visit", "previous {term} has resolved", "no residual {term}"]
_NORMAL = ["normal foveal contour", "normal retinal layers", "unremarkable macula", "preserved foveal depression",
           "normal OCT of the macula", "macula within normal limits", "no pathology seen", "retinal layers intact"]
_FILLER = ["good quality scan", "signal strength 8/10", "signal strength 6/10, mild media opacity", "fixation central",
           "vitreous clear", "posterior vitreous detachment", "follow-up in 3 months", "scan centred on the fovea",
           "mild vitreous floaters", "review with fundus photographs", "compared with the scan of last year",
           "patient cooperative", "dilated pupils"]
_IMPRESSIONS = {"normal": ["normal macula", "no abnormality detected"],
                "dry_amd": ["dry AMD", "non-neovascular AMD", "intermediate AMD", "early AMD"],
                "wet_amd": ["nAMD", "neovascular AMD", "wet AMD", "active CNV"],
                "dme": ["DME", "DMO", "diabetic macular oedema"], "erm": ["ERM", "epiretinal membrane"],
                "hole": ["FTMH", "macular hole"], "glaucoma": ["glaucomatous thinning", "glaucoma suspect"]}
_IMPRESSION_FORMS = ["impression: {x}", "consistent with {x}", "findings in keeping with {x}", "diagnosis: {x}"]

# Zero-shot prompts for the tasks' classes, in the reports' own vocabulary (the demo's zero-shot row).
ZERO_SHOT_PROMPTS = {
    "fluid": {"fluid": ["subretinal fluid", "intraretinal fluid", "SRF", "IRF", "cystoid macular oedema"],
              "no_fluid": ["no subretinal fluid", "no intraretinal fluid", "normal foveal contour"]},
    "drusen": {"drusen": ["drusen", "drusenoid deposits", "sub-RPE deposits"],
               "no_drusen": ["no drusen", "normal foveal contour"]},
    "diagnosis": {"dme": ["intraretinal fluid", "cystoid macular oedema", "DME"],
                  "dry_amd": ["drusen", "drusenoid deposits", "geographic atrophy", "dry AMD"],
                  "erm": ["epiretinal membrane", "ERM", "macular pucker"],
                  "glaucoma": ["inner retinal thinning", "thin RNFL", "glaucomatous thinning"],
                  "hole": ["full-thickness macular hole", "macular hole", "FTMH"],
                  "normal": list(_NORMAL),
                  "wet_amd": ["pigment epithelial detachment", "subretinal fluid", "PED", "neovascular AMD"]},
}


def _sentence(text: str) -> str:
  text = " ".join(text.split()).replace(" ,", ",")
  return text[0].upper() + text[1:] + "."


def _pick(rng, options) -> str:
  return str(options[rng.integers(len(options))])


def write_report(lab: dict, rng: np.random.Generator) -> str:
  """A report of the findings in `lab`, written as clinicians write them: a present finding is left out with
  OMIT_PROBABILITY (small ones more often) and hedged with HEDGE_PROBABILITY; findings are named by synonyms and
  abbreviations, sometimes against an earlier visit; absent findings are sometimes negated, rarely mentioned as
  possible or resolved; normal templates, sentences that carry no finding, and a closing impression that names
  the condition with IMPRESSION_PROBABILITY."""
  sentences = []
  present = [f for f in FINDINGS if lab[f]]
  for f in rng.permutation(present):
    size = lab[f + "_size"]
    if rng.random() < OMIT_PROBABILITY[size]:
      continue
    words = {"term": _pick(rng, _TERMS[f]), "size": _pick(rng, _SIZE_WORDS[size]),
             "where": _side(rng, lab[f + "_centre"]) if rng.random() < 0.7 else "", "trend": _pick(rng, _TRENDS)}
    if rng.random() < HEDGE_PROBABILITY[size]:
      form = _HEDGED
    elif rng.random() < COMPARISON_PROBABILITY:
      form = _COMPARED
    else:
      form = _PRESENT
    sentences.append(_sentence(_pick(rng, form).format(**words)))
  if not sentences:
    sentences.append(_sentence(_pick(rng, _NORMAL)))
  absent = [f for f in FINDINGS if not lab[f]]
  for f in rng.permutation(absent):
    u, term = rng.random(), _pick(rng, _NEGATED_TERMS.get(f, _TERMS[f]))
    if u < FALSE_MENTION_PROBABILITY:
      sentences.append(_sentence(_pick(rng, _FALSE_MENTION).format(term=term)))
    elif u < FALSE_MENTION_PROBABILITY + RESOLVED_PROBABILITY:
      sentences.append(_sentence(_pick(rng, _RESOLVED).format(term=term)))
    elif u < 0.25:
      sentences.append(_sentence(_pick(rng, _ABSENT).format(term=term)))
  for _ in range(int(rng.integers(0, 3))):
    sentences.insert(int(rng.integers(len(sentences) + 1)), _sentence(_pick(rng, _FILLER)))
  if rng.random() < IMPRESSION_PROBABILITY:
    sentences.append(_sentence(_pick(rng, _IMPRESSION_FORMS).format(x=_pick(rng, _IMPRESSIONS[lab["condition"]]))))
  return " ".join(sentences)


def make_example(seed: int, index: int, height=256, width=256, site: str = "clinic"):
  """Image `index` of the corpus of (`seed`, `site`): (uint8 B-scan, report, labels)."""
  if site not in SITES:
    raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")
  rng = np.random.default_rng([seed, index] if site == "clinic" else [seed, list(SITES).index(site), index])
  lab = sample_labels(rng)
  return render(lab, rng, height, width, SITES[site]), write_report(lab, rng), lab


def _assign_split(rng, fractions) -> str:
  u = rng.random()
  return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")


def _write_chunk(args):
  out, seed, start, stop, height, width, site, fractions = args
  from PIL import Image
  prefix = "" if site == "clinic" else f"{site}_"  # Another site's patients, ids and files are its own.
  rows = []
  for i in range(start, stop):
    image, report, lab = make_example(seed, i, height, width, site)
    name = f"images/{prefix}oct_{i:06d}.png"
    Image.fromarray(image).save(out / name, compress_level=1)
    patient = i // 2  # Two eyes per patient; the split is per patient.
    split = _assign_split(np.random.default_rng([seed, 10 ** 9 + patient]), fractions)
    rows.append({"image": name, "report": report, "id": f"{prefix}oct_{i:06d}", "patient": f"{prefix}p{patient:05d}",
                 "eye": "OD" if i % 2 == 0 else "OS", "split": split, **{k: lab.get(k) for k in
                 ["condition", *FINDINGS]}})
  return rows


def generate(out, count=2000, seed=0, height=256, width=256, workers=None, log=print, site: str = "clinic",
             splits=(0.7, 0.15, 0.15)) -> Path:
  """Writes the corpus of `site` (SITES) under `out` (see the module docstring), patients split into train, val
  and test by the fractions `splits`. Returns the manifest path."""
  out = Path(out)
  if site not in SITES:
    raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")
  if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
    raise ValueError(f"splits must be three fractions (train, val, test) that sum to 1, got {splits}")
  (out / "images").mkdir(parents=True, exist_ok=True)
  workers = workers or min(os.cpu_count() or 1, 8)
  chunks = [(out, seed, a, min(a + 100, count), height, width, site, tuple(splits)) for a in range(0, count, 100)]
  start, rows = time.time(), []
  # spawn, not fork: the caller may have JAX's threads running. One worker: in this process (no pool to start,
  # so it also runs from a script without a __main__ guard).
  pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
  try:
    for k, chunk_rows in enumerate((pool.map if pool else map)(_write_chunk, chunks), 1):
      rows += chunk_rows
      if k % 5 == 0 or k == len(chunks):
        log(f"synthetic OCT: {len(rows)}/{count} images ({time.time() - start:.1f} s)")
  finally:
    if pool:
      pool.shutdown()
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
  (out / "DONE").write_text(f"count={count} seed={seed} size={height}x{width} site={site} splits={tuple(splits)}\n")
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
  p.add_argument("--site", default="clinic", choices=list(SITES), help="the acquisition (synthetic.SITES)")
  p.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                 help="fractions of patients in each split")
  a = p.parse_args(argv)
  generate(a.out, a.count, a.seed, a.height, a.width, a.workers, site=a.site, splits=tuple(a.splits))


if __name__ == "__main__":
  main()
