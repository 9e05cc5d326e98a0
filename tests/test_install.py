"""The project as an installed package: `pip install .` gives console scripts that find their configs by name
from any working directory."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_console_scripts_run_from_another_folder(tmp_path):
  source = tmp_path / "src"  # A copy, so that the build leaves nothing in the checkout.
  skipped = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache")
  top_level = {"runs", "tests", "docs"}  # Work folders and what the package does not ship (not retfiner_jax/runs).
  shutil.copytree(ROOT, source, ignore=lambda folder, names: set(skipped(folder, names)) | (
      top_level & set(names) if Path(folder) == ROOT else set()))
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                  str(target), str(source)], check=True, capture_output=True, timeout=300)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target))

  def run(script, *args):
    return subprocess.run([str(target / "bin" / script), *args], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
  for script in ("retfiner-check", "retfiner-convert"):
    out = run(script, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
  # Configs by name, from the installed package: the config loads (its check of log_every speaks).
  for config in ("retfound", "configs/visionfm.py", "urfound.py"):
    out = run("retfiner-train", f"--config={config}", "--workdir=w", "--config.train.log_every=0")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "error: config.train.log_every must be at least 1"), (config, out.stderr[-2000:])
  out = run("retfiner-probe", "--workdir=p")
  assert out.returncode == 2 and "give --config.encoder=PATH" in out.stderr, out.stderr[-2000:]
  out = run("retfiner-demo", "--config.demo.probe_cont=5")
  assert out.returncode == 2 and 'Did you mean "probe_count"' in out.stderr, out.stderr[-2000:]
  out = run("retfiner-mae", "--workdir=m")  # Its default config (mae_demo) found; it needs a manifest.
  assert out.returncode == 2 and "error: config.data.train_manifest is empty" in out.stderr, out.stderr[-2000:]


def _floor(requires_python: str) -> tuple:
  """The lowest Python a `Requires-Python` field admits, e.g. '>=3.11' -> (3, 11); () if it names none."""
  floors = [tuple(int(p) for p in spec.strip()[2:].strip().split(".")[:2])
            for spec in requires_python.split(",") if spec.strip().startswith(">=")]
  return max(floors, default=())


def test_the_declared_python_is_one_the_pinned_packages_install_on():
  """pyproject.toml's requires-python is no lower than any pinned runtime package's own floor, so that pip on an
  older Python stops at this project, by name, instead of failing to resolve a pin."""
  from importlib import metadata
  import re
  import tomllib
  declared = _floor(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
  assert declared, "pyproject.toml: requires-python names no lower bound"
  pins = re.findall(r"^([A-Za-z0-9_.-]+)==\S+", (ROOT / "requirements.txt").read_text(), flags=re.M)
  assert len(pins) >= 10, pins
  needs = {name: _floor(metadata.metadata(name).get("Requires-Python") or "") for name in pins}
  needs = {name: floor for name, floor in needs.items() if floor}
  assert needs, "no pinned package states its Python"
  higher = {name: floor for name, floor in needs.items() if floor > declared}
  assert not higher, f"pyproject.toml requires-python allows {declared}, but these pins need more: {higher}"
