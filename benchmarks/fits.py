"""Where each FM's shipped config fits: `python -m retfiner_jax.aot --fit` for every FM x target, at the shipped
global batch (128), one process per compile; JSON lines to --out as they come, then the README's table.

  python benchmarks/fits.py --out benchmarks/fits.jsonl [--fms retfound,visionfm,urfound] [--targets v5e-8,...]
  python benchmarks/fits.py --table benchmarks/fits.jsonl      (the markdown table of a finished run)

The compilers come from requirements-aot.txt, installed beside the environment in .aot-compilers/ (the README's
test command does that); this script puts that folder on the aot command's PYTHONPATH.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"v5e-8": "--topology=v5e:2x4", "v5p-8": "--topology=v5p:2x2x1", "v6e-8": "--topology=v6e:2x4",
           "v4-8": "--topology=v4:2x2x1", "1xH100": "--target=h100", "1xH200": "--target=h200",
           "8xH100": "--target=8xh100"}
FMS = ("retfound", "visionfm", "urfound")
COMPILERS = ROOT / ".aot-compilers"
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join(p for p in (str(COMPILERS), os.environ.get("PYTHONPATH", "")) if p))


def run(fms, names, out: Path):
  with out.open("a") as f:
    for fm in fms:
      for name in names:
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "retfiner_jax.aot", f"--config={fm}", TARGETS[name], "--fit"],
                              cwd=ROOT, capture_output=True, text=True, env=ENV)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        record = json.loads(lines[-1]) if lines else {"error": proc.stderr[-1500:]}
        record.update(fm=fm, target_name=name, exit_status=proc.returncode, wall_s=round(time.time() - started, 1))
        f.write(json.dumps(record) + "\n")
        f.flush()
        print(fm, name, proc.returncode, record.get("rung"), record.get("gib_per_device"), flush=True)


def table(path: Path) -> str:
  rows = ["| FM | target | settings that fit (first of the --fit ladder) | GiB per device (of) | est. s/step at 50 / 40 % MFU "
          "| compile s (of that setting) | tried |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for line in path.read_text().splitlines():
    r = json.loads(line)
    if "gib_per_device" not in r:
      rows.append(f"| {r['fm']} | {r['target_name']} | error: {r.get('error', '')[:80]} | | | | |")
      continue
    g, est = r["gib_per_device"], r.get("step_s_estimate") or {}
    fits = "as shipped" if r.get("rung") == "as configured" else r.get("rung", "?")
    if not r["fits"]:
      fits = "none of the ladder"
    total = f"{g['total']:.1f}" if g["total"] is not None else "?"
    tried = "; ".join(f"{t['rung']}: {'fits' if t['fits'] else 'no'}" for t in r.get("tried", []))
    rows.append(f"| {r['fm']} | {r['target_name']} | {fits} | {total} ({g['capacity']:.1f}) | "
                f"{est.get('at_50_mfu', float('nan')):.3f} / {est.get('at_40_mfu', float('nan')):.3f} | "
                f"{r['compile_s']:.0f} | {tried} |")
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", type=Path)
  p.add_argument("--table", type=Path)
  p.add_argument("--fms", default=",".join(FMS))
  p.add_argument("--targets", default=",".join(TARGETS))
  a = p.parse_args()
  if a.table:
    print(table(a.table))
  elif a.out:
    run(a.fms.split(","), a.targets.split(","), a.out)
  else:
    p.error("give --out (run) or --table (print)")


if __name__ == "__main__":
  main()
