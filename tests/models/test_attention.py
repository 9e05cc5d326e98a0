"""The one attention function's two kernels (config.model.attention): the fused call computes what the XLA path
computes, and the choice is resolved per platform with no silent fallback.

On this CPU the fused call runs through jax.nn.dot_product_attention's XLA implementation: the same layout,
scaling, odd-length padding and sequence-length masks that the cuDNN kernel is given on a GPU. Both are compared
with PyTorch's scaled_dot_product_attention. That the h200 program holds cuDNN's kernel is tests/refine/test_aot.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import configs
from retfiner_jax.config_defaults import tiny_model
from retfiner_jax.errors import ConfigError
from retfiner_jax.models.attention import attention, fused_attention, resolve_attention
from retfiner_jax.refine.step import model_config, objective_settings, sharded_train_step
from retfiner_jax.runs import sharding


def torch_attention(q, k, v):
  """PyTorch's reference on (B, L, H, d) arrays, in float32."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32)).transpose(1, 2)
  return torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v)).transpose(1, 2).numpy()


@pytest.mark.parametrize("q_len,kv_len", [(197, 197), (196, 196), (30, 197), (31, 50)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_call_computes_what_the_xla_path_and_torch_compute(q_len, kv_len, dtype):
  keys = jax.random.split(jax.random.PRNGKey(q_len + kv_len), 4)
  q = jax.random.normal(keys[0], (2, q_len, 4, 16), dtype)
  k, v = (jax.random.normal(x, (2, kv_len, 4, 16), dtype) for x in keys[1:3])
  want = torch_attention(q, k, v)
  ours, fused = attention(q, k, v), fused_attention(q, k, v, kernel="xla")
  assert ours.shape == fused.shape == q.shape and fused.dtype == q.dtype
  # bfloat16: both round the probabilities to bf16 before weighting the values (8 bits of mantissa).
  tol = 2e-6 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(fused, np.float32), want, atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(ours, np.float32), want, atol=tol, rtol=tol)
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(ours, np.float32), atol=tol, rtol=tol)
  # The gradients the backward pass takes (cotangent: fixed random weights on the outputs).
  weights = jax.random.normal(keys[3], q.shape, jnp.float32)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * weights), argnums=(0, 1, 2))(q, k, v)
           for f in (attention, lambda *a: fused_attention(*a, kernel="xla"))]
  for a, b in zip(*grads):
    scale = float(jnp.max(jnp.abs(a.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=tol * max(scale, 1.0))


def test_an_unmasked_padding_key_would_change_the_result():
  """The odd-length padding is masked: attending a zero key as well (what an unmasked pad would do) differs."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 5, 2, 8)) for i in range(3))
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0)))
  unmasked = attention(pad(q), pad(k), pad(v))[:, :5]
  assert float(jnp.max(jnp.abs(unmasked - attention(q, k, v)))) > 1e-3
  np.testing.assert_allclose(fused_attention(q, k, v, kernel="xla"), attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_softmax_that_names_its_residuals_is_jaxs_bit_for_bit(dtype):
  """attention.softmax_keeping_probs against jax.nn.softmax (JAX's default derivative, which the reference bundles
  were matched with): the same probabilities and the same gradients, to the bit, with masked (-1e9) scores too;
  compiled as the step compiles it."""
  from retfiner_jax.models.attention import MASKED, softmax_keeping_probs
  keys = jax.random.split(jax.random.PRNGKey(7), 2)
  scores = jax.random.normal(keys[0], (2, 3, 5, 7), jnp.float32) * 4
  scores = scores.at[:, :, :, -2:].add(MASKED).astype(dtype).astype(jnp.float32)
  weights = jax.random.normal(keys[1], scores.shape, jnp.float32)
  results = [jax.jit(jax.value_and_grad(lambda s: jnp.sum(f(s) * weights)))(scores)
             for f in (lambda s: jax.nn.softmax(s, axis=-1), softmax_keeping_probs)]
  (want_value, want_grad), (value, grad) = results
  np.testing.assert_array_equal(np.asarray(value), np.asarray(want_value))
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad))
  np.testing.assert_array_equal(np.asarray(jax.jit(softmax_keeping_probs)(scores)),
                                np.asarray(jax.jit(lambda s: jax.nn.softmax(s, axis=-1))(scores)))


def test_the_choice_is_resolved_per_platform_and_dtype():
  assert resolve_attention("auto", "cpu", "bfloat16") == "xla"
  assert resolve_attention("auto", "cpu", "float32") == "xla"  # The reference bundles' path.
  assert resolve_attention("auto", "tpu", "bfloat16") == "xla"
  assert resolve_attention("auto", "gpu", "bfloat16") == "fused"
  assert resolve_attention("auto", "cuda", "bfloat16") == "fused"
  assert resolve_attention("auto", "gpu", "float32") == "xla"  # cuDNN's kernel takes no float32.
  assert resolve_attention("xla", "gpu", "bfloat16") == "xla"
  assert resolve_attention("fused", "gpu", "bfloat16") == "fused"
  for platform, dtype in (("cpu", "bfloat16"), ("tpu", "bfloat16"), ("gpu", "float32")):
    with pytest.raises(ValueError, match="config.model.attention='fused'.*use 'auto' or 'xla'"):
      resolve_attention("fused", platform, dtype)
  with pytest.raises(ValueError, match="must be one of"):
    resolve_attention("flash", "gpu", "bfloat16")


def test_a_run_asking_for_fused_attention_on_cpu_is_refused_before_anything_runs():
  config = tiny_model(configs.load("retfound"))
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  built = sharded_train_step(config, model_config(config), objective_settings(config), mesh)
  assert built.model.cfg.attention == "xla"  # 'auto' on CPU.
  with config.unlocked():
    config.model.attention = "fused"
  with pytest.raises(ConfigError, match="config.model.attention='fused'"):
    sharded_train_step(config, model_config(config), objective_settings(config), mesh)
  with config.unlocked():
    config.model.attention = "cudnn"
  with pytest.raises(ValueError, match="attention must be one of"):
    model_config(config)
