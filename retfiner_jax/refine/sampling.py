"""The random parts of the objectives, separate from the losses: token masks and ITM hard negatives (MAE's
patch masks are in mae/masking.py).

Everything is vectorised over the batch with `jax.random` and jittable: no Python loop over rows, no host
round trip. The losses (objectives.py) take the sampled views and negatives as explicit inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_LABEL = -100
MASK_ID = 103  # [MASK] in the uncased BERT vocabulary.
FIRST_RANDOM_ID = 106  # Random replacement ids are drawn from [106, vocab): past [PAD]/[unused]/[CLS]/[SEP]/[MASK].


def sample_token_masks(rng, input_ids, prob, vocab_size, mask_id=MASK_ID, first_random_id=FIRST_RANDOM_ID,
                       pad_id=0):
  """BERT-style masking as the original does it.

  Each position j >= 1 that is not padding is chosen with probability `prob`; a row with nothing chosen is
  redrawn until something is (a row with no eligible position stays unmasked). A chosen position becomes
  `mask_id` with probability 0.8, a uniform id in [first_random_id, vocab_size) with 0.1, and keeps its
  token with 0.1; its label is the original id, every other label is -100.
  Returns (masked_ids, labels), both shaped like `input_ids`.
  """
  shape = input_ids.shape
  positions = jnp.arange(shape[-1])
  eligible = (input_ids != pad_id) & (positions >= 1)
  can_choose = eligible.any(axis=-1)
  key_first, key_redraw, key_mode, key_random = jax.random.split(rng, 4)

  def draw(key):
    return jax.random.bernoulli(key, prob, shape) & eligible

  def needs_redraw(chosen):
    return can_choose & ~chosen.any(axis=-1)

  def redraw(state):
    chosen, key = state
    key, sub = jax.random.split(key)
    return jnp.where(needs_redraw(chosen)[:, None], draw(sub), chosen), key

  chosen, _ = jax.lax.while_loop(lambda s: needs_redraw(s[0]).any(), redraw, (draw(key_first), key_redraw))
  mode = jax.random.uniform(key_mode, shape)
  random_ids = jax.random.randint(key_random, shape, first_random_id, vocab_size, dtype=input_ids.dtype)
  replaced = jnp.where(mode < 0.8, jnp.asarray(mask_id, input_ids.dtype),
                       jnp.where(mode < 0.9, random_ids, input_ids))
  masked_ids = jnp.where(chosen, replaced, input_ids)
  labels = jnp.where(chosen, input_ids, IGNORE_LABEL)
  return masked_ids, labels


def sample_hard_negatives(rng, sim_i2t, sim_t2i, pair_ids=None, valid=None):
  """ITM hard negatives, drawn with probability proportional to softmax(similarity) + 1e-4.

  For text i an image j != i is drawn from row i of `sim_t2i`; for image i a text from row i of `sim_i2t`.
  With `pair_ids` (B,) every pair sharing the row's id is excluded too (the same image or report appearing
  twice in a batch is not a negative). A row whose every other pair shares its id falls back to excluding
  only itself; the count of such rows is returned so that it can be reported. With `valid` (B,) padding rows
  are never drawn (their own draws are meaningless and ignored by the losses).
  No gradient flows through the sampling. Returns (neg_image_idx, neg_text_idx, rows_without_distinct_id).
  """
  batch = sim_i2t.shape[0]
  if batch < 2:
    raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
  own = jnp.eye(batch, dtype=bool)
  excluded = own if pair_ids is None else (pair_ids[:, None] == pair_ids[None, :])
  if valid is not None:
    excluded = excluded | ~valid[None, :]
  no_other = ~(~excluded).any(axis=-1)
  excluded = jnp.where(no_other[:, None], own, excluded)

  def draw(key, sim):
    sim = jax.lax.stop_gradient(sim).astype(jnp.float32)
    if valid is not None:  # The softmax over the real pairs only, as if the batch held nothing else.
      sim = jnp.where(valid[None, :], sim, -jnp.inf)
    weights = jax.nn.softmax(sim, axis=-1) + 1e-4
    logits = jnp.where(excluded, -jnp.inf, jnp.log(weights))
    return jax.random.categorical(key, logits, axis=-1)

  key_image, key_text = jax.random.split(rng)
  counted = no_other if valid is None else no_other & valid
  return draw(key_image, sim_t2i), draw(key_text, sim_i2t), counted.sum()
