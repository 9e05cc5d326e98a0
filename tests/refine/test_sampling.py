"""Statistics of the MLM/GM masks and of the ITM hard negatives, over many draws, against hand computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retfiner_jax.refine.sampling import MASK_ID, sample_hard_negatives, sample_token_masks

VOCAB = 30522


def _ids(rows=3000, length=30, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, rows)  # [CLS] + at least one token.
  ids = rng.integers(1000, 2000, (rows, length))  # Never 103 or in the special range.
  ids[:, 0] = 101
  ids[np.arange(length)[None] >= lengths[:, None]] = 0
  return jnp.asarray(ids, jnp.int32), lengths


@pytest.mark.parametrize("prob", [0.15, 0.6])
def test_mask_rates_and_replacement_split(prob):
  ids, lengths = _ids()
  masked, labels = jax.jit(sample_token_masks, static_argnums=(2, 3))(jax.random.PRNGKey(0), ids, prob, VOCAB)
  masked, labels, ids = map(np.asarray, (masked, labels, ids))
  chosen = labels != -100
  assert not chosen[:, 0].any()  # [CLS] never.
  assert not chosen[ids == 0].any()  # Padding never.
  assert chosen.any(axis=1).all()  # At least one per row.
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
  # Expected count per row given at least one: n p / (1 - (1 - p)^n), n = eligible positions.
  n = lengths - 1
  expected = (n * prob / (1 - (1 - prob) ** n)).sum()
  assert abs(chosen.sum() - expected) / expected < 0.02
  total = chosen.sum()
  to_mask = (masked[chosen] == MASK_ID).mean()
  kept = (masked[chosen] == ids[chosen]).mean()
  randomised = chosen & (masked != MASK_ID) & (masked != ids)
  assert abs(to_mask - 0.8) < 4 * np.sqrt(0.16 / total) + 1e-3
  assert abs(kept - 0.1) < 4 * np.sqrt(0.09 / total) + 1e-3
  assert abs(randomised.sum() / total - 0.1) < 4 * np.sqrt(0.09 / total) + 1e-3
  assert masked[randomised].min() >= 106 and masked[randomised].max() < VOCAB


def test_rows_without_candidates_stay_unmasked():
  ids = jnp.array([[101, 0, 0, 0], [101, 2000, 102, 0]], jnp.int32)
  for seed in range(20):
    _, labels = sample_token_masks(jax.random.PRNGKey(seed), ids, 0.15, VOCAB)
    assert (np.asarray(labels[0]) == -100).all()
    assert (np.asarray(labels[1]) != -100).any()


def _draw(sims, pair_ids=None, draws=4000):
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  fn = jax.jit(jax.vmap(lambda k: sample_hard_negatives(k, sims, sims.T, pair_ids)))
  return jax.tree.map(np.asarray, fn(keys))


def test_negatives_follow_softmax_and_skip_the_own_pair():
  batch = 6
  sims = jax.random.normal(jax.random.PRNGKey(1), (batch, batch)) * 3
  neg_image, neg_text, no_distinct = _draw(sims)
  assert (no_distinct == 0).all()
  for i in range(batch):
    assert not (neg_image[:, i] == i).any() and not (neg_text[:, i] == i).any()
    # For text i: weights from row i of sim_t2i (= sims.T here), diagonal removed.
    weights = np.asarray(jax.nn.softmax(sims.T[i])) + 1e-4
    weights[i] = 0
    want = weights / weights.sum()
    got = np.bincount(neg_image[:, i], minlength=batch) / len(neg_image)
    np.testing.assert_allclose(got, want, atol=0.03)


def test_negatives_exclude_pairs_with_the_same_id():
  sims = jnp.zeros((5, 5))
  pair_ids = jnp.array([7, 7, 8, 9, 9])
  neg_image, neg_text, _ = _draw(sims, pair_ids, draws=500)
  ids = np.asarray(pair_ids)
  for i in range(5):
    assert (ids[neg_image[:, i]] != ids[i]).all() and (ids[neg_text[:, i]] != ids[i]).all()
  # A batch where every pair shares the id falls back to "not itself" and reports it.
  neg_image, _, no_distinct = _draw(jnp.zeros((3, 3)), jnp.array([1, 1, 1]), draws=50)
  assert (no_distinct == 3).all() and all((neg_image[:, i] != i).all() for i in range(3))
