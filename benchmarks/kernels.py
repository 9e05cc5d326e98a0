"""Where a profiled step's time goes: the costliest kernels (or XLA ops) of a `jax.profiler` trace, per step.

  python benchmarks/kernels.py TRACE_DIR --steps 3 [--top 15] [--json]

TRACE_DIR is what `jax.profiler.trace(TRACE_DIR)` wrote (`benchmarks/step.py --profile TRACE_DIR` traces our
step). The newest `.xplane.pb` under it is read with `jax.profiler.ProfileData`. On a GPU or TPU the device
planes' "XLA Ops" lines are used (one event per HLO instruction run: fusions, cuBLAS calls, cuDNN's attention),
or, where a plane has none, its stream lines (one event per kernel). On the CPU, the events of XLA's client
threads, less the waits. Each event keeps its own time, less that of the events nested in it (a loop around its
kernels); these are summed by name and divided by the number of traced steps.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

# Host-thread events that are waiting or bookkeeping, not computation.
CPU_NOT_WORK = ("Await", "wait", "ThreadpoolListener", "end: ")


def newest_trace(trace_dir) -> Path:
  found = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f"{trace_dir}: no .xplane.pb under it (was it written by jax.profiler.trace?)")
  return found[-1]


def self_times(events):
  """(name, exclusive ns) of one line's events: events nest in time (a loop or a conditional around the kernels it
  runs, the CPU executor around each thunk), and each keeps only the time none of its children covers."""
  events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
  out, stack = [], []  # stack: [end_ns, index into out]
  for event in events:
    while stack and event.start_ns >= stack[-1][0]:
      stack.pop()
    if stack:
      out[stack[-1][1]][1] -= event.duration_ns
    out.append([event.name, event.duration_ns])
    stack.append([event.start_ns + event.duration_ns, len(out) - 1])
  return out


def kernel_totals(trace_file) -> tuple[str, dict[str, list[float]]]:
  """(what was read, {name: [total_ns, count]}) from one .xplane.pb."""
  import jax
  data = jax.profiler.ProfileData.from_file(str(trace_file))
  devices = [p for p in data.planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
  totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  if devices:
    source = "device planes' XLA Ops lines"
    for plane in devices:
      lines = [line for line in plane.lines if line.name == "XLA Ops"]
      if not lines:
        source = "device planes' stream lines"
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
      for line in lines:
        for name, ns in self_times(line.events):
          totals[name][0] += ns
          totals[name][1] += 1
    return source, dict(totals)
  source = "CPU client threads"
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if not line.name.startswith(("tf_XLAPjRtCpuClient", "tf_XLAEigen")):
        continue
      for name, ns in self_times(line.events):
        if any(word in name for word in CPU_NOT_WORK):
          continue
        totals[name][0] += ns
        totals[name][1] += 1
  return source, dict(totals)


def kernel_table(trace_dir, steps: int, top: int = 15) -> dict:
  """The `top` costliest names, per step: milliseconds, share of all traced kernel time, runs per step."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  trace_file = newest_trace(trace_dir)
  source, totals = kernel_totals(trace_file)
  if not totals:
    raise ValueError(f"{trace_file}: no kernel events in the {source}")
  all_ns = sum(t for t, _ in totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
  rows = [{"name": name, "ms_per_step": t / steps / 1e6, "share": t / all_ns, "runs_per_step": n / steps}
          for name, (t, n) in ranked]
  return {"trace": str(trace_file), "source": source, "steps": steps, "kernel_ms_per_step": all_ns / steps / 1e6,
          "kernels": len(totals), "top": rows}


def profiled_kernels(run_step, trace_dir, steps: int, top: int = 15) -> dict:
  """Traces `steps` calls of `run_step` into `trace_dir` and returns the kernel table as a "kernels" JSON record, or,
  where tracing or reading the trace fails (the trace's layout differs between backends and JAX versions), a record
  naming the error and the trace: a benchmark's timing and memory figures are not lost to its profile."""
  try:
    import jax
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(steps):
        run_step()
    return {"phase": "kernels", **kernel_table(trace_dir, steps, top)}
  except Exception as e:  # Reported in the record, never silent.
    return {"phase": "kernels", "error": f"{type(e).__name__}: {e}"[:500], "trace": str(trace_dir), "steps": steps}


def markdown(table: dict) -> str:
  lines = [f"{table['kernels']} kernels, {table['kernel_ms_per_step']:.2f} ms of kernel time per step "
           f"({table['source']}, {table['steps']} steps)", "",
           "| # | kernel / op | ms per step | share | runs per step |", "| --- | --- | --- | --- | --- |"]
  for i, row in enumerate(table["top"], 1):
    lines.append(f"| {i} | `{row['name'][:90]}` | {row['ms_per_step']:.3f} | {100 * row['share']:.1f} % | "
                 f"{row['runs_per_step']:g} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir")
  parser.add_argument("--steps", type=int, required=True, help="how many steps the trace holds")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", action="store_true", help="one JSON line instead of the markdown table")
  args = parser.parse_args()
  table = kernel_table(args.trace_dir, args.steps, args.top)
  print(json.dumps(table) if args.json else markdown(table))


if __name__ == "__main__":
  main()
