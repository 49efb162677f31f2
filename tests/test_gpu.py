"""CUDA backend: bit-identity with the CPU backend, paging, host placement and
release. Marked `gpu`; skipped without a GPU and the CUDA build."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_native_check, settled_registry_bytes
from oracle import BFLOAT16
from test_oracle import assert_bit_equal, extreme, spike

import optax_paged8bit as op


def _gpu():
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    return None


GPU = _gpu()
CPU = jax.devices("cpu")[0]
pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU"),
]

SHAPES = {
  "a": (4097,),  # partial last block
  "b": (1000, 300),  # 300000 elements: partial last block
  "c": (1024, 1024),
  "d": (3, 100),  # float32 moments
  "e": (2, 2500),  # 5000: 8-bit, partial block
}
DTYPES = {"float32": np.float32, "bfloat16": BFLOAT16, "float16": np.float16}
STEPS = 5


def inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: (rng.standard_normal(s) * 0.1).astype(dtype) for k, s in SHAPES.items()}
  grads = []
  for t in range(STEPS):
    g = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in SHAPES.items()}
    if t == 2:  # non-finite grads
      for k in g:
        flat = g[k].reshape(-1)
        flat[rng.choice(flat.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    if t == 3:  # finite spikes whose moments overflow (infinite in float16)
      g = {k: spike(v, k) for k, v in g.items()}
    grads.append({k: v.astype(dtype) for k, v in g.items()})
  return params, grads


def run_on(device, tx, params, grads, fused, donate=False):
  # donate: a fused step's params are donated, so that the call writes them in
  # place (_calls.PARAM_ALIAS_*); otherwise XLA copies them before the call,
  # and the params passed in must come out of the step unchanged.
  with jax.default_device(device):
    params = jax.device_put(params, device)
    state = tx.init(params)
    step = jax.jit(tx.fused_update if fused else tx.update, donate_argnums=(2,) if donate else ())
    outs = []
    for t, g in enumerate(grads):
      before = None if donate else jax.tree.map(np.asarray, params)
      out, state = step(jax.device_put(g, device), state, params)
      if before is not None:
        for k in before:
          assert_bit_equal(params[k], before[k], f"step {t}: param {k} passed in, after the step")
      params = out if fused else optax.apply_updates(params, out)
      outs.append(jax.tree.map(np.asarray, out))
    exported = jax.tree.map(np.asarray, op.export_state(state))
    op.release(state)
  return outs, exported


def assert_backends_agree(params, grads, kwargs, fused, factory=None, donate=False):
  """The same run on the CPU and on the GPU: outputs and states bit-equal."""
  factory = factory or op.paged_adamw8bit
  kwargs = {"lr": 1e-3, **kwargs}
  cpu_outs, cpu_state = run_on(CPU, factory(**kwargs), params, grads, fused, donate)
  gpu_outs, gpu_state = run_on(GPU, factory(**kwargs), params, grads, fused, donate)
  for t, (a, b) in enumerate(zip(cpu_outs, gpu_outs, strict=True)):
    for k in a:
      assert_bit_equal(b[k], a[k], f"step {t} leaf {k}")
  for i, (a, b) in enumerate(
    zip(jax.tree.leaves(cpu_state), jax.tree.leaves(gpu_state), strict=True)
  ):
    assert_bit_equal(b, a, f"state leaf {i}")


def nan_at_step_3(count):
  """A schedule whose value at step 3 no step can run with: that step is skipped."""
  return jnp.where(count == 2, jnp.nan, 1e-3)


CASES = [
  dict(weight_decay=1e-2, percentile_clipping=90),
  dict(weight_decay=0.0, percentile_clipping=100),
  dict(weight_decay=1e-2, percentile_clipping=100, block_wise=False),
  dict(weight_decay=1e-2, percentile_clipping=70, block_wise=False),
  dict(weight_decay=1e-2, args={"optim_bits": 32}),
  dict(lr=nan_at_step_3, weight_decay=1e-2, percentile_clipping=90),
  dict(lr=nan_at_step_3, weight_decay=1e-2, block_wise=False),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cpu_and_cuda_bit_identical(dtype, case, fused):
  params, grads = inputs(DTYPES[dtype], seed=case)
  kwargs = CASES[case]
  # Half the fused cases donate the params: every leaf then updates in place.
  assert_backends_agree(params, grads, kwargs, fused, donate=fused and case % 2 == 0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize("block_wise", [True, False], ids=["blocks", "whole"])
def test_cpu_and_cuda_bit_identical_at_extreme_magnitudes(block_wise, fused):
  # Zero, subnormal and tiny blocks, second moments that overflow, outliers:
  # every fallback of the kernel's fast paths (see test_oracle.extreme).
  rng = np.random.default_rng(21)
  shapes = {"a": (64, 256), "b": (40, 300), "c": (3, 100)}
  params = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
  grads = []
  for _ in range(STEPS):
    with np.errstate(over="ignore"):
      g = {
        k: extreme((rng.standard_normal(s) * 0.01).astype(np.float32), rng)
        for k, s in shapes.items()
      }
    grads.append(g)
  assert_backends_agree(params, grads, dict(weight_decay=1e-2, block_wise=block_wise), fused)


def small_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.standard_normal((2048, 1024)) * 0.1, jnp.float32),
    "b": jnp.asarray(rng.standard_normal(300) * 0.1, jnp.float32),
  }


@jax.jit
def random_grads(params, key):
  """Normal grads (scale 0.01) in the params' dtypes, made on the params'
  device: the big trees' hundreds of millions of samples drawn on the host
  took seconds a step."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  grads = [jax.random.normal(k, p.shape) * 0.01 for k, p in zip(keys, leaves, strict=True)]
  return treedef.unflatten([g.astype(p.dtype) for g, p in zip(grads, leaves, strict=True)])


def steps(tx, state, params, n, seed=10, before_step=None, donate_state=False):
  step = jax.jit(tx.fused_update, donate_argnums=(1, 2) if donate_state else (2,))
  key = jax.random.PRNGKey(seed)
  for t in range(n):
    grads = random_grads(params, jax.random.fold_in(key, t))
    if before_step is not None:
      before_step(state)
    params, state = step(grads, state, params)
  return params, state


def assert_same_results(params, state, p_ref, s_ref):
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_ref), strict=True):
    assert_bit_equal(np.asarray(a), np.asarray(b), "params")
  for a, b in zip(
    jax.tree.leaves(op.export_state(state)), jax.tree.leaves(op.export_state(s_ref)), strict=True
  ):
    assert_bit_equal(np.asarray(a), np.asarray(b), "state")


def test_page_out_then_step_equals_never_paged():
  tx = op.paged_adamw8bit(1e-3)
  p_ref, s_ref = steps(tx, tx.init(small_tree()), small_tree(), 2)
  p_ref, s_ref = steps(tx, s_ref, p_ref, 2, seed=12)
  params, state = steps(tx, tx.init(small_tree()), small_tree(), 2)
  total = state.layout.state_nbytes()
  assert op.residency(state) == {"bytes_on_device": total, "bytes_on_host": 0}
  assert op.page_out(state) == total
  assert op.residency(state) == {"bytes_on_device": 0, "bytes_on_host": total}
  params, state = steps(tx, state, params, 2, seed=12)  # no page_in: the step brings it back
  assert op.residency(state) == {"bytes_on_device": total, "bytes_on_host": 0}
  assert_same_results(params, state, p_ref, s_ref)
  op.release(state)
  op.release(s_ref)


def test_page_out_before_every_step_and_page_in():
  tx = op.paged_adamw8bit(1e-3)
  p_ref, s_ref = steps(tx, tx.init(small_tree()), small_tree(), 3)
  p, s = steps(tx, tx.init(small_tree()), small_tree(), 3, before_step=op.page_out)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
    assert_bit_equal(np.asarray(a), np.asarray(b), "params")
  op.page_out(s)
  assert op.page_in(s) == s.layout.state_nbytes()
  assert op.residency(s)["bytes_on_host"] == 0
  op.release(s)
  op.release(s_ref)


def test_forced_host_placement_gives_the_same_results():
  tx = op.paged_adamw8bit(1e-3, percentile_clipping=80)
  p_ref, s_ref = steps(tx, tx.init(small_tree()), small_tree(), 3)
  op.set_device_memory_budget(0)
  try:
    p, s = steps(tx, tx.init(small_tree()), small_tree(), 3)
  finally:
    op.set_device_memory_budget(None)
  res = op.residency(s)
  assert res == {"bytes_on_device": 0, "bytes_on_host": s.layout.state_nbytes()}
  assert_same_results(p, s, p_ref, s_ref)
  op.page_out(s)  # host-placed state does not move
  assert op.residency(s)["bytes_on_device"] == 0
  op.release(s)
  op.release(s_ref)


def mostly(found, where, total):
  """At least 90% of `total` bytes measured `where` (the probe times one
  load per 2 MiB: a chunk may read slowly by chance, or be migrated by the
  driver on its own)."""
  assert found["bytes_on_device"] + found["bytes_on_host"] == total, found
  assert found[f"bytes_on_{where}"] >= 0.9 * total, found


def test_measure_residency_finds_where_the_pages_are():
  tx = op.paged_adamw8bit(1e-3)
  tree = lambda: {**small_tree(), "v": jnp.full((64, 1 << 20), 0.01, jnp.float32)}
  params, state = steps(tx, tx.init(tree()), tree(), 2)
  total = state.layout.state_nbytes()  # 137 MB: 66 chunks
  found = op.measure_residency(state)
  assert found["host_load_cycles"] > 2 * found["device_load_cycles"] > 0, found
  mostly(found, "device", total)
  op.page_out(state)
  mostly(op.measure_residency(state), "host", total)
  params, state = steps(tx, state, params, 1)
  mostly(op.measure_residency(state), "device", total)
  op.set_device_memory_budget(0)
  try:
    _, placed = steps(tx, tx.init(tree()), tree(), 1)
  finally:
    op.set_device_memory_budget(None)
  mostly(op.measure_residency(placed), "host", total)
  op.release(state)
  op.release(placed)


def big_tree():
  return {**small_tree(), "v": jnp.full((600, 1 << 20), 0.01, jnp.bfloat16)}


def evict_by_a_spike(state):
  """Plain device allocations of 1 GiB until one fails (never managed memory
  beyond what is free): the driver evicts the state to make room. Returns
  where the library placed the state and where it was measured during the
  spike; the spike is freed on return."""
  op.measure_residency(state)  # its calibration buffers exist before the spike
  jax.block_until_ready(state)
  try:
    held = op._ffi._ops.fill_device_memory(0, 1 << 30, 1 << 62)
    placed = op.residency(state)
    during = op.measure_residency(state)
  finally:
    op._ffi._ops.free_device_fill()
  assert held > 0
  return placed, during


class eviction_watch:
  """The eviction watch on or off for a block, then as it was."""

  def __init__(self, on):
    self.on = on

  def __enter__(self):
    self.before = op.set_eviction_watch(self.on)

  def __exit__(self, *exc):
    op.set_eviction_watch(self.before)


def evictions(state, key):
  return [i[key] for i in op.slot_info(state)]


def test_a_memory_spike_evicts_the_state_and_the_next_steps_bring_it_back_bit_identical():
  """With the eviction watch off: after the spike is freed, the next step
  sees free memory risen, prefetches the state back, and every step is
  bit-identical to an unpressured run."""
  tx = op.paged_adamw8bit(1e-3)
  p_ref, s_ref = steps(tx, tx.init(big_tree()), big_tree(), 2)
  p_ref, s_ref = steps(tx, s_ref, p_ref, 3, seed=12)
  params, state = steps(tx, tx.init(big_tree()), big_tree(), 2)
  total = state.layout.state_nbytes()  # 1.2 GB: more than a chunk of the spike
  jax.block_until_ready(params)
  with eviction_watch(False):
    placed, during = evict_by_a_spike(state)
    assert placed == {"bytes_on_device": total, "bytes_on_host": 0}  # as placed
    assert during["bytes_on_host"] > 0, during  # evicted by the driver
    time.sleep(0.5)  # nothing brings it back before the step (found[0])
    found = []
    params, state = steps(
      tx, state, params, 3, seed=12, before_step=lambda s: found.append(op.measure_residency(s))
    )
  mostly(found[0], "host", total)
  for after in found[1:]:  # before steps 2 and 3: the first step brought it back
    mostly(after, "device", total)
  assert_same_results(params, state, p_ref, s_ref)
  # The first step after the spike saw the eviction; the unpressured run's
  # steps and the later ones saw none.
  assert evictions(state, "evictions_seen") == [1]
  assert evictions(state, "evictions_restored") == [0]
  assert evictions(s_ref, "evictions_seen") == [0]
  op.release(state)
  op.release(s_ref)


def wait_for_restores(state, n, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while sum(evictions(state, "evictions_restored")) < n and time.monotonic() < deadline:
    time.sleep(0.01)
  return sum(evictions(state, "evictions_restored"))


def test_the_eviction_watch_brings_an_evicted_state_back_before_the_next_step():
  """With the watch on (the default): once the spike is freed, the state's
  pages come back to the device with no step, the next step finds nothing
  to prefetch, and every step is bit-identical to an unpressured run. A
  paged-out state is left on the host."""
  assert op.eviction_watch()
  tx = op.paged_adamw8bit(1e-3)
  p_ref, s_ref = steps(tx, tx.init(big_tree()), big_tree(), 2)
  p_ref, s_ref = steps(tx, s_ref, p_ref, 3, seed=12)
  params, state = steps(tx, tx.init(big_tree()), big_tree(), 2)
  _, parked = steps(tx, tx.init(small_tree()), small_tree(), 1)
  op.page_out(parked)
  total = state.layout.state_nbytes()
  jax.block_until_ready(params)
  _, during = evict_by_a_spike(state)
  assert during["bytes_on_host"] > 0, during
  assert wait_for_restores(state, 1) == 1
  mostly(op.measure_residency(state), "device", total)  # before any step
  params, state = steps(tx, state, params, 3, seed=12)
  assert_same_results(params, state, p_ref, s_ref)
  assert evictions(state, "evictions_seen") == [0]  # the steps found it back
  assert evictions(state, "evictions_restored") == [1]
  # The paged-out state was not brought back.
  assert op.residency(parked)["bytes_on_device"] == 0
  assert evictions(parked, "evictions_restored") == [0]
  for s in (state, s_ref, parked):
    op.release(s)


JAX_SPIKE_SCRIPT = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import optax_paged8bit as op

tx = op.paged_adamw8bit(1e-3)
make = lambda: {"v": jnp.full((600, 1 << 20), 0.01, jnp.bfloat16), "b": jnp.ones(300)}
g = jax.tree.map(lambda p: (p * 0.1).astype(p.dtype), make())
step = jax.jit(tx.fused_update, donate_argnums=(1, 2))

def run(spike):
  params, state = make(), tx.init(make())
  for _ in range(2):
    params, state = step(g, state, params)
  found = {}
  if spike:
    op.measure_residency(state)
    jax.block_until_ready(params)
    held = []
    try:
      while True:  # JAX arrays of 1 GiB until the platform allocator fails
        held.append(jnp.zeros((1 << 28,), jnp.float32).block_until_ready())
    except jax.errors.JaxRuntimeError:
      pass
    found["spike_gib"] = len(held)
    found["during"] = op.measure_residency(state)
    del held
    deadline = time.monotonic() + 10
    while op.slot_info(state)[0]["evictions_restored"] == 0 and time.monotonic() < deadline:
      time.sleep(0.01)
    found["before_step"] = op.measure_residency(state)
  params, state = step(g, state, params)
  found["info"] = op.slot_info(state)[0]
  out = [np.asarray(x) for x in jax.tree.leaves(params)]
  out += [np.asarray(x) for x in jax.tree.leaves(op.export_state(state))]
  op.release(state)
  return out, found

ref, _ = run(False)
got, found = run(True)
found["identical"] = all(
  a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(ref, got, strict=True)
)
print(json.dumps(found))
"""


def test_the_eviction_watch_restores_a_state_evicted_by_jax_arrays():
  """A process whose JAX allocator hands memory back (no preallocation, the
  platform allocator) fills the GPU with JAX arrays until allocation fails:
  the driver evicts the state. Once the arrays are freed the watch brings it
  back before the next step, and the step is bit-identical to a run with no
  spike."""
  out = subprocess.run(
    [sys.executable, "-c", JAX_SPIKE_SCRIPT],
    capture_output=True,
    text=True,
    timeout=300,
    env={
      **os.environ,
      "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
      "XLA_PYTHON_CLIENT_ALLOCATOR": "platform",
    },
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  found = json.loads(out.stdout.strip().splitlines()[-1])
  total = found["info"]["bytes"]
  assert found["spike_gib"] > 0, found
  assert found["during"]["bytes_on_host"] > 0, found  # evicted by the driver
  mostly(found["before_step"], "device", total)  # back before the step
  assert found["info"]["evictions_restored"] == 1 and found["info"]["evictions_seen"] == 0, found
  assert found["identical"], found


def test_spikes_beside_a_training_thread_change_nothing():
  """A thread trains (donated state and params) while the main thread makes
  spikes that evict its state and frees them: the watch's prefetches and the
  steps' own run at any moment against each other, and the training ends
  bit-identical to the same training with no spike."""
  tx = op.paged_adamw8bit(1e-3)
  n = 200
  g0 = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype) * jnp.sin(p), big_tree())
  scaled = jax.jit(lambda g, t: jax.tree.map(lambda x: x * (1 + t % 3).astype(x.dtype), g))
  step = jax.jit(tx.fused_update, donate_argnums=(1, 2))

  def run(taken):
    params, state = big_tree(), tx.init(big_tree())
    for t in range(n):
      params, state = step(scaled(g0, t), state, params)
      taken.append(t)
    return params, state

  p_ref, s_ref = run([])
  result, taken = {}, []

  def train():
    result["out"] = run(taken)

  thread = threading.Thread(target=train)
  thread.start()
  spikes = 0
  while thread.is_alive():
    if len(taken) < 3:  # the state exists after the first step
      time.sleep(0.01)
      continue
    try:
      spikes += op._ffi._ops.fill_device_memory(0, 1 << 30, 1 << 62) > 0
      time.sleep(0.02)
    finally:
      op._ffi._ops.free_device_fill()
    time.sleep(0.03)
  thread.join()
  params, state = result["out"]
  assert spikes >= 1
  assert_same_results(params, state, p_ref, s_ref)
  [info] = op.slot_info(state)
  assert info["step"] == n
  op.release(state)
  op.release(s_ref)


def test_collector_frees_dropped_gpu_states_and_keeps_held_ones():
  ops = op._ffi._ops
  tx = op.paged_adamw8bit(1e-3)
  registry0 = settled_registry_bytes()
  placed0 = ops.managed_device_bytes(GPU.id)
  _, kept = steps(tx, tx.init(small_tree()), small_tree(), 1)
  _, dropped = steps(tx, tx.init(small_tree()), small_tree(), 1)
  nbytes = kept.layout.state_nbytes()
  del dropped
  assert op.collect() == nbytes
  assert ops.managed_device_bytes(GPU.id) == placed0 + nbytes

  # Collections between the steps of a jitted loop (the step maybe in flight,
  # the old state donated) free nothing it uses and change no bit.
  def look(state):
    gc.collect()
    assert op.collect() == 0

  p_ref, s_ref = steps(tx, tx.init(small_tree()), small_tree(), 3, donate_state=True)
  p, s = steps(tx, tx.init(small_tree()), small_tree(), 3, donate_state=True, before_step=look)
  assert_same_results(p, s, p_ref, s_ref)
  del kept, s, s_ref
  assert op.collect() == 3 * nbytes
  assert ops.managed_device_bytes(GPU.id) == placed0
  assert op._ffi.total_bytes() == registry0


def test_a_retired_state_is_paged_out_and_its_next_step_brings_it_back_exactly():
  """The collector's thread retires a state that no array holds before it
  frees it: its GPU memory goes to host RAM at once. A state retired by
  mistake (its step was in flight) is paged back in by that step."""
  ops = op._ffi._ops
  tx = op.paged_adamw8bit(1e-3)
  params, state = steps(tx, tx.init(small_tree()), small_tree(), 1)
  p_ref, s_ref = steps(tx, tx.init(small_tree()), small_tree(), 1)
  p_ref, s_ref = steps(tx, s_ref, p_ref, 2)  # the gradients the retired state's 2 steps get
  jax.block_until_ready(state)
  [handle] = op._ffi.handle_values(state.handle)
  nbytes = state.layout.state_nbytes()
  freed, busy, retired, *_ = ops.collect([], [handle], ops.epoch(), 1, 3600.0, 0.0)
  assert (freed, busy, retired) == (0, 0, [handle])
  assert ops.retire(handle) == nbytes
  assert op.residency(state) == {"bytes_on_device": 0, "bytes_on_host": nbytes}
  params, state = steps(tx, state, params, 2)  # the step after retirement brings it back
  assert op.residency(state)["bytes_on_host"] == 0
  assert_same_results(params, state, p_ref, s_ref)
  op.release((state, s_ref))


def test_a_jitted_sweep_holds_at_most_two_states_on_the_device():
  """A jitted create_train_state and a jitted, donated step per run of 3
  seconds or more, no release or collect (tests/collector_stress.py sweep,
  run on this GPU): at most 2 states on the device at each run's end."""
  script = str(Path(__file__).parent / "collector_stress.py")
  out = subprocess.run(
    [sys.executable, script, "sweep", "linen", "--runs", "6", "--size", "8192", "--min-run-s", "3"],
    capture_output=True,
    text=True,
    timeout=600,
    # This process holds its share of the GPU: the child takes what it uses.
    env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["platform"] == "gpu" and max(result["device_states_at_run_end"]) <= 2, result


def test_100_cycles_without_release_hold_at_most_two_states_on_the_device():
  ops = op._ffi._ops
  tx = op.paged_adamw8bit(1e-3)
  registry0 = settled_registry_bytes()
  placed0 = ops.managed_device_bytes(GPU.id)
  peak = 0
  for _ in range(100):
    _, state = steps(tx, tx.init(small_tree()), small_tree(), 1)
    nbytes = state.layout.state_nbytes()
    del state  # dropped, not released: tx.init's collection frees it
    peak = max(peak, ops.managed_device_bytes(GPU.id) - placed0)
  assert nbytes <= peak <= 2 * nbytes
  op.collect()
  assert ops.managed_device_bytes(GPU.id) == placed0
  assert op._ffi.total_bytes() == registry0


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096


def test_release_frees_and_100_cycles_leave_memory_where_it_started():
  ops = op._ffi._ops
  tx = op.paged_adamw8bit(1e-3)

  def cycle():
    params = small_tree()
    _, state = steps(tx, tx.init(params), params, 1)
    jax.block_until_ready(state)
    assert op.release(state) == state.layout.state_nbytes()

  # Warm-up cycles fill JAX's caches and the driver's pool of managed-memory
  # chunks (which cudaMemGetInfo counts as used until reused).
  free = []
  for i in range(200):
    if i == 100:
      registry0 = settled_registry_bytes()
      placed0, rss0 = ops.managed_device_bytes(GPU.id), _rss_bytes()
    if i % 20 == 0:
      free.append(ops.device_memory_info(GPU.id)[0])
    cycle()
  gc.collect()
  free.append(ops.device_memory_info(GPU.id)[0])
  print("free device memory every 20 cycles (MiB):", [f >> 20 for f in free])
  assert ops.managed_device_bytes(GPU.id) == placed0
  assert op._ffi.total_bytes() == registry0
  # The driver caches freed managed-memory chunks and reclaims them in bursts,
  # so free memory saws by tens of MiB (seen: 120 MiB). A leak of this test's
  # 8.4 MB state per cycle would lose 840 MiB over the 100 measured cycles.
  assert free[-1] >= free[5] - (160 << 20), [f >> 20 for f in free]
  assert _rss_bytes() - rss0 < 64 << 20, (rss0, _rss_bytes())


def test_states_released_on_threads_of_their_own_give_their_memory_back():
  """A data-loader thread, or the collector's, drops the last reference:
  that thread has no CUDA context of its own, and freeing must still give
  the memory back (80 cycles of a 33 MB state; a leak would lose 2.6 GiB)."""
  ops = op._ffi._ops
  tx = op.paged_adamw8bit(1e-3)
  step = jax.jit(tx.fused_update)
  with jax.default_device(GPU):
    params = {"w": jnp.zeros((4096, 4096), jnp.float32)}
    grads = {"w": jnp.full((4096, 4096), 0.01, jnp.float32)}

  def cycle():
    with jax.default_device(GPU):
      _, state = step(grads, tx.init(params), params)
    jax.block_until_ready(state)
    freed = []
    t = threading.Thread(target=lambda: freed.append(op.release(state)))
    t.start()
    t.join()
    assert freed == [state.layout.state_nbytes()]

  for _ in range(20):  # warm-up: JAX's caches, the driver's pool of managed chunks
    cycle()
  placed0 = ops.managed_device_bytes(GPU.id)
  free0 = ops.device_memory_info(GPU.id)[0]
  for _ in range(80):
    cycle()
  gc.collect()
  free1 = ops.device_memory_info(GPU.id)[0]
  assert ops.managed_device_bytes(GPU.id) == placed0
  assert free1 >= free0 - (160 << 20), (free0 >> 20, free1 >> 20)


@pytest.mark.parametrize("calls", [1, 3], ids=["one_call", "three_calls"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
def test_more_leaves_than_one_launch_holds(fused, calls, monkeypatch):
  """700 leaves need three launch tables (256 leaves each): still one result.
  three_calls: the step split into 3 custom calls (_calls.update_chunks), two
  staging their moments and the last committing them, the fused params
  donated."""
  if calls > 1:
    monkeypatch.setattr(op._calls, "UPDATE_ONE_CALL_LEAVES", 256)
    monkeypatch.setattr(op._calls, "UPDATE_CALL_LEAVES", 256)
    assert len(op._calls.update_chunks(700)) == calls
  rng = np.random.default_rng(7)
  params = {
    f"l{i:03d}": (rng.standard_normal(300 + 37 * i) * 0.1).astype(np.float32) for i in range(700)
  }
  grads = [
    {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in params.items()}
    for _ in range(3)
  ]
  kwargs = dict(min_8bit_size=4096, percentile_clipping=90)
  assert_backends_agree(params, grads, kwargs, fused, donate=fused and calls > 1)


def test_fast_paths_match_correctly_rounded_intrinsics(tmp_path):
  # The CUDA quantizer divides by a block's scale with the fast path of
  # __fdiv_rn on operands scaled by a power of two, the reciprocal hoisted
  # (adam8bit.h: ScaleDivisor). Every divisor significand at 11 exponents of
  # the route's range, 256 dividends each, against __fdiv_rn: the same
  # quotient, or both below the magnitude where every code is a zero's. The
  # step's square roots take __fsqrt_rn's fast path for a whole lane
  # (SqrtEach): every float32 of its domain against __fsqrt_rn. bfloat16
  # params round by the hardware conversion of two floats at once
  # (Bf16PairRounding): every float32 but NaN, in either half, against
  # RoundToType. The step's divisions take __fdiv_rn's fast path
  # for a whole lane (StepParamsEach, DivFastDomain): every divisor
  # significand at 10 exponents of [2^-51, 2^65), 64 dividends of [2^-59,
  # 2^75] each, against __fdiv_rn bit for bit.
  # This check alone needs nvcc (a host program around the kernels' math; the
  # product compiles its kernels with NVRTC). NVCC names one off PATH.
  nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
  assert nvcc, "nvcc (or NVCC=/path/to/nvcc) is needed for this check"
  words = run_native_check(
    [nvcc, "-std=c++17", "-O3", "--fmad=false", "-arch=native"],
    "fast_path_check.cu",
    ["256"],
    tmp_path,
  )
  assert words[:4] == ["pairs", str(11 * (1 << 23) * 256), "mismatches", "0"], words
  assert words[6:8] == ["route", "0"], words
  domain = 0x7F800000 - 0x0D000000  # [2^-101, 2^128)
  assert words[8:12] == ["sqrt", str(domain), "sqrt_mismatches", "0"], words
  not_nan = (1 << 32) - 2 * ((1 << 23) - 1)
  assert words[12:16] == ["bf16", str(not_nan), "bf16_mismatches", "0"], words
  assert words[16:20] == ["div", str(10 * (1 << 23) * 64), "div_mismatches", "0"], words
  assert words[20:22] == ["sign_errors", "0"], words  # FastCode2OfUnsigned's premise


def test_update_kernels_keep_every_value_in_registers():
  # The update kernels as built here: no stack frame and no local memory, at
  # most 64 registers a thread (one CTA of 1024 threads per SM). A device
  # function the compiler does not inline, or spilled registers, would break
  # this; a lambda per block that the H200's build did not inline made the
  # fused step 16-39% slower (benchmarks/RESULTS.md).
  nvcc = shutil.which("nvcc")
  cuobjdump = shutil.which("cuobjdump") or str(Path(nvcc or "").resolve().parent / "cuobjdump")
  assert Path(cuobjdump).exists(), "cuobjdump (CUDA toolkit) is needed for this check"
  arch = int(GPU.compute_capability.replace(".", ""))
  cubins, _ = op._ffi._ops.compile_kernels(arch)  # this GPU's kernels, as NVRTC compiled them
  out = "".join(
    subprocess.run([cuobjdump, "-res-usage", c], capture_output=True, text=True, check=True).stdout
    for c in cubins
  )
  pattern = r"Function (op8_update_\w+):\s*\n\s*REG:(\d+) STACK:(\d+) \S+ LOCAL:(\d+)"
  usage = re.findall(pattern, out)
  kinds = ("op8_update_params_", "op8_update_updates_")
  assert {name for name, *_ in usage} == {k + t for k in kinds for t in ("f32", "bf16", "f16")}
  for name, registers, stack, local in usage:
    resources = (name, registers, stack, local)
    assert (int(stack), int(local)) == (0, 0) and int(registers) <= 64, resources


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
def test_adamw8bit_cpu_and_cuda_bit_identical(fused):
  params, grads = inputs(np.float32, seed=3)
  assert_backends_agree(
    params, grads, dict(percentile_clipping=90), fused, op.adamw8bit, donate=fused
  )


def test_export_import_and_an_interrupted_step_on_the_gpu():
  tx = op.paged_adamw8bit(1e-3)
  p_ref, s_ref = steps(tx, tx.init(small_tree()), small_tree(), 2)
  p_ref, s_ref = steps(tx, s_ref, p_ref, 2, seed=12)
  params, state = steps(tx, tx.init(small_tree()), small_tree(), 2)
  exported = op.export_state(state)  # the count comes back from the device
  assert int(exported.count) == 2
  imported = op.import_state(tx.init(small_tree()), exported)  # a new handle, written on device
  assert int(imported.handle) != int(state.handle) and int(imported.count) == 2
  params, imported = steps(tx, imported, params, 2, seed=12)
  assert_same_results(params, imported, p_ref, s_ref)
  # An interrupted step: dispatched, its results dropped; the state last held exports
  # the moments as they are, with their true count.
  held = imported
  dropped = jax.jit(tx.fused_update)(jax.tree.map(jnp.ones_like, params), held, params)
  jax.block_until_ready(dropped)
  del dropped
  with pytest.warns(op.InterruptedStepWarning):
    after = op.export_state(held)
  assert int(after.count) == 5
  op.release((state, imported, s_ref))


def test_a_changed_injected_layout_argument_fails_on_the_gpu():
  tx = optax.inject_hyperparams(op.paged_adamw8bit)(lr=1e-3)
  with jax.default_device(GPU):
    params = jax.device_put(small_tree(), GPU)
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step(params, state, params)
    state.hyperparams["min_8bit_size"] = jnp.asarray(16, jnp.int32)
    with pytest.raises(Exception, match="min_8bit_size is 16 in this update"):
      jax.block_until_ready(step(params, state, params))


def test_flax_fused_forms_on_the_gpu():
  import test_fused

  with jax.default_device(GPU):
    test_fused.test_fused_train_state_and_fused_chain()
    test_fused.test_fused_nnx_optimizer_matches_the_fused_step()
