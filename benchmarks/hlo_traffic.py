"""Where an optimised XLA program moves its bytes: memory traffic and matmul FLOPs per kernel, read from the text.

  python benchmarks/hlo_traffic.py PROGRAM.hlo[.gz] [--top 25] [--json]
      [--peak-tflops 989 --memory-tbps 4.8 [--model-tflop 63.984]]

PROGRAM is XLA's optimised program as text: what `python -m retfiner_jax.aot ... --hlo=FILE` writes, or the
`*after_optimizations.txt` of `XLA_FLAGS=--xla_dump_to=DIR`. No device is needed, so it describes the GPU program
of a step on a machine without a GPU. It counts, for every kernel the program launches (fusions, library calls,
copies), the bytes it reads and writes in device memory and, for matrix products, their FLOPs; kernels inside a
loop count once per iteration (XLA's known trip count), and of a conditional's branches the costliest is counted
(an upper bound). What it does not know: caches, overlap, how fast each kernel runs. These are bytes and FLOPs,
not times; the time of each kernel is the profile's (`benchmarks/kernels.py`, on the hardware).

Accounting, per kernel:
- read: every operand's size, except that a (dynamic-)slice, or a fusion operand used only by (dynamic-)slices
  inside the fusion, counts the slices' sizes (a scan's layer reading its slice of a stacked weight or residual);
- written: every output's size, except that a fusion whose result is a dynamic-update-slice into one of its
  operands writes only the update, in place (a scan's layer saving its residual), and that operand is not read;
- FLOPs: 2 x (output elements) x (contracted size) for each dot or cuBLAS matmul, inside a fusion or not.
  cuDNN's fused attention is counted in bytes only (its FLOPs are not in the program's text).

With the chip's peak rates it adds a bound: kernels run one at a time (XLA's GPU programs run their kernels on one
stream, except those launched asynchronously: fusion-start and the like), each taking at least its FLOPs at the
peak and its bytes at the bandwidth; and the same bound with the asynchronous ones left out, as if they overlapped
the rest perfectly.

The report groups kernels by class (matmul, fused attention, other fusions, copies) and by where they come from:
the forward or backward pass (an op name under `transpose(` is the backward) of each part of the model (the op
name's module path), and lists the kernels with the most traffic.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

BYTES_PER_ELEMENT = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                     "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                     "c128": 16}
ARRAY = re.compile(r"\b(" + "|".join(sorted(BYTES_PER_ELEMENT, key=len, reverse=True)) + r")\[([0-9,]*)\]")
# `%name = SHAPE opcode(operands), attributes`; SHAPE may be a tuple.
INSTRUCTION = re.compile(r"^\s+(ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*?)\)(, .*)?$")
OPERAND = re.compile(r"%([\w.\-]+)(?:#(\d+))?")
# Instructions that launch nothing: they name, group or alias buffers.
NO_KERNEL = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id",
             "replica-id", "opt-barrier", "add-dependency", "async-done", "fusion-done", "copy-done",
             "all-reduce-done", "all-gather-done", "collective-permute-done", "send-done", "recv-done"}
MATMUL_TARGETS = ("matmul", "gemm")  # cuBLAS custom-call targets: __cublas$lt$matmul, __cublas$gemm


def array_bytes(shape: str) -> int:
  """Bytes of every array in a shape string (a tuple's elements summed)."""
  total = 0
  for dtype, dims in ARRAY.findall(shape):
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += int(count * BYTES_PER_ELEMENT[dtype])
  return total


def array_dims(shape: str) -> list[int]:
  found = ARRAY.search(shape)
  return [int(d) for d in filter(None, found.group(2).split(","))] if found else []


def tuple_elements(shape: str) -> list[str]:
  """A tuple shape's top-level elements; a plain array shape is its own one element."""
  shape = re.sub(r"/\*.*?\*/", "", shape).strip()
  if not shape.startswith("("):
    return [shape]
  inner, parts, depth, current = shape[1:shape.rindex(")")], [], 0, ""
  for ch in inner:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(current.strip())
      current = ""
    else:
      current += ch
  return parts + ([current.strip()] if current.strip() else [])


class Program:
  """The computations of an HLO module's text, each a list of instruction dicts."""

  def __init__(self, text: str):
    self.computations: dict[str, list[dict]] = {}
    self.entry = None
    current = None
    for line in text.splitlines():
      if line.startswith("ENTRY ") or (line.startswith("%") and line.rstrip().endswith("{")):
        current = line.split()[1 if line.startswith("ENTRY ") else 0].lstrip("%")
        self.computations[current] = []
        if line.startswith("ENTRY "):
          self.entry = current
        continue
      found = INSTRUCTION.match(line) if current else None
      if found:
        root, name, shape, opcode, operands, attributes = found.groups()
        self.computations[current].append(dict(
            root=bool(root), name=name, shape=shape, opcode=opcode, attributes=attributes or "",
            operands=OPERAND.findall(operands), line=line))
    if self.entry is None:
      raise ValueError("no ENTRY computation: is this XLA's HLO text (e.g. `aot --hlo=FILE`)?")
    self.shapes = {c: {i["name"]: i["shape"] for i in body} for c, body in self.computations.items()}

  def operand_shape(self, computation: str, operand: tuple[str, str]) -> str:
    name, index = operand
    shape = self.shapes[computation].get(name, "")
    return tuple_elements(shape)[int(index)] if index else shape

  def called(self, instruction: dict, key: str) -> list[str]:
    found = re.search(key + r"=\{?([^}]*?)\}?(?:, [a-z_]+=|$)", instruction["attributes"])
    return [n for n in re.findall(r"%([\w.\-]+)", found.group(1)) if n in self.computations] if found else []


def matmul_flops(program: Program, computation: str, instruction: dict) -> int:
  out = 1
  for d in array_dims(tuple_elements(instruction["shape"])[0]):
    out *= d
  lhs = array_dims(program.operand_shape(computation, instruction["operands"][0]))
  text = instruction["line"]
  found = (re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", text)
           or re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', text))
  contracted = 1
  for d in re.findall(r"\d+", found.group(1)) if found else []:
    contracted *= lhs[int(d)]
  return 2 * out * contracted


def is_matmul(instruction: dict) -> bool:
  if instruction["opcode"] == "dot":
    return True
  target = re.search(r'custom_call_target="([^"]+)"', instruction["attributes"])
  return bool(instruction["opcode"] == "custom-call" and target and "cublas" in target.group(1)
              and any(t in target.group(1) for t in MATMUL_TARGETS))


def fusion_traffic(program: Program, fused: str) -> tuple[int, int, int]:
  """(read, written, flops) of one launch of a fusion whose body is `fused` (accounting: the module docstring)."""
  body = program.computations[fused]
  users = collections.defaultdict(list)
  for instruction in body:
    for name, _ in instruction["operands"]:
      users[name].append(instruction)
  by_name = {i["name"]: i for i in body}
  root = next(i for i in body if i["root"])
  outputs = [by_name[n] for n, _ in root["operands"]] if root["opcode"] == "tuple" else [root]
  written, updated_in_place = 0, set()
  for out in outputs:
    if out["opcode"] == "dynamic-update-slice" and by_name[out["operands"][0][0]]["opcode"] == "parameter":
      written += array_bytes(by_name[out["operands"][1][0]]["shape"])
      updated_in_place.add(out["operands"][0][0])
    else:
      written += output_bytes(program, out)
  read = 0
  for parameter in (i for i in body if i["opcode"] == "parameter"):
    if parameter["name"] in updated_in_place:
      continue
    readers = users[parameter["name"]]
    if readers and all(r["opcode"] in ("dynamic-slice", "slice") and r["operands"][0][0] == parameter["name"]
                       for r in readers):  # sliced, not an index
      read += sum(array_bytes(r["shape"]) for r in readers)
    else:
      read += array_bytes(parameter["shape"])
  flops = sum(matmul_flops(program, fused, i) for i in body if is_matmul(i))
  return read, written, flops


def output_bytes(program: Program, instruction: dict) -> int:
  """Bytes an instruction writes: its outputs, less the scratch workspace a cuBLAS or cuDNN call (or XLA's wrapper
  around one) returns as its last tuple element (s8[N]/u8[N]), which is not data."""
  elements = tuple_elements(instruction["shape"])
  library = "custom_call_target" in instruction["line"] or any(
      i["opcode"] == "custom-call" for c in program.called(instruction, "calls") for i in program.computations[c])
  if library and len(elements) > 1 and re.match(r"[su]8\[", elements[-1]):
    elements = elements[:-1]
  return sum(array_bytes(e) for e in elements)


def is_fill(program: Program, instruction: dict) -> bool:
  """A fusion of no operands that only broadcasts constants: XLA's initialisation of a buffer (a scan's stacks of
  saved residuals are filled with zeros before the loop writes them)."""
  bodies = program.called(instruction, "calls")
  return (instruction["opcode"] == "fusion" and not instruction["operands"] and bool(bodies) and all(
      i["opcode"] in ("constant", "broadcast", "copy", "tuple", "bitcast") for i in program.computations[bodies[0]]))


def kernel_class(program: Program, instruction: dict, flops: int) -> str:
  target = re.search(r'custom_call_target="([^"]+)"', instruction["line"])
  if instruction["opcode"] == "custom-call" and target and "fmha" in target.group(1):
    return "fused attention (cuDNN)"
  if flops:
    return "matmul"
  if instruction["opcode"] in ("copy", "copy-start"):
    return "copy"
  if instruction["opcode"] in ("fusion", "fusion-start", "async-start"):
    return "scan stack slice/update" if moves_a_slice(program, instruction) else "fusion (elementwise, reduction, layout)"
  return instruction["opcode"]


def moves_a_slice(program: Program, instruction: dict) -> bool:
  """Whether a fusion (or an async wrapper of one) only takes a dynamic slice of an array or writes one into it:
  how a scanned loop reads a layer's weights and saved residuals from their stacks and saves residuals into them."""
  for called in program.called(instruction, "calls"):
    body = program.computations[called]
    by_name = {i["name"]: i for i in body}
    inner = next((i for i in body if i["opcode"] == "fusion"), None)
    if instruction["opcode"] == "async-start" and inner is not None:
      return moves_a_slice(program, inner)
    roots = [i for i in body if i["root"]]
    outputs = [by_name[n] for n, _ in roots[0]["operands"]] if roots and roots[0]["opcode"] == "tuple" else roots
    while outputs and all(o["opcode"] in ("copy", "bitcast") for o in outputs):
      outputs = [by_name[o["operands"][0][0]] for o in outputs]
    return bool(outputs) and all(o["opcode"] in ("dynamic-slice", "dynamic-update-slice") for o in outputs)
  return False


def op_name(program: Program, instruction: dict) -> str:
  """The instruction's op name; for a fusion without one (XLA's wrappers, e.g. a matmul reading a scan's slice),
  that of the first instruction inside it that has one, matrix products first."""
  found = re.search(r'op_name="([^"]+)"', instruction["line"])
  if found:
    return found.group(1)
  for fused in program.called(instruction, "calls"):
    body = program.computations[fused]
    for inner in sorted(body, key=lambda i: not is_matmul(i)):
      name = op_name(program, inner)
      if name:
        return name
  return ""


def source(name: str) -> tuple[str, str]:
  """(pass, part) of an op name: 'forward'/'backward' and its first module path components."""
  backward = "transpose(" in name
  parts = [p for p in re.sub(r"\b(jit|jvp|transpose|remat|checkpoint|closed_call)\(", "", name).replace(")", "")
           .split("/") if p and p not in ("train_step", "while", "body", "closed_call", "cond")]
  return ("backward" if backward else "forward"), ("/".join(parts[:2]) if parts else "(no op name)")


def kernels(program: Program, every_branch: bool = False) -> list[dict]:
  """Every kernel launch of the program with its traffic, per step (loops multiplied out). A loop whose trip count
  XLA did not work out counts once, and its kernels say so (`launches_uncertain`). Of a conditional, the costliest
  branch; `every_branch`: all of them, the others' kernels marked `outside_costliest_branch` (to look kernels up
  by name; `counted` gives back the rows a step's totals take)."""

  def walk(computation: str, times: int) -> list[dict]:
    out = []
    for instruction in program.computations[computation]:
      opcode = instruction["opcode"]
      if opcode == "while":
        trips = re.search(r'known_trip_count":\{"n":"(\d+)"', instruction["attributes"])
        for body in program.called(instruction, "body"):
          inside = walk(body, times * (int(trips.group(1)) if trips else 1))
          for row in inside if not trips else ():
            row["launches_uncertain"] = True
          out += inside
        continue
      if opcode == "conditional":
        names = (program.called(instruction, "branch_computations") or program.called(instruction, "true_computation")
                 + program.called(instruction, "false_computation"))
        branches = [walk(b, times) for b in names]
        costliest = max(branches, key=lambda b: sum(r["read"] + r["written"] for r in b), default=[])
        for branch in branches:
          for row in branch if branch is not costliest else ():
            row["outside_costliest_branch"] = True
          out += branch
        continue
      if opcode == "call":
        for callee in program.called(instruction, "to_apply"):
          out += walk(callee, times)
        continue
      if opcode in NO_KERNEL or 'custom_call_target="AllocateBuffer"' in instruction["line"]:
        continue  # AllocateBuffer (lax.empty's lowering on GPU and TPU) only allocates: XLA emits no kernel for it.
      fused = program.called(instruction, "calls")
      if opcode == "async-start" and fused:  # an async wrapper around one fusion or call
        inner = next((i for i in program.computations[fused[0]] if i["opcode"] in ("fusion", "custom-call")), None)
        inner_fused = program.called(inner, "calls") if inner else []
        if inner_fused:
          read, written, flops = fusion_traffic(program, inner_fused[0])
        else:
          read = sum(array_bytes(program.operand_shape(computation, o)) for o in instruction["operands"])
          written, flops = array_bytes(tuple_elements(instruction["shape"])[-2]), 0
      elif opcode in ("fusion", "fusion-start") and fused:
        read, written, flops = fusion_traffic(program, fused[0])
      elif opcode in ("slice", "dynamic-slice"):  # Reads what it takes, not its whole operand.
        read = written = array_bytes(instruction["shape"])
        flops = 0
      else:
        read = sum(array_bytes(program.operand_shape(computation, o)) for o in instruction["operands"])
        written = output_bytes(program, instruction)
        flops = matmul_flops(program, computation, instruction) if is_matmul(instruction) else 0
      pass_, part = source(op_name(program, instruction))
      out.append(dict(name=instruction["name"], launches=times, asynchronous=opcode.endswith("-start"), read=read * times, written=written * times,
                      flops=flops * times, passes=pass_, part=part,
                      kind="fill (constant broadcast)" if is_fill(program, instruction) else kernel_class(program, instruction, flops),
                      shape=re.sub(r"\{[0-9,]*\}", "", instruction["shape"])[:80]))
    return out

  rows = walk(program.entry, 1)
  return rows if every_branch else counted(rows)


def counted(rows: list[dict]) -> list[dict]:
  """The rows a step's totals take: those of `kernels(..., every_branch=True)` less the other branches'."""
  return [r for r in rows if not r.get("outside_costliest_branch")]


def serial_bound_seconds(rows: list[dict], peak_tflops: float, memory_tbps: float,
                         overlap_asynchronous: bool = False) -> float:
  """A lower bound on the step's time where kernels run one at a time: each launch takes at least its FLOPs at
  the chip's peak and at least its bytes at the memory's peak bandwidth, whichever is longer (a roofline per
  kernel; fused attention's FLOPs are not counted, so its bound is its bytes alone). `overlap_asynchronous`:
  leave out the kernels XLA launches asynchronously (fusion-start, async-start, copy-start: they may run beside
  the others), as if they overlapped perfectly: the bound where that overlap is best."""
  return sum(max(r["flops"] / (peak_tflops * 1e12), (r["read"] + r["written"]) / (memory_tbps * 1e12))
             for r in rows if not (overlap_asynchronous and r.get("asynchronous")))


def bounds(rows: list[dict], peak_tflops: float, memory_tbps: float, model_tflop: float | None = None) -> dict:
  """Both serial bounds (seconds), and with the step's model FLOPs the MFU each allows."""
  out = dict(peak_tflops=peak_tflops, memory_tbps=memory_tbps)
  for key, overlap in (("serial_bound_s", False), ("serial_bound_s_if_asynchronous_overlap", True)):
    out[key] = serial_bound_seconds(rows, peak_tflops, memory_tbps, overlap_asynchronous=overlap)
    if model_tflop:
      out[key.replace("serial_bound_s", "mfu_at_most")] = model_tflop / (out[key] * peak_tflops)
  return out


def summary(rows: list[dict], top: int) -> dict:
  def grouped(key):
    groups: dict = collections.defaultdict(lambda: dict(gb=0.0, tflop=0.0, launches=0))
    for r in rows:
      g = groups[key(r)]
      g["gb"] += (r["read"] + r["written"]) / 1e9
      g["tflop"] += r["flops"] / 1e12
      g["launches"] += r["launches"]
    return {k: {n: round(v, 3) for n, v in g.items()} for k, g in sorted(groups.items(), key=lambda kv: -kv[1]["gb"])}
  total_gb = sum(r["read"] + r["written"] for r in rows) / 1e9
  outside = sum(r["read"] + r["written"] for r in rows if r["kind"] != "matmul") / 1e9
  heaviest = sorted(rows, key=lambda r: -(r["read"] + r["written"]))[:top]
  return dict(
      total_gb=round(total_gb, 3), gb_outside_matmuls=round(outside, 3),
      matmul_tflop=round(sum(r["flops"] for r in rows) / 1e12, 3),
      launches=sum(r["launches"] for r in rows),
      launches_uncertain=sum(r["launches"] for r in rows if r.get("launches_uncertain")),
      by_class=grouped(lambda r: r["kind"]),
      by_source=grouped(lambda r: f"{r['passes']} {r['part']}"),
      heaviest=[dict(gb=round((r["read"] + r["written"]) / 1e9, 3), launches=r["launches"], kind=r["kind"],
                     source=f"{r['passes']} {r['part']}", shape=r["shape"], name=r["name"]) for r in heaviest])


def read_program(path: str) -> Program:
  p = Path(path)
  if not p.is_file():
    raise SystemExit(f"{path}: no such file (write one with `python -m retfiner_jax.aot ... --hlo={path}`)")
  raw = p.read_bytes()
  text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
  try:
    return Program(text)
  except ValueError as e:
    raise SystemExit(f"{path}: {e}") from None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("program", help="XLA's optimised program as text (.gz or plain)")
  parser.add_argument("--top", type=int, default=25, help="how many of the heaviest kernels to list")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
  parser.add_argument("--peak-tflops", type=float, help="the chip's dense peak (e.g. 989 for an H100/H200 in "
                      "bfloat16): with --memory-tbps, adds the serial lower bound on the step's time")
  parser.add_argument("--memory-tbps", type=float, help="the memory's peak bandwidth in TB/s (4.8 for an H200, "
                      "3.35 for an H100 SXM)")
  parser.add_argument("--model-tflop", type=float, help="the step's model FLOPs (refine/flops.py; 63.984 for the "
                      "shipped retfound config), for the MFU that bound allows")
  args = parser.parse_args(argv)
  if (args.peak_tflops is None) != (args.memory_tbps is None):
    parser.error("--peak-tflops and --memory-tbps go together")
  for name in ("peak_tflops", "memory_tbps", "model_tflop"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  rows = kernels(read_program(args.program))
  report = summary(rows, args.top)
  report["program"] = args.program
  if args.peak_tflops:
    report["serial_bound"] = bounds(rows, args.peak_tflops, args.memory_tbps, args.model_tflop)
  if args.json:
    print(json.dumps(report))
    return report
  print(f"{args.program}: {report['total_gb']:.1f} GB of device-memory traffic a step, "
        f"{report['gb_outside_matmuls']:.1f} GB of it outside matrix products; matmuls "
        f"{report['matmul_tflop']:.2f} TFLOP; {report['launches']} kernel launches")
  if report["launches_uncertain"]:
    print(f"  ({report['launches_uncertain']} of them in loops of no known trip count, counted once a loop)")
  if "serial_bound" in report:
    b = report["serial_bound"]
    print(f"one kernel at a time, each at {b['peak_tflops']:g} TFLOP/s or {b['memory_tbps']:g} TB/s (whichever is "
          f"slower): at least {b['serial_bound_s'] * 1e3:.1f} ms a step"
          + (f", so at most {100 * b['mfu_at_most']:.1f} % MFU" if "mfu_at_most" in b else "")
          + f"; {b['serial_bound_s_if_asynchronous_overlap'] * 1e3:.1f} ms"
          + (f" ({100 * b['mfu_at_most_if_asynchronous_overlap']:.1f} %)" if "mfu_at_most" in b else "")
          + " if the asynchronously launched kernels overlapped the others perfectly")
  for title, table in (("by class", report["by_class"]), ("by source (the 15 with most traffic)", report["by_source"])):
    print(f"\n{title}: GB, TFLOP, launches")
    for name, g in list(table.items())[:15]:
      print(f"  {g['gb']:9.2f} {g['tflop']:8.3f} {g['launches']:7d}  {name}")
  print(f"\nthe {args.top} kernels with the most traffic: GB (all launches), launches, class, source, shape")
  for r in report["heaviest"]:
    print(f"  {r['gb']:8.2f} x{r['launches']:<4d} {r['kind'][:24]:24s} {r['source'][:60]:60s} {r['shape'][:60]}")
  return report


if __name__ == "__main__":
  main()
