"""What splitting a paged step into several custom calls costs per step
(_calls.update_chunks): the fused step on N leaves as one call and as calls of
at most _calls.UPDATE_CALL_LEAVES, alternating in one process, with
optax.adamw as the baseline of the same run. Prints ms per step (awaited,
median; back to back, mean) and the ratios. With --trace DIR, then traces 5
awaited steps of each variant with the JAX profiler and prints where their
time goes (benchmarks/trace_step.py's summary: per device stream and host
thread, the events with the largest total time per step).

    python benchmarks/chunked_step.py --leaves 3000 --size 4096 [--trace DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged8bit as op
from optax_paged8bit import _calls


def timed(step, params, state, grads, iters):
  """(awaited median ms, back-to-back mean ms); returns the last params and state."""
  awaited = []
  for _ in range(iters):
    t0 = time.perf_counter()
    params, state = step(grads, state, params)
    jax.block_until_ready((params, state))
    awaited.append((time.perf_counter() - t0) * 1e3)
  t0 = time.perf_counter()
  for _ in range(iters):
    params, state = step(grads, state, params)
  jax.block_until_ready((params, state))
  b2b = (time.perf_counter() - t0) * 1e3 / iters
  return statistics.median(awaited), b2b, params, state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", type=int, default=3000)
  parser.add_argument("--size", type=int, default=4096, help="float32 elements per leaf")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default=None)
  parser.add_argument("--trace", default=None, help="a folder for the profiler's traces")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  base = {
    f"l{i:05d}": jnp.asarray(rng.standard_normal(args.size).astype(np.float32) * 0.1)
    for i in range(args.leaves)
  }
  grads = jax.tree.map(lambda p: p * 0.01, base)
  one_call = _calls.UPDATE_ONE_CALL_LEAVES
  steps = {}
  for name in ("one call", "split"):
    _calls.UPDATE_ONE_CALL_LEAVES = max(one_call, args.leaves) if name == "one call" else 0
    tx = op.paged_adamw8bit(1e-3)
    step = jax.jit(tx.fused_update, donate_argnums=(1, 2))
    params = jax.tree.map(jnp.copy, base)
    state = tx.init(params)
    params, state = step(grads, state, params)  # compiled with this split
    steps[name] = [step, params, state, len(_calls.update_chunks(args.leaves))]
  _calls.UPDATE_ONE_CALL_LEAVES = one_call
  adamw = optax.adamw(1e-3)

  @jax.jit
  def adamw_step(g, s, p):
    u, s = adamw.update(g, s, p)
    return optax.apply_updates(p, u), s

  ref = [jax.tree.map(jnp.copy, base), adamw.init(base)]
  rows = {name: [] for name in ("optax.adamw", *steps)}
  for _ in range(args.rounds):
    a, b, ref[0], ref[1] = timed(adamw_step, ref[0], ref[1], grads, args.iters)
    rows["optax.adamw"].append((a, b))
    for name, entry in steps.items():
      a, b, entry[1], entry[2] = timed(entry[0], entry[1], entry[2], grads, args.iters)
      rows[name].append((a, b))
  device = jax.devices()[0].device_kind
  print(f"{args.leaves} leaves of {args.size} float32 on {device}, jax {jax.__version__}")
  out = {"leaves": args.leaves, "size": args.size, "device": device, "rows": {}}
  base_a = statistics.median(r[0] for r in rows["optax.adamw"])
  base_b = statistics.median(r[1] for r in rows["optax.adamw"])
  for name, values in rows.items():
    a = statistics.median(r[0] for r in values)
    b = statistics.median(r[1] for r in values)
    calls = steps[name][3] if name in steps else "-"
    print(
      f"  {name:12s} calls {calls!s:>3}  awaited {a:8.2f} ms ({base_a / a:.2f}x)"
      f"  back to back {b:8.2f} ms ({base_b / b:.2f}x)"
    )
    out["rows"][name] = {"calls": calls, "awaited_ms": a, "b2b_ms": b, "rounds": values}
  if args.trace:
    from trace_step import summarize

    for name, entry in steps.items():
      trace_dir = os.path.join(args.trace, name.replace(" ", "_"))
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(5):
          entry[1], entry[2] = entry[0](grads, entry[2], entry[1])
          jax.block_until_ready((entry[1], entry[2]))
      print(f"{name}, {entry[3]} call(s)")
      print("\n".join(summarize(trace_dir, 5, 14)), flush=True)
  for entry in steps.values():
    op.release(entry[2])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
