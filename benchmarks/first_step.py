"""What the first step on a GPU costs for the CUDA kernels' compile: a fresh
process with an empty kernel cache (cold), then one that finds the kernels
in it (warm). Each process compiles its jitted fused step first (XLA's work,
not ours), then times its first step and its second; the first's excess is
what compiling (or loading) the kernels cost. On a CPU there is nothing to
compile, and both figures are about 0.

Usage: python benchmarks/first_step.py [--dtype float32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
import optax_paged8bit as op
dtype = jnp.dtype(sys.argv[1])
params = {"w": jnp.ones((2048, 2048), dtype), "b": jnp.ones((2048,), dtype)}
tx = op.paged_adamw8bit(1e-3)
step = jax.jit(tx.fused_update).lower(params, tx.init(params), params).compile()
state = tx.init(params)
times = []
for _ in range(2):
  start = time.perf_counter()
  params, state = jax.block_until_ready(step(params, state, params))
  times.append(time.perf_counter() - start)
print(json.dumps({"platform": jax.default_backend(), "first_s": times[0], "second_s": times[1]}))
"""


def run(cache: str, dtype: str) -> dict:
  env = {**os.environ, "OPTAX_PAGED8BIT_CACHE_DIR": cache}
  # Run outside the repository's root, whose optax_paged8bit/ would shadow the installed package.
  out = subprocess.run(
    [sys.executable, "-c", CHILD, dtype], env=env, capture_output=True, text=True, cwd=cache
  )
  if out.returncode != 0:
    raise SystemExit(f"the timed process failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--json", help="write the results here too")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as cache:
    results = {run_kind: run(cache, args.dtype) for run_kind in ("cold", "warm")}
  for kind, r in results.items():
    r["kernels_s"] = r["first_s"] - r["second_s"]
    print(
      f"{kind}: first step {r['first_s']:.3f} s, second {r['second_s'] * 1e3:.1f} ms: "
      f"kernels {r['kernels_s']:.3f} s ({r['platform']}, {args.dtype} params)"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
