"""A paged state in host RAM against the same state on the GPU, the bus's own
floor and JAX's host offloading, per tree, in one process on one GPU:

  (a) the fused step with the state resident on the GPU;
  (b) the state in managed host RAM (`set_device_memory_budget(0)`) read by
      the kernel over the bus (streaming off: how it ran before streaming);
  (c) the state in host RAM streamed through the device window: in pinned
      host memory copied by the copy engines (the default), and as
      `c_managed`, in managed host memory copied by kernels (as before);
  (d) the bus floor: the state's bytes copied host-to-device and
      device-to-host at once, on two streams, pinned (bus_copies.py's driver);
  (e) `optax.adamw` with its state in `pinned_host` memory, jitted, params on
      the device: the state moved in and out by XLA.

Each figure is the median ms of awaited steps (params and state donated).
Targets: (c) - (a) <= 1.15 (d), and (e) / (c) >= 3. `--windows` also times
(c) for other window shapes (chunk MiB x buffers, and optionally x the CTAs of
each copy kernel, which only managed memory uses) on the first tree.

    python benchmarks/host_state.py --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import time

import jax
import jax.numpy as jnp
import optax
from bench_adamw import CASES, LR, make_tree, time_steps
from bus_copies import Driver, timed

import optax_paged8bit as op
from optax_paged8bit import _ffi

MIB = 1 << 20
TREES = {  # bench_adamw.py's cases, by a short name
  "f32": "1.07e9 f32 (64x4096x4096)",
  "bf16": "1.07e9 bf16 (64x4096x4096)",
  "gpt2": "GPT-2 medium f32 (292 leaves)",
}


def awaited_ms(step, carry, iters):
  """Median ms of `carry = step(*carry)`, each step awaited (bench_adamw's)."""
  seconds, carry = time_steps(step, carry, iters)
  return seconds * 1e3, carry


def paged_ms(params, grads, iters, host, window=None, kind="pinned"):
  """Median ms of the fused step; host: the state placed in host RAM of
  `kind` (set_host_memory_kind)."""
  before = _ffi._ops.stream_window()
  kind_before = op.set_host_memory_kind(kind)
  if window is not None:
    _ffi._ops.set_stream_window(*window)
  op.set_device_memory_budget(0 if host else None)
  try:
    tx = op.paged_adamw8bit(LR)
    params = jax.tree.map(jnp.copy, params)
    # grads as an argument: closed over, they would be compiled in as constants.
    step = jax.jit(lambda p, s, g: tx.fused_update(g, s, p), donate_argnums=(0, 1))
    ms, (params, state) = awaited_ms(
      lambda p, s: step(p, s, grads), (params, tx.init(params)), iters
    )
    (info,) = op.slot_info(state)
    op.release(state)
  finally:
    op.set_device_memory_budget(None)
    _ffi._ops.set_stream_window(*before)
    op.set_host_memory_kind(kind_before)
  return ms, info


def floor_ms(nbytes, iters=5):
  """The state's bytes host-to-device and device-to-host at once (pinned, two
  streams), and each direction alone."""
  drv = Driver()
  s_in, s_out = drv.stream(), drv.stream()
  dev_a, dev_b = drv.device(nbytes), drv.device(nbytes)
  t0 = time.perf_counter()
  pin_a = drv.pinned(nbytes)
  pinned_alloc_s = time.perf_counter() - t0  # what a pinned state's allocation costs
  pin_b = drv.pinned(nbytes)

  def copies(*work):
    return lambda: [drv.copy(dst, src, nbytes, s) for dst, src, s in work]

  out = {
    "both": timed(drv, [s_in, s_out], copies((dev_a, pin_a, s_in), (pin_b, dev_b, s_out)), iters),
    "h2d": timed(drv, [s_in], copies((dev_a, pin_a, s_in)), iters),
    "d2h": timed(drv, [s_out], copies((pin_b, dev_b, s_out)), iters),
    "pinned_alloc_s": pinned_alloc_s,
  }
  for p in (dev_a, dev_b):
    drv.call("cuMemFree_v2", ctypes.c_uint64(p))
  for p in (pin_a, pin_b):
    drv.call("cuMemFreeHost", ctypes.c_void_p(p))
  return out


def adamw_pinned_host_ms(params, grads, iters):
  dev = jax.devices()[0]
  s_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  s_host = s_dev.with_memory_kind("pinned_host")
  tx = optax.adamw(LR)
  params = jax.tree.map(jnp.copy, params)
  state = jax.device_put(tx.init(params), s_host)
  state_host = jax.tree.map(lambda _: s_host, state)
  params_dev = jax.tree.map(lambda _: s_dev, params)

  def step(p, s, g):
    s = jax.device_put(s, s_dev)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), jax.device_put(s, s_host)

  step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(params_dev, state_host))
  ms, carry = awaited_ms(lambda p, s: step(p, s, grads), (params, state), iters)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(carry[1])}
  del carry
  return ms, sorted(kinds)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
  ap.add_argument("--iters", type=int, default=10)
  # MiB x buffers, or MiB x buffers x CTAs of each copy kernel (by default a
  # quarter of the SMs, up to 32).
  ap.add_argument("--windows", nargs="*", default=["64x4", "16x4", "8x8"])
  ap.add_argument("--json")
  args = ap.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("host_state.py needs a GPU")
  git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
  out = {
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "commit": git.stdout.strip(),
    "default_window": list(_ffi._ops.stream_window()),
    "trees": {},
  }
  for n, name in enumerate(TREES[t] for t in args.trees):
    shapes, dtype = CASES[name]
    params = make_tree(shapes, dtype, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda p: p * 1e-3, make_tree(shapes, dtype, jax.random.PRNGKey(1)))
    row = {"params": sum(x.size for x in jax.tree.leaves(params))}
    row["a_resident_ms"], info = paged_ms(params, grads, args.iters, host=False)
    row["state_bytes"] = info["bytes"]
    assert info["bytes_on_host"] == 0, info
    row["b_host_over_the_bus_ms"], info = paged_ms(
      params, grads, args.iters, True, (0, 0), kind="managed"
    )
    assert info["bytes_on_device"] == 0 and info["streamed_steps"] == 0, info
    row["c_host_streamed_ms"], info = paged_ms(params, grads, args.iters, host=True)
    assert info["bytes_on_device"] == 0 and info["streamed_steps"] > 0, info
    assert info["bytes_pinned"] == info["bytes"], info
    row["streamed_bytes"] = info["streamed_bytes"]
    row["c_managed_streamed_ms"], info = paged_ms(params, grads, args.iters, True, kind="managed")
    assert info["streamed_steps"] > 0 and info["bytes_pinned"] == 0, info
    if n == 0:
      row["c_by_window"] = {}
      for w in args.windows:
        mib, buffers, *ctas = (int(x) for x in w.split("x"))
        shape = (mib * MIB, buffers, *ctas)
        kind = "managed" if ctas else "pinned"
        ms, _ = paged_ms(params, grads, args.iters, True, shape, kind)
        row["c_by_window"][f"{w} {kind}"] = ms
    floor = floor_ms(row["state_bytes"])
    row["d_floor_ms"], row["d_h2d_ms"], row["d_d2h_ms"] = floor["both"], floor["h2d"], floor["d2h"]
    row["pinned_alloc_s"] = floor["pinned_alloc_s"]
    row["e_adamw_pinned_host_ms"], row["e_state_memory_kinds"] = adamw_pinned_host_ms(
      params, grads, max(3, args.iters // 2)
    )
    # The extra time over a resident step, in units of the bus floor.
    for key, ms in (
      ("c", "c_host_streamed_ms"),
      ("c_managed", "c_managed_streamed_ms"),
      ("b", "b_host_over_the_bus_ms"),
    ):
      row[f"{key}_minus_a_over_d"] = (row[ms] - row["a_resident_ms"]) / row["d_floor_ms"]
    row["e_over_c"] = row["e_adamw_pinned_host_ms"] / row["c_host_streamed_ms"]
    row["c_over_a"] = row["c_host_streamed_ms"] / row["a_resident_ms"]
    out["trees"][name] = row
    print(name, json.dumps(row, indent=1), flush=True)
    del params, grads
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
