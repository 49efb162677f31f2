"""optax.adamw against paged_adamw8bit (optax path and fused step) on one GPU.

Builds its own inputs and prints one table: ms per step (median of --iters
after warm-up, each step awaited), effective GB/s, the ratio to optax.adamw
measured in the same run, the memory-traffic floor (bytes per step / device
copy bandwidth measured in the same run; for a step with the state paged out
beforehand, plus the time of an explicit page_in of that state), optimizer-state bytes on the
device per parameter, and the mean ms per step of --iters steps dispatched
back to back (as a training loop runs them) with its ratio to optax.adamw.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python benchmarks/bench_adamw.py --json out.json

Cases: 64 x (4096, 4096) float32 (1.07e9 params), the same in bfloat16, a
GPT-2-medium-shaped float32 tree (292 leaves, 355M params), and 1152
LoRA-shaped float32 leaves (576 x (4096, 16) and 576 x (16, 4096), 75M params).
Each case runs optax.adamw, paged_adamw8bit (optax path, fused, fused after
page_out) and adamw8bit (optax path, fused).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged8bit as op

LR = 2e-4


def gpt2_medium_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {"wte": (50304, 1024), "wpe": (1024, 1024), "ln_f.g": (1024,), "ln_f.b": (1024,)}
  for i in range(24):
    shapes |= {
      f"h{i}.ln1.g": (1024,),
      f"h{i}.ln1.b": (1024,),
      f"h{i}.qkv.w": (1024, 3072),
      f"h{i}.qkv.b": (3072,),
      f"h{i}.proj.w": (1024, 1024),
      f"h{i}.proj.b": (1024,),
      f"h{i}.ln2.g": (1024,),
      f"h{i}.ln2.b": (1024,),
      f"h{i}.fc.w": (1024, 4096),
      f"h{i}.fc.b": (4096,),
      f"h{i}.fc2.w": (4096, 1024),
      f"h{i}.fc2.b": (1024,),
    }
  return shapes


def lora_shapes() -> dict[str, tuple[int, ...]]:
  """Rank-16 adapters on 4 matrices of 4096 x 4096 in each of 144 layers."""
  shapes = {}
  for i in range(576):
    shapes[f"a{i:03d}"] = (4096, 16)
    shapes[f"b{i:03d}"] = (16, 4096)
  return shapes


CASES = {
  "1.07e9 f32 (64x4096x4096)": ({f"w{i:02d}": (4096, 4096) for i in range(64)}, jnp.float32),
  "1.07e9 bf16 (64x4096x4096)": ({f"w{i:02d}": (4096, 4096) for i in range(64)}, jnp.bfloat16),
  "GPT-2 medium f32 (292 leaves)": (gpt2_medium_shapes(), jnp.float32),
  "LoRA f32 (1152 leaves, 75M)": (lora_shapes(), jnp.float32),
}


def make_tree(shapes, dtype, key):
  keys = jax.random.split(key, len(shapes))
  return {
    name: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)
    for k, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


def jitted_step(tx, fused: bool, donate: bool = True):
  """(params, state, grads) -> (params, state), jitted: the paged fused step,
  or optax's `update` then `apply_updates`; params and state donated."""
  if fused:
    step = lambda p, s, g: tx.fused_update(g, s, p)
  else:

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def time_steps(step, carry, iters, warmup=3, before=None):
  """Median seconds of `carry = step(*carry)`, each step awaited."""
  times = []
  for i in range(warmup + iters):
    if before is not None:
      before(carry)
    t0 = time.perf_counter()
    carry = step(*carry)
    jax.block_until_ready(carry)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times), carry


def time_pipelined(step, carry, iters):
  """Mean seconds per step of `iters` steps dispatched back to back and
  awaited once, as a training loop runs them (host dispatch overlaps the
  device's work)."""
  carry = step(*carry)
  jax.block_until_ready(carry)
  t0 = time.perf_counter()
  for _ in range(iters):
    carry = step(*carry)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) / iters, carry


def copy_bandwidth(nbytes=4 << 30, rounds=3):
  """Device copy bandwidth (bytes read + written per second): the best of
  `rounds` runs of 20 in-place `x + 1` steps dispatched back to back (donated,
  so that no step allocates; back to back, so that no step waits for the
  host). One awaited step of a fresh output measured 3.2-3.9 TB/s between
  processes on an H200 (benchmarks/RESULTS.md)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # reads and writes every element once
  best = float("inf")
  for _ in range(rounds):
    sec, (x,) = time_pipelined(lambda x: (f(x),), (x,), iters=20)
    best = min(best, sec)
  return 2 * nbytes / best


def state_device_bytes(state) -> int:
  arrays = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  return arrays + op.residency(state)["bytes_on_device"]


def traffic_per_param(dtype, method):
  """Bytes one step must move per param (the floor's numerator)."""
  b = jnp.dtype(dtype).itemsize
  scales = 16 / 256  # read + write two float32 scales per 256 params
  if method == "optax.adamw":
    # read g, p, mu, nu; write p, mu, nu (moments in the param dtype)
    return 7 * b
  method = method.replace("adamw8bit", "paged")
  if method == "paged fused":
    return b + 2 * b + 4 + scales  # read g; read + write p; read + write 2 codes
  # optax path: the kernel reads g, p, writes u; apply_updates reads p, u, writes p
  return b + b + b + 4 + scales + 3 * b


METHODS = (
  "optax.adamw",
  "paged optax path",
  "paged fused",
  "paged fused, paged out",
  "adamw8bit optax path",
  "adamw8bit fused",
)


def bench_case(name, shapes, dtype, iters, bandwidth, key, methods=METHODS):
  params = make_tree(shapes, dtype, key)
  grads = make_tree(shapes, dtype, jax.random.fold_in(key, 1))
  n = sum(int(np.prod(s)) for s in shapes.values())
  rows = []

  def run(method, tx, fused=False, paged_out=False):
    nonlocal params
    if method not in methods:
      return
    state = tx.init(params)
    jstep = jitted_step(tx, fused)
    step = lambda p, s: jstep(p, s, grads)
    before = (lambda carry: op.page_out(carry[1])) if paged_out else None
    sec, (params, state) = time_steps(step, (params, state), iters, before=before)
    pipelined = None
    if not paged_out:
      pipelined, (params, state) = time_pipelined(step, (params, state), iters)
    # A paged-out step first brings the state back over the bus: its floor
    # adds the state's bytes at the bandwidth of an explicit page_in (the
    # same prefetch), measured here on the same state.
    page_in_sec = None
    if paged_out:
      times = []
      for _ in range(5):
        op.page_out(state)
        t0 = time.perf_counter()
        moved = op.page_in(state)
        times.append(time.perf_counter() - t0)
      page_in_sec = float(np.median(times))
    device_bytes = state_device_bytes(state)
    if isinstance(tx, op.PagedGradientTransformation):
      op.release(state)
    del state
    gc.collect()
    traffic = traffic_per_param(dtype, method.replace(", paged out", "")) * n
    floor_sec = traffic / bandwidth + (page_in_sec or 0.0)
    rows.append(
      dict(
        case=name,
        method=method,
        ms=sec * 1e3,
        pipelined_ms=None if pipelined is None else pipelined * 1e3,
        gbps=traffic / sec / 1e9,
        floor_ms=floor_sec * 1e3,
        page_in_ms=None if page_in_sec is None else page_in_sec * 1e3,
        page_in_gbps=None if page_in_sec is None else moved / page_in_sec / 1e9,
        state_bytes_per_param=device_bytes / n,
      )
    )

  run("optax.adamw", optax.adamw(LR, weight_decay=1e-2))
  run("paged optax path", op.paged_adamw8bit(LR))
  run("paged fused", op.paged_adamw8bit(LR), fused=True)
  run("paged fused, paged out", op.paged_adamw8bit(LR), fused=True, paged_out=True)
  run("adamw8bit optax path", op.adamw8bit(LR))
  run("adamw8bit fused", op.adamw8bit(LR), fused=True)
  base = next((r for r in rows if r["method"] == "optax.adamw"), None)
  for r in rows:
    r["speedup_vs_adamw"] = base["ms"] / r["ms"] if base else None
    if r["pipelined_ms"] is not None and base:
      r["pipelined_speedup_vs_adamw"] = base["pipelined_ms"] / r["pipelined_ms"]
    r["vs_floor"] = r["ms"] / r["floor_ms"]
  return rows


def sync_cost(iters):
  """Per-step cost of the handle/count read: a 1-leaf tree of 4096 params,
  paged fused step against optax.adamw (both dominated by fixed costs)."""
  p = {"w": jnp.zeros((4096,), jnp.float32)}
  g = {"w": jnp.ones((4096,), jnp.float32)}
  out = {}
  for method, tx in (("optax.adamw", optax.adamw(LR)), ("paged fused", op.paged_adamw8bit(LR))):
    s = tx.init(p)
    jstep = jitted_step(tx, fused=method == "paged fused", donate=False)
    sec, (_, s) = time_steps(lambda p, s, jstep=jstep: jstep(p, s, g), (p, s), iters * 10)
    out[method] = sec * 1e6
    method = method.replace("adamw8bit", "paged")
  if method == "paged fused":
    op.release(s)
  return out


def ratio(x):
  return "-" if x is None else f"{x:.2f}x"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--json", default=None, help="write the rows here")
  parser.add_argument("--cases", default=None, help="comma-separated case numbers (0-based)")
  parser.add_argument(
    "--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}"
  )
  args = parser.parse_args()
  dev = jax.devices()[0]
  bandwidth = copy_bandwidth()
  gc.collect()
  key = jax.random.PRNGKey(0)
  rows = []
  selected = [int(c) for c in args.cases.split(",")] if args.cases else range(len(CASES))
  methods = []
  for m in (m.strip() for m in args.methods.split(",")):
    if m == "paged out" and methods:  # the comma inside "paged fused, paged out"
      methods[-1] += ", paged out"
    else:
      methods.append(m)
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
  for i, (name, (shapes, dtype)) in enumerate(CASES.items()):
    if i in selected:
      rows += bench_case(
        name, shapes, dtype, args.iters, bandwidth, jax.random.fold_in(key, i), methods
      )
  sync = sync_cost(args.iters)
  print(
    f"device: {dev.device_kind}, jax {jax.__version__}, copy bandwidth "
    f"{bandwidth / 1e12:.2f} TB/s (read+write)"
  )
  header = f"{'case':32} {'method':24} {'ms':>8} {'GB/s':>7} {'vs adamw':>9} "
  header += (
    f"{'floor ms':>9} {'x floor':>8} {'state B/param':>14} {'pipelined ms':>13} {'vs adamw':>9}"
  )
  print(header)
  for r in rows:
    pipelined = "-" if r["pipelined_ms"] is None else f"{r['pipelined_ms']:.2f}"
    pipelined_ratio = ratio(r.get("pipelined_speedup_vs_adamw"))
    print(
      f"{r['case']:32} {r['method']:24} {r['ms']:8.2f} {r['gbps']:7.0f} "
      f"{ratio(r.get('speedup_vs_adamw')):>9} {r['floor_ms']:9.2f} {r['vs_floor']:7.2f}x "
      f"{r['state_bytes_per_param']:14.3f} {pipelined:>13} {pipelined_ratio:>9}"
    )
  for r in rows:
    if r["page_in_ms"] is not None:
      print(
        f"{r['case']}: paged-out floor = HBM floor + page_in of the state, "
        f"{r['page_in_ms']:.2f} ms ({r['page_in_gbps']:.1f} GB/s)"
      )
  print(
    f"tiny tree (4096 params) step: optax.adamw {sync['optax.adamw']:.0f} us, "
    f"paged fused {sync['paged fused']:.0f} us (includes the handle/count read)"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "device": dev.device_kind,
          "jax": jax.__version__,
          "copy_bandwidth": bandwidth,
          "rows": rows,
          "tiny_step_us": sync,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
