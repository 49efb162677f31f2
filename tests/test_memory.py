"""Paging API on the CPU backend (host memory: nothing moves) and its checks;
the GPU behaviour is in test_gpu.py."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

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
  assert info["evictions_restored"] == 0  # and those the eviction watch restored
  assert info["bytes_pinned"] == 0  # only a GPU state with no room on its GPU is pinned
  assert op.state_nbytes(state) == nbytes + 4 + 4  # + count and handle
  op.release(state)


def test_device_memory_budget_is_checked():
  with pytest.raises(ValueError, match="nbytes must be None or an int >= 0, got -5"):
    op.set_device_memory_budget(-5)
  op.set_device_memory_budget(1 << 30)
  op.set_device_memory_budget(None)


def test_host_memory_kind_is_checked_and_returns_the_kind_before():
  assert op.host_memory_kind() == "pinned"  # the default
  with pytest.raises(ValueError, match=r"kind must be one of .*'pinned', 'managed'.*got 'host'"):
    op.set_host_memory_kind("host")
  assert op.host_memory_kind() == "pinned"  # a refused kind changes nothing
  try:
    assert op.set_host_memory_kind("managed") == "pinned"
    assert op.host_memory_kind() == "managed"
    # No effect on the CPU: the state lives in host memory either way.
    params = {"w": jnp.zeros((64, 512))}
    tx = op.paged_adamw8bit()
    _, state = tx.update(params, tx.init(params), params)
    [info] = op.slot_info(state)
    assert info["bytes_on_host"] == info["bytes"] and info["bytes_pinned"] == 0
    op.release(state)
  finally:
    assert op.set_host_memory_kind("pinned") == "managed"


def test_eviction_watch_is_checked_and_returns_whether_it_was_on():
  assert op.eviction_watch() is True  # the default
  with pytest.raises(ValueError, match="on must be True or False, got 1"):
    op.set_eviction_watch(1)
  assert op.eviction_watch() is True  # a refused value changes nothing
  try:
    assert op.set_eviction_watch(False) is True
    assert op.set_eviction_watch(False) is False  # off twice: nothing to stop
    # Off changes nothing on the CPU: states step as before.
    params = {"w": jnp.ones((64, 512))}
    tx = op.paged_adamw8bit()
    _, state = tx.update(params, tx.init(params), params)
    assert op.slot_info(state)[0]["evictions_restored"] == 0
    op.release(state)
  finally:
    assert op.set_eviction_watch(True) is False
  assert op.eviction_watch() is True
