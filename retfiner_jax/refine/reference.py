"""Reference bundles (computed by the original PyTorch code): loading them and checking this port against them.

A bundle folder holds `expected.json` (config, texts, losses), `model.ckpt` (RetFiner Lightning checkpoint),
`batch.npz` (batch, fixed masks and negatives), `grads.npz` and `intermediates.npz`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.refine.objectives import OBJECTIVES, ObjectiveSettings, compute_objectives
from retfiner_jax.weights import exports
from retfiner_jax.weights import files as weight_files

LOSS_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3


def load_bundle(folder, dtype="float32", log=lambda *a: None, scan_layers=True):
  """-> (model, params, batch, views, negatives, expected dict); layers scanned or unrolled as asked."""
  folder = Path(folder)
  for name in ("expected.json", "model.ckpt", "batch.npz"):
    if not (folder / name).exists():
      raise FileNotFoundError(f"{folder}: not a reference bundle (missing {name})")
  expected = json.loads((folder / "expected.json").read_text())
  cfg = ModelConfig.from_json(folder / "expected.json").replace(dtype=dtype, scan_layers=scan_layers)
  cfg, params, _ = weight_files.convert_checkpoint(folder / "model.ckpt", fmt="lightning", model_config=cfg, log=log)
  npz = np.load(folder / "batch.npz")
  batch = {"images": jnp.asarray(npz["images"].transpose(0, 2, 3, 1)),  # NCHW -> NHWC
           "input_ids": jnp.asarray(npz["input_ids"], jnp.int32),
           "attention_mask": jnp.asarray(npz["attention_mask"], jnp.int32)}
  views = {k: jnp.asarray(npz[k], jnp.int32) for k in ("mlm_input_ids", "mlm_labels", "gm_input_ids", "gm_labels")}
  negatives = (jnp.asarray(npz["neg_image_idx"], jnp.int32), jnp.asarray(npz["neg_text_idx"], jnp.int32))
  return RetFiner(cfg), jax.tree.map(jnp.asarray, params), batch, views, negatives, expected


def bundle_losses_and_grads(model, params, batch, views, negatives, settings=ObjectiveSettings()):
  def total(p):
    return compute_objectives(model, p, batch, views, settings, negatives=negatives)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
  return loss, metrics, grads


def gradient_group(torch_key: str) -> str:
  """A readable parameter group for a state_dict key (layer numbers kept, tensor names dropped)."""
  key = torch_key.removeprefix("model.").replace("multimodal_encoder.bert.", "bert.")
  key = key.replace("multimodal_encoder.", "")
  m = re.match(r"(vision_encoder\.blocks\.\d+|bert\.encoder\.layer\.\d+\.(attention|crossattention)|"
               r"bert\.encoder\.layer\.\d+|bert\.embeddings|cls\.predictions|vision_encoder|contra_head_[vt]|"
               r"itm_head)", key)
  return m.group(1) if m else key


def compare_gradients(cfg: ModelConfig, grads, reference: dict):
  """Relative error per reference gradient tensor, as the bundle README defines it.

  Returns {torch_key: relative error}. Raises if a reference gradient has no counterpart here; a parameter
  of ours without a reference gradient must have an all-zero gradient (it is unused by the original too).
  """
  ours = exports.lightning_state_dict(cfg, jax.tree.map(np.asarray, grads))
  ours.pop("model.multimodal_encoder.cls.predictions.decoder.weight", None)  # Tied: inside word_embeddings.
  ours.pop("model.multimodal_encoder.cls.predictions.decoder.bias", None)
  missing = sorted(set(reference) - set(ours))
  if missing:
    raise KeyError(f"reference gradients with no parameter here: {missing}")
  floor = 1e-4 * max(float(np.abs(g).max()) for g in reference.values())
  errors = {}
  for key, ref in reference.items():
    diff = np.abs(ours[key].astype(np.float64) - ref).max()
    errors[key] = float(diff / max(float(np.abs(ref).max()), floor))
  for key in sorted(set(ours) - set(reference)):
    errors[key] = float(np.abs(ours[key]).max() / floor)  # Should be exactly 0.
  return errors


def check_bundle(folder, log=print) -> bool:
  """Prints the comparison table; returns True when every loss and gradient is within tolerance."""
  folder = Path(folder)
  model, params, batch, views, negatives, expected = load_bundle(folder)
  loss, metrics, grads = bundle_losses_and_grads(model, params, batch, views, negatives)
  ok = True
  log(f"reference bundle {folder} (backbone {expected.get('backbone')})")
  log(f"{'loss':<8}{'expected':>16}{'ours':>16}{'rel. error':>12}")
  for name in OBJECTIVES + ("total",):
    want = expected["total"] if name == "total" else expected["losses"][name]
    got = float(metrics["loss" if name == "total" else f"loss_{name}"])
    rel = abs(got - want) / max(abs(want), 1e-12)
    bad = rel > LOSS_TOLERANCE
    ok &= not bad
    log(f"{name:<8}{want:>16.8f}{got:>16.8f}{rel:>12.2e}{'  FAIL' if bad else ''}")
  reference = dict(np.load(folder / "grads.npz"))
  errors = compare_gradients(model.cfg, grads, reference)
  groups: dict = {}
  for key, err in errors.items():
    g = gradient_group(key)
    groups[g] = max(groups.get(g, (0.0, key)), (err, key))
  log(f"\n{'gradient group':<44}{'worst rel. error':>18}  tensor")
  for g, (err, key) in sorted(groups.items()):
    bad = err > GRAD_TOLERANCE
    ok &= not bad
    log(f"{g:<44}{err:>18.2e}  {key.removeprefix('model.')}{'  FAIL' if bad else ''}")
  log(f"\n{len(errors)} gradient tensors compared; {'PASS' if ok else 'FAIL'} "
      f"(losses within {LOSS_TOLERANCE:g}, gradients within {GRAD_TOLERANCE:g})")
  return ok
