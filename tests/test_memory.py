"""Paging API on the CPU backend (host memory: nothing moves) and its checks;
the GPU behaviour is in test_gpu.py."""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import settled_registry_bytes

import optax_paged8bit as op


def test_cpu_states_live_on_the_host():
  params = {"w": jnp.zeros((64, 512)), "b": jnp.zeros(10)}
  tx = op.paged_adamw8bit()
  state = tx.init(params)
  assert op.residency(state) == {"bytes_on_device": 0, "bytes_on_host": 0}  # not yet allocated
  _, state = tx.update(params, state, params)
  nbytes = state.layout.state_nbytes()
  assert op.residency(state) == {"bytes_on_device": 0, "bytes_on_host": nbytes}
  assert op.page_out(state) == 0 and op.page_in(state) == 0
  found = op.measure_residency(state)
  assert (found["bytes_on_device"], found["bytes_on_host"]) == (0, nbytes)
  [info] = op.slot_info(state)
  assert info["platform"] == "cpu" and info["step"] == 1 and info["bytes"] == nbytes
  assert info["evictions_seen"] == 0  # a GPU slot counts the evictions it found
  assert op.state_nbytes(state) == nbytes + 4 + 4  # + count and handle
  op.release(state)


def test_device_memory_budget_is_checked():
  with pytest.raises(ValueError, match="nbytes must be None or an int >= 0, got -5"):
    op.set_device_memory_budget(-5)
  op.set_device_memory_budget(1 << 30)
  op.set_device_memory_budget(None)


# The collector: a paged state's registry memory is freed once no live
# jax.Array holds its handle.
ops = op._ffi._ops
PARAMS = {"w": jnp.full((64, 512), 0.5), "b": jnp.zeros(10)}


def grads(i):
  return jax.tree.map(lambda p: jnp.full(p.shape, 0.01 * (i + 1), p.dtype), PARAMS)


def stepped(tx, n=1):
  state = tx.init(PARAMS)
  params = PARAMS
  for i in range(n):
    params, state = tx.fused_update(grads(i), state, params)
  return params, state


def test_collect_frees_dropped_states_and_keeps_held_ones():
  check_collect_frees_dropped_and_keeps_held()


def test_uint32_arrays_that_are_no_handle_do_not_disturb_the_collector():
  strays = [jnp.uint32(0), jnp.uint32(2**31 + 5), jnp.uint32(2**32 - 1)]  # live during the check
  check_collect_frees_dropped_and_keeps_held()
  del strays


def test_the_collector_skips_a_platform_this_process_has_no_backend_for(monkeypatch):
  """JAX_PLATFORMS=cuda leaves out the CPU backend, and asking for its arrays
  raises 'Unknown backend cpu': a scan (every tx.init once a state exists)
  must skip a platform JAX has no backend for. "tpu" stands for it here."""
  platforms = sorted({"cpu", "tpu"} | {d.platform for d in jax.devices()})
  monkeypatch.setattr(op._ffi, "_platforms", platforms)
  check_collect_frees_dropped_and_keeps_held()


def check_collect_frees_dropped_and_keeps_held():
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  kept_params, kept = stepped(tx)
  _, dropped = stepped(tx)
  nbytes = kept.layout.state_nbytes()
  assert op._ffi.total_bytes() == before + 2 * nbytes
  del dropped
  assert op.collect() == nbytes
  assert op._ffi.total_bytes() == before + nbytes
  assert op.collect() == 0
  # The kept state goes on as if nothing happened.
  kept_params, kept = tx.fused_update(grads(1), kept, kept_params)
  assert_same(kept_params, kept, *stepped(tx, 2))
  del kept
  assert op.collect() == 2 * nbytes  # the kept state and the reference
  assert op._ffi.total_bytes() == before


def assert_same(a_params, a_state, b_params, b_state):
  a = (a_params, op.export_state(a_state))
  b = (b_params, op.export_state(b_state))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_collect_keeps_states_of_a_jitted_loop_and_changes_no_result():
  tx = op.paged_adamw8bit()
  step = jax.jit(tx.fused_update, donate_argnums=(1, 2))

  def run(collect_every_step):
    params, state = jax.tree.map(jnp.copy, PARAMS), tx.init(PARAMS)
    for i in range(4):
      params, state = step(grads(i), state, params)  # the old state is donated
      if collect_every_step:
        gc.collect()  # one look of the collector, with the step maybe in flight
        op.collect()
    return params, state

  a_params, a_state = run(True)
  b_params, b_state = run(False)
  assert_same(a_params, a_state, b_params, b_state)
  op.release((a_state, b_state))


def test_a_full_garbage_collection_frees_a_dropped_state():
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  _, state = stepped(tx)
  jax.block_until_ready(state)
  del state
  gc.collect()  # the first look marks it as unheld
  gc.collect()  # the second frees it
  assert op._ffi.total_bytes() == before


def own_scan(handle, held):
  """One collector scan in which every other handle with slots counts as held,
  so that states of other tests in this process are left alone; returns
  (bytes freed, unheld handles used since their mark)."""
  others = [h for h in ops.handles_with_slots() if h != handle]
  return ops.collect(others + ([handle] if held else []), ops.epoch())


def test_two_scans_free_a_handle_only_when_unheld_and_unused_in_between():
  tx = op.paged_adamw8bit()
  params, state = stepped(tx)
  handle, nbytes = int(state.handle), state.layout.state_nbytes()
  assert own_scan(handle, held=False) == (0, 0)  # first look: only marked
  assert own_scan(handle, held=True) == (0, 0)  # held again: the mark is cleared
  assert own_scan(handle, held=False) == (0, 0)
  params, state = tx.fused_update(grads(1), state, params)  # used since the mark
  jax.block_until_ready(state)
  assert own_scan(handle, held=False) == (0, 1)  # busy: collect() would look again
  assert own_scan(handle, held=False) == (nbytes, 0)
  assert handle not in ops.handles_with_slots()
  with pytest.raises(Exception, match="freed by optax_paged8bit's collector"):
    jax.block_until_ready(tx.fused_update(grads(2), state, params))


def test_a_state_kept_only_as_a_host_copy_is_collected_and_says_so():
  tx = op.paged_adamw8bit()
  params, state = stepped(tx)
  host = jax.device_get(state)
  del state
  op.collect()
  with pytest.raises(Exception, match="kept only as a host copy"):
    jax.block_until_ready(tx.fused_update(grads(1), host, params))
  # At count 0 there is nothing to lose: a host copy of a fresh state starts afresh.
  fresh = jax.device_get(tx.init(PARAMS))
  op.collect()
  params, from_copy = tx.fused_update(grads(0), fresh, PARAMS)
  ref_params, reference = stepped(tx)
  assert_same(params, from_copy, ref_params, reference)
  op.release((from_copy, reference))


def test_100_init_step_drop_cycles_stay_bounded_without_release():
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  peak = 0
  for _ in range(100):
    _, state = stepped(tx)
    nbytes = state.layout.state_nbytes()
    del state
    peak = max(peak, op._ffi.total_bytes() - before)
  assert peak <= 2 * nbytes  # each init frees what two scans found unheld
  op.collect()
  assert op._ffi.total_bytes() == before


# The child only collects garbage and writes to a pipe, so the warnings of JAX
# and of Python 3.12 about forking a multi-threaded process do not apply.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_scan():
  tx = op.paged_adamw8bit()
  _, state = stepped(tx)  # a state with registry memory: scans have work
  jax.block_until_ready(state)
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: a full collection must not touch JAX
    calls = []
    op._ffi.scan_for_unheld_states = lambda **kw: calls.append(kw) or 0
    gc.collect()
    os.write(write, str(len(calls)).encode())
    os._exit(0)
  os.close(write)
  os.waitpid(pid, 0)
  assert os.read(read, 16) == b"0"
  op.release(state)
