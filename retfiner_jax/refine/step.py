"""The jitted training step: all objectives, gradients (accumulated over micro-batches), the AdamW update; and
the step as a run compiles it, sharded over a mesh (`sharded_train_step`: the trainer and the AOT tool share it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from retfiner_jax.data.pipeline import train_batch_shapes
from retfiner_jax.errors import ConfigError
from retfiner_jax.models.attention import resolve_attention
from retfiner_jax.models.common import resolve_remat
from retfiner_jax.models.config import ModelConfig
from retfiner_jax.models.retfiner import SCANNED_STACKS, RetFiner
from retfiner_jax.refine.objectives import OBJECTIVES, ObjectiveSettings, make_loss_fn, sample_views
from retfiner_jax.refine.sampling import IGNORE_LABEL
from retfiner_jax.runs import sharding, step_seed
from retfiner_jax.weights import files as weight_files


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict(), source="config.model")


def objective_settings(config) -> ObjectiveSettings:
  return ObjectiveSettings(**config.train.objectives)


def make_optimizer(config):
  t = config.train
  return optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)


def accumulated_gradients(loss_fn, params, batch, rng, micro_batches: int, views):
  """Gradients and metrics of a batch split into `micro_batches` (rows i, i + m, ...: every micro-batch stays
  spread over all devices), accumulated so that MLM and GM equal the full batch's: each micro-batch's token
  losses are weighted by its share of the batch's target tokens (`views`: the batch's masks, sampled once).
  ITC and ITM (contrastive softmax, hard negatives) see each micro-batch and are averaged over them."""
  split = lambda tree: jax.tree.map(lambda x: x.reshape((-1, micro_batches) + x.shape[1:]).swapaxes(0, 1), tree)
  micro_batch, micro_views = split(batch), split(views)
  targets = {k: (micro_views[f"{k}_labels"] != IGNORE_LABEL).sum(axis=(1, 2)) for k in ("mlm", "gm")}
  shares = {k: n / jnp.maximum(n.sum(), 1) for k, n in targets.items()}
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def scales(index):
    return {"itc": 1.0 / micro_batches, "itm": 1.0 / micro_batches, "mlm": shares["mlm"][index],
            "gm": shares["gm"][index]}

  def one(index, micro, micro_view):
    scale = scales(index)
    (_, m), g = grad_fn(params, micro, jax.random.fold_in(rng, index), micro_view, scale)
    # Every metric as a mean over micro-batches, except the token losses, weighted as in the gradient.
    weight = {f"loss_{k}": v for k, v in scale.items()}
    m = {k: v * weight.get(k, 1.0 / micro_batches) for k, v in m.items()}
    return g, m

  def accumulate(carry, inputs):
    return jax.tree.map(jnp.add, carry, one(*inputs)), None

  shapes = jax.eval_shape(one, 0, *jax.tree.map(lambda x: x[0], (micro_batch, micro_views)))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro_batches), micro_batch, micro_views))
  return grads, metrics  # metrics["loss"] is left to the caller, who knows the objectives' weights.


# The step's random bits (dropout, drop-path, MLM/GM masks, ITM negatives): `config.train.prng`.
PRNG_CHOICES = ("auto", "threefry", "rbg", "unsafe_rbg")


def prng_impl(choice: str, platform: str) -> str:
  """JAX's key implementation for the train step. auto: threefry on CPU (the reference bundles' and every earlier
  run's streams), rbg on GPU and TPU, where threefry's counter hash costs thousands of instructions inlined in the
  step and rbg uses the hardware's bit generator. A run repeats exactly only with the same setting."""
  if choice not in PRNG_CHOICES:
    raise ConfigError(f"config.train.prng must be one of {PRNG_CHOICES}, got {choice!r}")
  if choice == "auto":
    return "threefry2x32" if platform == "cpu" else "rbg"
  return {"threefry": "threefry2x32"}.get(choice, choice)


def make_train_step(model: RetFiner, settings: ObjectiveSettings, tx, micro_batches: int,
                    prng: str = "threefry2x32", token_groups: int = 1):
  """(state, batch, seed) -> (state, metrics); `seed`: the run's seed (config.seed) as an int32 scalar, an input
  rather than a constant, so that one compiled program (and the persistent compilation cache's entry) serves every
  seed. `token_groups`: the devices the batch is sharded over (make_loss_fn)."""
  loss_fn = make_loss_fn(model, settings, train=True, token_groups=token_groups)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch, seed):
    # threefry as a raw key: the streams of every earlier run (the same bits as from a constant seed).
    base_key = jax.random.PRNGKey(seed) if prng == "threefry2x32" else jax.random.key(seed, impl=prng)
    batch = dict(batch)
    stop = batch.pop("stop", None)  # Several processes: which of them were signalled (trainer.train_loop).
    rng = jax.random.fold_in(base_key, state["step"])
    params = state["params"]
    if micro_batches == 1:
      (_, metrics), grads = grad_fn(params, batch, rng)
    else:
      views = sample_views(jax.random.fold_in(rng, micro_batches), batch["input_ids"], model.cfg.vocab_size,
                           settings)
      grads, metrics = accumulated_gradients(loss_fn, params, batch, rng, micro_batches, views)
      metrics["loss"] = sum(settings.weight(k) * metrics[f"loss_{k}"] for k in OBJECTIVES if settings.enabled(k))
    updates, opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    # Checked before any checkpoint is written: a finite loss can still give non-finite parameters.
    # One scalar: any inf or NaN makes the sum non-finite. (A check per tensor cost XLA:CPU ~5 s of compile time
    # at ViT-L: benchmarks/README.md.)
    finite = jnp.isfinite(sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(new_params)))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), params_finite=finite.astype(jnp.float32))
    if stop is not None:
      metrics["stop_requested"] = jnp.max(stop).astype(jnp.float32)
    return {"params": new_params, "opt": opt, "step": state["step"] + 1}, metrics

  return train_step


def init_state(tx, params) -> dict:
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


@dataclasses.dataclass
class ShardedStep:
  """The train step as a run compiles it: its model and optimizer, the state's shapes and shardings, and the
  jitted step (state donated; batch sharded over the mesh's batch axes; metrics replicated)."""
  model: RetFiner
  tx: Any
  mesh: Any
  prng: str  # The step's key implementation (prng_impl).
  abstract_params: Any
  param_shardings: Any
  abstract_state: Any
  state_shardings: Any
  step_fn: Callable  # (state, batch, seed) -> (state, metrics)

  def init_state(self, params):
    return init_state(self.tx, params)

  def seed(self, value: int):
    """The step's `seed` argument (runs/step_seed.py): `value` as an int32 scalar replicated over the mesh."""
    return step_seed.replicated_seed(self.mesh, value)

  def abstract_args(self, batch_size: int, text_length: int, image_size: int, several_processes: bool = False,
                    image_dtype: str = "float32"):
    """ShapeDtypeStructs of (state, global batch, seed), with their shardings: what `step_fn.lower` takes to
    compile the step without any array."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state,
                         self.state_shardings)
    return (state, abstract_batch(self.mesh, batch_size, text_length, image_size, several_processes, image_dtype),
            step_seed.abstract_seed(self.mesh))


def abstract_batch(mesh, batch_size: int, text_length: int, image_size: int, several_processes: bool = False,
                   image_dtype: str = "float32") -> dict:
  """The global training batch as ShapeDtypeStructs sharded over the batch axes (what the pipeline will give)."""
  batch_sh = sharding.batch_sharding(mesh)
  shapes = train_batch_shapes(batch_size, image_size, text_length, several_processes, image_dtype)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}


def check_batch_divides(config, mesh):
  if config.train.batch_size % (mesh.size * config.train.micro_batches):
    raise ConfigError(f"config.train.batch_size {config.train.batch_size} must be divisible by the {mesh.size} "
                      f"devices times config.train.micro_batches {config.train.micro_batches}")


def sharded_train_step(config, cfg: ModelConfig, settings: ObjectiveSettings, mesh) -> ShardedStep:
  """config (its train block: optimizer, micro-batches) + model config + mesh -> the ShardedStep. Nothing is
  computed: the parameters are shapes. The seed is the step's argument (ShardedStep.seed(config.seed))."""
  platform = mesh.devices.flat[0].platform
  cfg = cfg.replace(attention=resolve_attention(cfg.attention, platform, cfg.dtype),  # ConfigError: bad values.
                    remat=resolve_remat(cfg.remat, platform))
  model, tx = RetFiner(cfg), make_optimizer(config)
  prng = prng_impl(config.train.prng, platform)
  abstract_params = weight_files.abstract_params(cfg)
  param_sh = sharding.tree_shardings(mesh, abstract_params, SCANNED_STACKS)
  abstract_state = jax.eval_shape(lambda p: init_state(tx, p), abstract_params)
  state_sh = sharding.tree_shardings(mesh, abstract_state, SCANNED_STACKS)
  step_fn = jax.jit(sharding.traced_on(mesh, make_train_step(model, settings, tx, config.train.micro_batches, prng,
                                                              token_groups=sharding.batch_shards(mesh))),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  return ShardedStep(model, tx, mesh, prng, abstract_params, param_sh, abstract_state, state_sh, step_fn)
