"""benchmarks/hlo_traffic.py: the bytes and FLOPs it reads from an optimised program, against hand computation
(a small program written out here) and against a program XLA compiled (a scanned matmul, counted by hand)."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import hlo_traffic  # noqa: E402

# A loop of 4 trips reads one slice of a stacked bf16[4,8,16] input, multiplies it by a bf16[16,32] weight and
# writes the f32[8,32] product into a stack in place; the stack is zero-filled first. After the loop a cuBLAS
# matmul (with its workspace) and a conditional whose branches differ in size.
PROGRAM = """HloModule hand_written

%fused_zeros () -> f32[4,8,32] {
  %zero = f32[] constant(0)
  ROOT %fill = f32[4,8,32]{2,1,0} broadcast(%zero), dimensions={}
}

%fused_slice (p0: bf16[4,8,16], p1: s32[]) -> bf16[1,8,16] {
  %p0 = bf16[4,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = bf16[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,8,16}
}

%fused_dot (p0: bf16[8,16], p1: bf16[16,32]) -> f32[8,32] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (p0: f32[4,8,32], p1: f32[8,32], p2: s32[]) -> f32[4,8,32] {
  %p0 = f32[4,8,32]{2,1,0} parameter(0)
  %p1 = f32[8,32]{1,0} parameter(1)
  %b = f32[1,8,32]{2,1,0} bitcast(%p1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = f32[4,8,32]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %c0, %c0)
}

%body (arg: (s32[], bf16[4,8,16], f32[4,8,32], bf16[16,32])) -> (s32[], bf16[4,8,16], f32[4,8,32], bf16[16,32]) {
  %arg = (s32[], bf16[4,8,16]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = bf16[4,8,16]{2,1,0} get-tuple-element(%arg), index=1
  %out = f32[4,8,32]{2,1,0} get-tuple-element(%arg), index=2
  %w = bf16[16,32]{1,0} get-tuple-element(%arg), index=3
  %slice = bf16[1,8,16]{2,1,0} fusion(%x, %i), kind=kLoop, calls=%fused_slice
  %flat = bf16[8,16]{1,0} bitcast(%slice)
  %product = f32[8,32]{1,0} fusion(%flat, %w), kind=kOutput, calls=%fused_dot
  %stored = f32[4,8,32]{2,1,0} fusion(%out, %product, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[4,8,16]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[16,32]{1,0}) tuple(%next, %x, %stored, %w)
}

%condition (arg: (s32[], bf16[4,8,16], f32[4,8,32], bf16[16,32])) -> pred[] {
  %arg = (s32[], bf16[4,8,16]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %four), direction=LT
}

%fused_exp_big (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  ROOT %e = f32[256]{0} exponential(%p0)
}

%fused_exp_small (p0: f32[16]) -> f32[16] {
  %p0 = f32[16]{0} parameter(0)
  ROOT %e = f32[16]{0} exponential(%p0)
}

%branch_big (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  ROOT %f = f32[256]{0} fusion(%p), kind=kLoop, calls=%fused_exp_big
}

%branch_small (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %s = f32[16]{0} slice(%p), slice={[0:16]}
  %f = f32[16]{0} fusion(%s), kind=kLoop, calls=%fused_exp_small
  ROOT %pad = f32[256]{0} bitcast(%p)
}

ENTRY %main (x: bf16[4,8,16], w: bf16[16,32], a: bf16[64,128], b: bf16[128,32], v: f32[256], k: s32[]) -> f32[4,8,32] {
  %x = bf16[4,8,16]{2,1,0} parameter(0)
  %w = bf16[16,32]{1,0} parameter(1)
  %a = bf16[64,128]{1,0} parameter(2)
  %b = bf16[128,32]{1,0} parameter(3)
  %v = f32[256]{0} parameter(4)
  %k = s32[] parameter(5)
  %zeros = f32[4,8,32]{2,1,0} fusion(), kind=kLoop, calls=%fused_zeros
  %start = s32[] constant(0)
  %init = (s32[], bf16[4,8,16]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[16,32]{1,0}) tuple(%start, %x, %zeros, %w)
  %loop = (s32[], bf16[4,8,16]{2,1,0}, f32[4,8,32]{2,1,0}, bf16[16,32]{1,0}) while(%init), condition=%condition, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %gemm = (bf16[64,32]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %choice = f32[256]{0} conditional(%k, %v, %v), branch_computations={%branch_small, %branch_big}
  ROOT %result = f32[4,8,32]{2,1,0} get-tuple-element(%loop), index=2
}
"""


def test_bytes_and_flops_of_a_written_out_program_equal_hand_computation():
  rows = hlo_traffic.kernels(hlo_traffic.Program(PROGRAM))
  by_name = {r["name"]: r for r in rows}
  # Launches: the fill, the loop's four (its counter's add is one too), the matmul, one branch's exponential.
  assert sorted(by_name) == sorted(["zeros", "slice", "product", "stored", "next", "gemm", "f"])
  # The fill writes the f32 stack once and reads nothing.
  assert (by_name["zeros"]["read"], by_name["zeros"]["written"], by_name["zeros"]["launches"]) == (0, 4 * 8 * 32 * 4, 1)
  assert by_name["zeros"]["kind"] == "fill (constant broadcast)"
  # Per trip, x4: the slice reads its 8x16 bf16 slice (not the stack) and the s32 index, and writes the slice.
  assert by_name["slice"]["launches"] == 4
  assert by_name["slice"]["read"] == 4 * (8 * 16 * 2 + 4) and by_name["slice"]["written"] == 4 * 8 * 16 * 2
  # The product reads both bf16 operands, writes f32[8,32], and does 2*8*32*16 FLOPs a trip.
  assert by_name["product"]["read"] == 4 * (8 * 16 * 2 + 16 * 32 * 2)
  assert by_name["product"]["written"] == 4 * 8 * 32 * 4
  assert by_name["product"]["flops"] == 4 * 2 * 8 * 32 * 16 and by_name["product"]["kind"] == "matmul"
  # The update reads the f32[8,32] product and the index, writes only the update: the stack is updated in place.
  assert by_name["stored"]["read"] == 4 * (8 * 32 * 4 + 4) and by_name["stored"]["written"] == 4 * 8 * 32 * 4
  assert by_name["slice"]["kind"] == by_name["stored"]["kind"] == "scan stack slice/update"
  assert not any(r.get("launches_uncertain") for r in rows)  # The loop's trip count is known.
  assert not any(r["asynchronous"] for r in rows)
  # cuBLAS: both operands read, the bf16[64,32] result written, the s8 workspace not; 2*64*32*128 FLOPs.
  assert by_name["gemm"]["read"] == 64 * 128 * 2 + 128 * 32 * 2
  assert by_name["gemm"]["written"] == 64 * 32 * 2
  assert by_name["gemm"]["flops"] == 2 * 64 * 32 * 128
  # Of the conditional, only the costlier branch: one f32[256] exponential (read and written), not the slice and
  # the f32[16] one of the other branch.
  branch = [r for r in rows if r["name"] in ("f", "s")]
  assert [(r["read"], r["written"]) for r in branch] == [(256 * 4, 256 * 4)]
  # Every branch's kernels where asked (to look a kernel of a profile up by name).
  every = {r["name"]: r for r in hlo_traffic.kernels(hlo_traffic.Program(PROGRAM), every_branch=True)}
  assert (every["s"]["read"], every["s"]["written"]) == (16 * 4, 16 * 4)  # A slice reads only what it takes.

  report = hlo_traffic.summary(rows, top=3)
  assert report["matmul_tflop"] == round((4 * 2 * 8 * 32 * 16 + 2 * 64 * 32 * 128) / 1e12, 3)
  total = sum(r["read"] + r["written"] for r in rows)
  assert report["total_gb"] == round(total / 1e9, 3)
  assert len(report["heaviest"]) == 3


def test_an_unfilled_buffer_moves_no_bytes():
  """The loop's stack made by AllocateBuffer (lax.empty on GPU/TPU) instead of a zero fill: no kernel, no bytes;
  the other kernels as before."""
  fill = "%zeros = f32[4,8,32]{2,1,0} fusion(), kind=kLoop, calls=%fused_zeros"
  assert fill in PROGRAM
  unfilled = PROGRAM.replace(fill, '%zeros = f32[4,8,32]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"')
  rows = {r["name"]: r for r in hlo_traffic.kernels(hlo_traffic.Program(unfilled))}
  filled = {r["name"]: r for r in hlo_traffic.kernels(hlo_traffic.Program(PROGRAM))}
  assert sorted(rows) == sorted(set(filled) - {"zeros"})
  assert all(rows[n]["read"] == filled[n]["read"] and rows[n]["written"] == filled[n]["written"] for n in rows)


def test_the_serial_bound_is_each_kernels_slower_limit_summed():
  rows = [dict(flops=4e12, read=1e12, written=1e12),   # 4 s of FLOPs at 1 TFLOP/s, 1 s of bytes at 2 TB/s: 4 s.
          dict(flops=0, read=3e12, written=1e12)]      # Bytes only: 2 s.
  assert hlo_traffic.serial_bound_seconds(rows, peak_tflops=1, memory_tbps=2) == pytest.approx(6.0)
  rows[1]["asynchronous"] = True  # Launched asynchronously: left out where it may overlap the rest.
  assert hlo_traffic.serial_bound_seconds(rows, 1, 2) == pytest.approx(6.0)
  assert hlo_traffic.serial_bound_seconds(rows, 1, 2, overlap_asynchronous=True) == pytest.approx(4.0)


def test_a_scanned_matmul_compiled_by_xla_counts_every_trip():
  """XLA's own program (this machine's backend): a scan of 5 steps, each a (32, 64) x (64, 48) float32 product.
  The FLOPs come out as 5 x 2 x 32 x 48 x 64, whatever XLA named or fused around the dot."""
  def f(x, ws):
    def step(carry, w):
      return carry, jnp.tanh(x @ w)
    return jax.lax.scan(step, 0.0, ws)[1]
  x = jnp.ones((32, 64), jnp.float32)
  ws = jnp.ones((5, 64, 48), jnp.float32)
  text = jax.jit(f).lower(x, ws).compile().as_text()
  rows = hlo_traffic.kernels(hlo_traffic.Program(text))
  assert sum(r["flops"] for r in rows) == 5 * 2 * 32 * 48 * 64
  # At least each trip's weight slice and its result were moved.
  assert sum(r["read"] + r["written"] for r in rows) >= 5 * (64 * 48 * 4 + 32 * 48 * 4)


def test_a_rate_that_is_not_positive_is_refused_by_name(capsys):
  with pytest.raises(SystemExit):
    hlo_traffic.main(["absent.hlo", "--peak-tflops", "989", "--memory-tbps", "0"])
  assert "--memory-tbps must be positive, got 0.0" in capsys.readouterr().err


def test_a_missing_or_foreign_file_is_named(tmp_path):
  with pytest.raises(SystemExit, match="no such file"):
    hlo_traffic.read_program(str(tmp_path / "absent.hlo"))
  (tmp_path / "notes.txt").write_text("not a program\n")
  with pytest.raises(SystemExit, match="notes.txt: no ENTRY computation"):
    hlo_traffic.read_program(str(tmp_path / "notes.txt"))
