"""The jitted training step: all objectives, gradients (accumulated over micro-batches), the AdamW update."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from retfiner_jax.models.retfiner import RetFiner
from retfiner_jax.objectives import ObjectiveSettings, make_loss_fn


def make_optimizer(config):
  t = config.train
  return optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)


def make_train_step(model: RetFiner, settings: ObjectiveSettings, tx, seed: int, micro_batches: int):
  loss_fn = make_loss_fn(model, settings)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  base_key = jax.random.PRNGKey(seed)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_key, state["step"])
    params = state["params"]
    if micro_batches == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
    else:
      # Micro-batch i takes rows i, i + m, ...: every micro-batch stays spread over all devices.
      split = jax.tree.map(lambda x: x.reshape((-1, micro_batches) + x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(carry, inputs):
        micro, index = inputs
        (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (split, jnp.arange(micro_batches)))
      grads, metrics = jax.tree.map(lambda x: x / micro_batches, (grads, metrics))
    updates, opt = tx.update(grads, state["opt"], params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return {"params": optax.apply_updates(params, updates), "opt": opt, "step": state["step"] + 1}, metrics

  return train_step
