"""Does cuDNN's fused attention run here, and compute what the XLA path computes? The ViT's call as a run makes it
(models/attention.py fused_attention: ViT-L/16's 197 tokens padded to 198 and masked by sequence length, 16 heads
of 64, bfloat16), forward and the three gradients, against attention() on XLA's ops, with the tolerance the CPU
test uses for bfloat16 (tests/models/test_attention.py: 2e-2, gradients scaled by their largest entry).

  python benchmarks/attention_check.py              # on a GPU: the cuDNN kernel
  python benchmarks/attention_check.py --kernel xla # anywhere: the same call through XLA (a check of the script)

Prints one JSON line; exits 1 where the kernel cannot run or disagrees. gpu.sh runs it first and measures with
model.attention=xla where it fails, saying so.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from retfiner_jax.models.attention import attention, fused_attention  # noqa: E402

TOLERANCE = 2e-2  # bfloat16: both paths round the probabilities to 8 bits of mantissa.


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--kernel", default="cudnn", choices=("cudnn", "xla"))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--tokens", type=int, default=197)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=64)
  a = p.parse_args()
  started = time.time()
  report = {"benchmark": "attention_check", "kernel": a.kernel, "backend": jax.default_backend(),
            "shape": [a.batch, a.tokens, a.heads, a.head_dim], "dtype": "bfloat16", "tolerance": TOLERANCE}
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (a.batch, a.tokens, a.heads, a.head_dim), jnp.bfloat16) for key in keys[:3])
  weights = jax.random.normal(keys[3], q.shape, jnp.float32)  # The cotangent: fixed random weights on the outputs.

  def forward_and_grads(f):
    loss = lambda *x: jnp.sum(f(*x).astype(jnp.float32) * weights)
    return jax.jit(lambda *x: (f(*x), jax.grad(loss, argnums=(0, 1, 2))(*x)))(q, k, v)
  try:
    fused_out, fused_grads = forward_and_grads(lambda *x: fused_attention(*x, kernel=a.kernel))
    jax.block_until_ready(fused_grads)
  except Exception as e:  # The kernel cannot run here: said, with the error's first line, and exit 1.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(json.dumps(report | {"ok": False, "error": f"{type(e).__name__}: {first}"[:500]}), flush=True)
    traceback.print_exc()
    return 1
  xla_out, xla_grads = forward_and_grads(attention)
  f32 = lambda x: np.asarray(x, np.float32)
  output_diff = float(np.max(np.abs(f32(fused_out) - f32(xla_out))))
  grad_diffs = [float(np.max(np.abs(f32(g) - f32(w))) / max(float(np.max(np.abs(f32(w)))), 1.0))
                for g, w in zip(fused_grads, xla_grads)]
  ok = output_diff <= TOLERANCE * (1 + float(np.max(np.abs(f32(xla_out))))) and max(grad_diffs) <= TOLERANCE
  print(json.dumps(report | {"ok": ok, "output_max_abs_diff": output_diff,
                             "grad_max_diff_scaled": dict(zip(("query", "key", "value"), grad_diffs)),
                             "seconds": round(time.time() - started, 2)}), flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
