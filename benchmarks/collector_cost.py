"""What the automatic collector costs a resident training step: the same fused
step with it on (the default) and off (OPTAX_PAGED8BIT_AUTO_COLLECT=0), one
process per run, alternated on/off/on/off so that drift hits both.

    python benchmarks/collector_cost.py --json out.json [--rounds 2]

Cases: 64 x (4096, 4096) float32 (1.07e9 params, a 2.03 GiB state; on the
CPU 8 x (1024, 1024)) and the GPT-2-medium-shaped tree of bench_adamw.py
(292 leaves, host-bound), each as --iters steps dispatched back to back
(mean ms per step) and as awaited steps (median ms). A second state is made,
stepped and dropped before timing, so that the collector has a state to
retire and free while the loop runs, and a full garbage collection runs every
50 steps (each wakes the collector's thread).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp


def make_tree(case: str) -> dict:
  if case == "large":
    n, shape = (64, (4096, 4096)) if jax.devices()[0].platform == "gpu" else (8, (1024, 1024))
    return {f"w{i}": jnp.full(shape, 0.01 * (i + 1), jnp.float32) for i in range(n)}
  sys.path.insert(0, os.path.dirname(__file__))
  from bench_adamw import gpt2_medium_shapes

  return {k: jnp.full(s, 0.01, jnp.float32) for k, s in gpt2_medium_shapes().items()}


def measure(case: str, iters: int) -> dict:
  import optax_paged8bit as op

  tx = op.paged_adamw8bit(2e-4)
  params = make_tree(case)
  grads = jax.tree.map(lambda p: p * 1e-3, params)
  step = jax.jit(lambda p, s: tx.fused_update(grads, s, p), donate_argnums=(0, 1))
  dropped = tx.init(params)  # a state for the collector to free while the loop runs
  _, dropped = tx.fused_update(grads, dropped, jax.tree.map(jnp.copy, params))
  jax.block_until_ready(dropped)
  del dropped
  carry = (params, tx.init(params))
  for _ in range(5):
    carry = step(*carry)
  jax.block_until_ready(carry)
  start = time.perf_counter()
  for i in range(iters):
    carry = step(*carry)
    if i % 50 == 49:
      gc.collect()
  jax.block_until_ready(carry)
  back_to_back = (time.perf_counter() - start) * 1e3 / iters
  awaited = []
  for _ in range(iters // 2):
    t = time.perf_counter()
    carry = jax.block_until_ready(step(*carry))
    awaited.append((time.perf_counter() - t) * 1e3)
  return {
    "device": jax.devices()[0].device_kind,
    "back_to_back_ms": back_to_back,
    "awaited_median_ms": statistics.median(awaited),
  }


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--json", default=None)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--iters", type=int, default=200)
  ap.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), default=None)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(measure(args.child[0], args.iters)))
    return
  rows = []
  for case in ("large", "gpt2"):
    for r in range(args.rounds):
      for mode in ("on", "off"):
        env = {**os.environ, "OPTAX_PAGED8BIT_AUTO_COLLECT": "1" if mode == "on" else "0"}
        cmd = [sys.executable, __file__, "--child", case, mode, "--iters", str(args.iters)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = {
          "case": case,
          "round": r,
          "collector": mode,
          **json.loads(out.stdout.splitlines()[-1]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
  summary = {}
  for case in ("large", "gpt2"):
    for key in ("back_to_back_ms", "awaited_median_ms"):
      on = statistics.mean(r[key] for r in rows if r["case"] == case and r["collector"] == "on")
      off = statistics.mean(r[key] for r in rows if r["case"] == case and r["collector"] == "off")
      summary[f"{case}.{key}"] = {
        "on": round(on, 3),
        "off": round(off, 3),
        "on/off": round(on / off, 4),
      }
  print(json.dumps(summary, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
  main()
