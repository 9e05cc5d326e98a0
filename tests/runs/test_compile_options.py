"""The XLA options the train step is compiled with (runs/compile_options.py): which platforms and JAX versions get
them, that this JAX's XLA knows them, and that the AOT tool passes them (main's: its log line, checked in
tests/refine/test_train.py)."""
import types

import jax
import jax.numpy as jnp
import pytest

from retfiner_jax.refine import aot
from retfiner_jax.runs import compile_options


def _device(platform):
  return types.SimpleNamespace(platform=platform)


def test_the_elemental_cpu_emitters_up_to_jax_0_10_and_nothing_after_or_elsewhere():
  assert compile_options.cpu_emitter_option_exists((0, 10, 2))
  assert compile_options.cpu_emitter_option_exists((0, 9, 0))
  assert not compile_options.cpu_emitter_option_exists((0, 11, 0))
  assert not compile_options.cpu_emitter_option_exists((1, 0, 0))
  assert compile_options.for_train_step([_device("gpu")]) == {}
  assert compile_options.for_train_step([_device("tpu")]) == {}
  expected = compile_options.ELEMENTAL_CPU_FUSION_EMITTERS if jax.__version_info__ < (0, 11) else {}
  assert compile_options.for_train_step(jax.devices("cpu")) == expected
  # The AOT tool compiles a CPU target's step with what main uses, and a GPU target's with its own options too.
  assert aot.compiler_options(jax.devices("cpu")) == expected
  assert aot.compiler_options([_device("cuda")])["xla_gpu_enable_triton_gemm"] is False


def test_this_jaxs_xla_knows_the_options_it_is_given():
  """XLA refuses an option it does not have (so a JAX that dropped the emitter option while the version check
  still chose it fails here), and compiles with the ones for_train_step gives; the results agree with the default
  emitters' to float32 rounding."""
  fn = jax.jit(lambda x: jnp.tanh(x) * jax.nn.gelu(x) + jnp.exp(-x * x))
  x = jnp.linspace(-3.0, 3.0, 4096, dtype=jnp.float32)
  lowered = fn.lower(x)
  with pytest.raises(Exception, match="xla_cpu_no_such_option"):
    lowered.compile({"xla_cpu_no_such_option": False})
  options = compile_options.for_train_step(jax.devices("cpu"))
  if not options:
    pytest.skip(f"JAX {jax.__version__}: no CPU compile options to check")
  shipped = lowered.compile(options)(x)
  default = lowered.compile()(x)
  assert jnp.allclose(shipped, default, rtol=1e-5, atol=1e-6)


def test_described_options_for_the_log():
  assert compile_options.described({}) == ""
  assert compile_options.described({"b": 1, "a": False}) == " (XLA options: a=False, b=1)"
