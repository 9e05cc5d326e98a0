"""The run configs, one module each (`get_config()`): retfound, visionfm, urfound (refinement), demo, probe.

`load(name)` returns a config by its module name; `NAMES` lists every module here, so tests iterate over them
all without a hand-kept list.
"""
import importlib
from pathlib import Path

NAMES = tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_")))


def load(name: str):
  if name not in NAMES:
    raise ValueError(f"no config {name!r} in {Path(__file__).parent}; known: {', '.join(NAMES)}")
  return importlib.import_module(f"{__name__}.{name}").get_config()
