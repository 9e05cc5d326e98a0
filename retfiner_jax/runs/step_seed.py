"""The run's seed (`config.seed`) as an input of its jitted train step, not a constant in the step's program: runs
that differ only in their seed lower to one program and share its compiled form and persistent-cache entry (the
demo's --seeds=N, a sweep over seeds). A key made from the traced int32 seed holds the same bits as one made from
the constant."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from retfiner_jax.errors import ConfigError
from retfiner_jax.runs import sharding


def checked(value) -> int:
  """`value` if it is an integer the step's int32 seed holds, else a ConfigError naming config.seed."""
  if isinstance(value, bool) or not isinstance(value, int) or not -2 ** 31 <= value < 2 ** 31:
    raise ConfigError(f"config.seed must be an integer from -2**31 to 2**31 - 1 (the step's int32 seed), got "
                      f"{value!r}")
  return value


def replicated_seed(mesh, value: int):
  """`value` as an int32 scalar replicated over the mesh (made by a jitted function, so that every process of a
  multi-host run holds the same global array)."""
  value = checked(value)
  return jax.jit(lambda: jnp.asarray(value, jnp.int32), out_shardings=sharding.replicated(mesh))()


def abstract_seed(mesh):
  """The step's seed argument as a ShapeDtypeStruct (replicated_seed), for lowering without arrays."""
  return jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
