"""Paging under memory pressure on one GPU: what a memory spike does to a paged
state and to the steps after it.

Run it with JAX's allocator handing memory back, as a process that wants a
spike to reach the state's HBM must:

    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \\
      python benchmarks/paging_pressure.py --json out.json

A 64 x (4096, 4096) float32 tree (1.07e9 params, a 2.03 GiB state) takes fused
steps (jitted, params and state donated). Scenarios, each timed in ms per
step (each step awaited):

- resident: the median step;
- page_out: `page_out`, then one step (the step prefetches the state back);
- spike: plain 1 GiB `cudaMalloc`s until one fails (the driver evicts the
  state to make room; the last one is given back), `residency()` and
  `measure_residency()` during the spike, the spike freed, then the next 5
  steps, twice;
- jax spike: the same spike made of JAX arrays (`jnp.zeros` of 1 GiB until
  allocation fails), which reaches the state only with an allocator that does
  not preallocate, twice;
- both spikes with the eviction watch on (the default: it brings the state
  back once the spike is freed, before the step) and off (the first step
  after the spike finds free memory risen and prefetches the state back);
- with the watch on, a third plain spike whose step comes at once (it waits
  for the watch's prefetch or makes its own);
- resident steps with the watch on and off, alternating, for what the watch
  costs a step that no spike disturbs;
- each step after page_out or a spike runs `--settle` seconds (1) after the
  state was paged out or the spike freed;
- free memory (`cudaMemGetInfo`) with the state resident and after
  `page_out`, and how much a spike gets in each case;
- what the eviction check costs a step: one `cudaMemGetInfo` (timed here
  through Python, an upper bound), and the evictions each phase found
  (`slot_info`'s `evictions_seen`: none may be found in resident steps).

Never allocates managed memory beyond what is free: the state is placed by
the library's guard; the spikes are plain device allocations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import optax_paged8bit as op
from optax_paged8bit import _ffi

GIB = 1 << 30


def make_tree(n, key):
  keys = jax.random.split(key, n)
  return {
    f"w{i:02d}": jax.random.normal(k, (4096, 4096), jnp.float32) * 0.02 for i, k in enumerate(keys)
  }


def timed(step, carry):
  t0 = time.perf_counter()
  carry = step(*carry)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) * 1e3, carry


def free_bytes():
  return int(_ffi._ops.device_memory_info(0)[0])


def spike():
  """Plain 1 GiB device allocations until one fails (the last one given back,
  leaving the driver room for page faults); returns the bytes held."""
  return int(_ffi._ops.fill_device_memory(0, GIB, 1 << 62))


def evictions(state, key="evictions_seen"):
  return sum(info[key] for info in op.slot_info(state))


def measured(state):
  """measure_residency, or why it could not tell (the benchmark goes on)."""
  try:
    return op.measure_residency(state)
  except ValueError as e:
    return {"error": str(e)}


def jax_spike():
  held = []
  try:
    while True:
      held.append(jnp.zeros((GIB // 4,), jnp.float32).block_until_ready())
  except jax.errors.JaxRuntimeError:  # RESOURCE_EXHAUSTED
    pass
  return held


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=64)
  ap.add_argument("--iters", type=int, default=15)
  ap.add_argument(
    "--settle", type=float, default=1.0, help="seconds between freeing a spike and the step"
  )
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("paging_pressure.py needs a GPU")

  tx = op.paged_adamw8bit(2e-4)
  params = make_tree(args.leaves, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: p * 1e-3, make_tree(args.leaves, jax.random.PRNGKey(1)))
  step = jax.jit(lambda p, s: tx.fused_update(grads, s, p), donate_argnums=(0, 1))
  carry = (params, tx.init(params))
  for _ in range(3):
    _, carry = timed(step, carry)
  state_bytes = op.residency(carry[1])["bytes_on_device"]
  out = {
    "device": str(jax.devices()[0].device_kind),
    "jax": jax.__version__,
    "params": sum(x.size for x in jax.tree.leaves(params)),
    "state_bytes": state_bytes,
  }
  rows = []

  def row(scenario, ms, **extra):
    rows.append({"scenario": scenario, "ms": ms, **extra})
    print(f"{scenario:58s} {ms if isinstance(ms, str) else f'{ms:9.2f}'} {extra or ''}", flush=True)

  # Resident steps.
  resident = []
  for _ in range(args.iters):
    ms, carry = timed(step, carry)
    resident.append(ms)
  row("resident step", statistics.median(resident), evictions_seen=evictions(carry[1]))
  t0 = time.perf_counter()
  for _ in range(1000):
    free_bytes()
  query_us = (time.perf_counter() - t0) * 1e3
  out["cudaMemGetInfo_us"] = query_us
  out["check_share_of_resident_step"] = query_us / 1e3 / statistics.median(resident)
  print(
    f"cudaMemGetInfo through Python: {query_us:.1f} us, "
    f"{100 * out['check_share_of_resident_step']:.2f}% of a resident step"
  )

  # page_out, then one step.
  page_out_ms = []
  for _ in range(5):
    op.page_out(carry[1])
    time.sleep(args.settle)
    ms, carry = timed(step, carry)
    page_out_ms.append(ms)
    for _ in range(2):
      _, carry = timed(step, carry)
  row(
    "page_out, then a step",
    statistics.median(page_out_ms),
    each=page_out_ms,
    evictions_seen=evictions(carry[1]),
  )

  # Free memory and what a spike gets, resident and paged out.
  jax.block_until_ready(carry)
  free_resident = free_bytes()
  op.page_out(carry[1])
  free_paged_out = free_bytes()
  got_paged_out = spike()
  _ffi._ops.free_device_fill()
  _, carry = timed(step, carry)
  out["free_resident"], out["free_paged_out"] = free_resident, free_paged_out
  out["spike_bytes_after_page_out"] = got_paged_out
  print(
    f"cudaMemGetInfo free: resident {free_resident / GIB:.2f} GiB, after page_out "
    f"{free_paged_out / GIB:.2f} GiB; a spike after page_out got {got_paged_out / GIB:.0f} GiB"
  )

  # Resident steps with the eviction watch on and off, alternating blocks.
  resident_by_watch = {True: [], False: []}
  for _ in range(4):
    for watch in (True, False):
      op.set_eviction_watch(watch)
      for _ in range(args.iters):
        ms, carry = timed(step, carry)
        resident_by_watch[watch].append(ms)
  op.set_eviction_watch(True)
  for watch in (True, False):
    row(
      f"resident step, watch {'on' if watch else 'off'}",
      statistics.median(resident_by_watch[watch]),
    )
  out["resident_watch_on_over_off"] = statistics.median(
    resident_by_watch[True]
  ) / statistics.median(resident_by_watch[False])

  spikes = {True: [], False: []}
  jax_spikes = {True: [], False: []}
  for watch in (True, False):
    op.set_eviction_watch(watch)
    label = f"watch {'on' if watch else 'off'}"
    # The spike, then the next steps (repeated: the driver's eviction varies);
    # with the watch on, a third spike whose step comes at once.
    for settle in (args.settle, args.settle, 0.0)[: 3 if watch else 2]:
      for _ in range(2):
        _, carry = timed(step, carry)
      jax.block_until_ready(carry)
      measured(carry[1])  # makes the probe's reference buffers
      free_before = free_bytes()
      seen_before = evictions(carry[1])
      restored_before = evictions(carry[1], "evictions_restored")
      got = spike()
      during_placed = op.residency(carry[1])
      during_measured = measured(carry[1])
      _ffi._ops.free_device_fill()
      time.sleep(settle)
      before_step = measured(carry[1]) if settle else None
      after = []
      for _ in range(5):
        ms, carry = timed(step, carry)
        after.append(ms)
      row(
        f"spike, then a step ({label}{', at once' if not settle else ''})",
        after[0],
        next_steps=after,
        spike_gib=got / GIB,
        free_before_gib=free_before / GIB,
        residency_during=during_placed,
        measured_during=during_measured,
        measured_before_step=before_step,
        measured_after_steps=measured(carry[1]),
        evictions_found=evictions(carry[1]) - seen_before,
        evictions_restored=evictions(carry[1], "evictions_restored") - restored_before,
      )
      if settle:
        spikes[watch].append(after[0])
      else:
        out["step_at_once_after_spike_ms"] = after[0]
    for _ in range(3):
      _, carry = timed(step, carry)

    # The same spike made of JAX arrays (twice).
    for _ in range(2):
      for _ in range(2):
        _, carry = timed(step, carry)
      jax.block_until_ready(carry)
      seen_before = evictions(carry[1])
      restored_before = evictions(carry[1], "evictions_restored")
      held = jax_spike()
      during = measured(carry[1])
      got = sum(x.nbytes for x in held)
      del held
      time.sleep(args.settle)
      before_step = measured(carry[1])
      ms, carry = timed(step, carry)
      row(
        f"jax-array spike, then a step ({label})",
        ms,
        spike_gib=got / GIB,
        measured_during=during,
        measured_before_step=before_step,
        evictions_found=evictions(carry[1]) - seen_before,
        evictions_restored=evictions(carry[1], "evictions_restored") - restored_before,
      )
      jax_spikes[watch].append(ms)
  op.set_eviction_watch(True)
  page_out_median = statistics.median(page_out_ms)
  for watch in (True, False):
    suffix = "" if watch else "_watch_off"
    out[f"ratio_after_spike_vs_page_out{suffix}"] = statistics.mean(spikes[watch]) / page_out_median
    out[f"ratio_after_jax_spike_vs_page_out{suffix}"] = (
      statistics.mean(jax_spikes[watch]) / page_out_median
    )
    out[f"ratio_after_spike_vs_resident{suffix}"] = statistics.mean(
      spikes[watch]
    ) / statistics.median(resident)

  out["rows"] = rows
  for watch in (True, False):
    suffix = "" if watch else "_watch_off"
    print(
      f"watch {'on' if watch else 'off'}: step after a spike / step after page_out: "
      f"{out['ratio_after_spike_vs_page_out' + suffix]:.2f} (JAX-array spike: "
      f"{out['ratio_after_jax_spike_vs_page_out' + suffix]:.2f}); / resident step: "
      f"{out['ratio_after_spike_vs_resident' + suffix]:.1f}"
    )
  print(f"resident step, watch on / off: {out['resident_watch_on_over_off']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1, default=str)
  op.release(carry[1])


if __name__ == "__main__":
  main()
