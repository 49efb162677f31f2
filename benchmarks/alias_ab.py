"""A/B of adamw8bit's custom-call layout on one bench_adamw case (default: the
LoRA tree): leaves per call (_calls.ARRAYS_CALL_LEAVES) and which state arrays
are aliased to their results (_calls.STATE_ALIAS_MIN_ELEMENTS), with the state
donated to the step and not. Prints ms per step (median, each awaited) and
back-to-back ms, and the first step's time (compile + run).

  python benchmarks/alias_ab.py [--case 3] [--iters 15]
"""

from __future__ import annotations

import argparse
import gc
import time

import bench_adamw as bench
import jax

import optax_paged8bit as op
from optax_paged8bit import _calls

CONFIGS = [  # (leaves per call, smallest aliased state array, donate)
  (256, 1 << 20, True),
  (256, 0, True),
  (256, 1 << 20, False),
  (256, 0, False),
  (1 << 16, 1 << 20, True),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", type=int, default=3)
  parser.add_argument("--iters", type=int, default=15)
  args = parser.parse_args()
  name, (shapes, dtype) = list(bench.CASES.items())[args.case]
  key = jax.random.PRNGKey(0)
  params = bench.make_tree(shapes, dtype, key)
  grads = bench.make_tree(shapes, dtype, jax.random.fold_in(key, 1))
  print(f"{name}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for leaves, alias_min, donate in CONFIGS:
    _calls.ARRAYS_CALL_LEAVES, _calls.STATE_ALIAS_MIN_ELEMENTS = leaves, alias_min
    tx = op.adamw8bit(bench.LR)
    state = tx.init(params)
    jstep = bench.jitted_step(tx, fused=False, donate=donate)
    t0 = time.perf_counter()
    carry = jax.block_until_ready(jstep(params, state, grads))
    first = time.perf_counter() - t0
    step = lambda p, s, jstep=jstep: jstep(p, s, grads)
    sec, carry = bench.time_steps(step, carry, args.iters)
    b2b, carry = bench.time_pipelined(step, carry, args.iters)
    params = carry[0]
    print(
      f"leaves/call {leaves:6d}  alias >= {alias_min:8d}  donated {donate!s:5}  "
      f"{sec * 1e3:8.2f} ms  b2b {b2b * 1e3:8.2f} ms  first {first:6.1f} s",
      flush=True,
    )
    del carry, state
    gc.collect()


if __name__ == "__main__":
  main()
