"""The text tower's pretraining objectives: unsupervised SimCSE on the [CLS] output (Gao et al. 2021: the same
report through the encoder twice, with dropout as the only noise, is its own positive; the batch's other reports
are the negatives) beside BERT's masked language modelling (masks from refine/sampling.py)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from retfiner_jax.models.retfiner import RetFiner, l2_normalize
from retfiner_jax.refine.objectives import token_prediction_losses
from retfiner_jax.refine.sampling import sample_token_masks


@dataclasses.dataclass(frozen=True)
class TextPretrainSettings:
  sentence_weight: float = 1.0  # SimCSE on [CLS]; 0 switches it off (MLM alone, which issue 34 found collapsed).
  mlm_weight: float = 1.0
  mlm_probability: float = 0.15
  temperature: float = 0.05  # SimCSE's.


def sentence_contrastive_loss(first, second, input_ids, temperature):
  """SimCSE's loss between two dropout views of the same rows, both ways. A row whose tokens equal another row's
  (the same report twice in a batch) is not that row's negative. Returns (loss, accuracy of view 1 -> 2)."""
  a, b = l2_normalize(first), l2_normalize(second)
  same_text = jnp.all(input_ids[:, None, :] == input_ids[None, :, :], axis=-1) & ~jnp.eye(len(a), dtype=bool)
  logits = jnp.where(same_text, -1e9, a @ b.T / temperature)
  targets = jnp.arange(len(a))
  loss = (optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
          + optax.softmax_cross_entropy_with_integer_labels(logits.T, targets).mean()) / 2
  return loss, (logits.argmax(-1) == targets).mean()


def make_loss_fn(model: RetFiner, settings: TextPretrainSettings):
  """(text_params, batch, rng) -> (loss, metrics): the text encoder's parameters alone (the passes touch nothing
  else of the model)."""
  def loss_fn(text_params, batch, rng):
    key_mask, key_a, key_b, key_c = jax.random.split(rng, 4)
    params = {"text_encoder": text_params}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    metrics, total = {}, 0.0
    if settings.sentence_weight:
      view = lambda key, tokens: model.apply({"params": params}, tokens, mask, True, rngs={"dropout": key},
                                             method=RetFiner.text_only)[:, 0]
      loss, accuracy = sentence_contrastive_loss(view(key_a, ids), view(key_b, ids), ids, settings.temperature)
      total += settings.sentence_weight * loss
      metrics.update(loss_sentence=loss, sentence_accuracy=accuracy)
    if settings.mlm_weight:
      masked, labels = sample_token_masks(key_mask, ids, settings.mlm_probability, model.cfg.vocab_size)
      m = model.bind({"params": params}, rngs={"dropout": key_c})
      hidden = m.text_only(masked, mask, True)
      ((loss, accuracy),) = token_prediction_losses(m.mlm_logits, [(hidden, labels, 1.0)])
      total += settings.mlm_weight * loss
      metrics.update(loss_mlm=loss, mlm_accuracy=accuracy)
    metrics["loss"] = total
    return total, metrics
  return loss_fn
