"""The collector (optax_paged8bit/_collector.py): a paged state's registry
memory is freed once no jax.Array holds its handle, by itself or at
`collect()`, and never while any thread may still step the state."""

from __future__ import annotations

import functools
import gc
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import settled_registry_bytes

import optax_paged8bit as op
from optax_paged8bit import _collector

ops = op._ffi._ops
PARAMS = {"w": jnp.full((64, 512), 0.5), "b": jnp.zeros(10)}
NBYTES = op.paged_adamw8bit().init(PARAMS).layout.state_nbytes()
STRESS = pathlib.Path(__file__).parent / "collector_stress.py"


def grads(i):
  return jax.tree.map(lambda p: jnp.full(p.shape, 0.01 * (i + 1), p.dtype), PARAMS)


def stepped(tx, n=1):
  state = tx.init(PARAMS)
  params = PARAMS
  for i in range(n):
    params, state = tx.fused_update(grads(i), state, params)
  return params, state


def assert_same(a_params, a_state, b_params, b_state):
  a = (a_params, op.export_state(a_state))
  b = (b_params, op.export_state(b_state))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def eventually(condition, timeout=20.0) -> bool:
  """Whether `condition()` becomes true within `timeout` seconds, calling
  nothing of the library's meanwhile."""
  end = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > end:
      return False
    time.sleep(0.01)
  return True


@functools.partial(jax.jit, static_argnums=(0, 1))
def _busy_zero(iterations: int, dtype) -> jax.Array:
  x = jnp.full((256, 256), 1 / 256)
  y = jax.lax.fori_loop(0, iterations, lambda i, a: jnp.tanh(a @ x), x)
  return (y[0, 0] * 0).astype(dtype)


def slow_zero(dtype) -> jax.Array:
  """A zero of `dtype` that about a second of work produces, so that what
  depends on it waits in flight: on the CPU a loop of 3000 small matrix
  products on 2 cores, on a GPU a chain of large ones, as many as this GPU
  does in a second (there a host callback held the dispatching thread: the
  call returned only once it had run)."""
  if jax.default_backend() == "cpu":
    return _busy_zero(3000, dtype)
  return _gpu_busy_zero(_gpu_products_per_second(), dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gpu_busy_zero(products: int, dtype) -> jax.Array:
  x = jnp.full((4096, 4096), 1 / 4096)
  y = x
  for _ in range(products):  # unrolled: kernels back to back, no host in between
    y = jnp.tanh(jnp.dot(y, x, precision=jax.lax.Precision.HIGHEST))
  return (y[0, 0] * 0).astype(dtype)


@functools.cache
def _gpu_products_per_second() -> int:
  jax.block_until_ready(_gpu_busy_zero(8, jnp.float32))
  start = time.perf_counter()
  jax.block_until_ready(_gpu_busy_zero(8, jnp.float32))
  return max(8, min(2000, int(8 / (time.perf_counter() - start))))


def run_stress(*args, timeout=600) -> dict:
  out = subprocess.run(
    [sys.executable, str(STRESS), *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "XLA_FLAGS": ""},
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def single_threaded(test):
  """Runs `test` in a fresh process when this one has other Python threads
  (pytest-xdist's workers do): what it checks is what a program whose only
  thread is the caller's gets, where a look frees what is gone at once (with
  other threads, it retires first: docs/memory.md)."""

  @functools.wraps(test)
  def wrapper(**paths):
    if set(sys._current_frames()) <= {threading.get_ident(), _collector._thread_id}:
      return test(**paths)
    script = (
      "import pathlib, sys\n"
      f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
      "import test_collector\n"
      f"test_collector.{test.__name__}.__wrapped__("
      "**{k: pathlib.Path(v) for k, v in (a.split('=', 1) for a in sys.argv[1:])})\n"
    )
    out = subprocess.run(
      [sys.executable, "-c", script, *(f"{k}={v}" for k, v in paths.items())],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

  return wrapper


# -- what is gone is freed, what is held is kept ---------------------------------------


def check_collect_frees_dropped_and_keeps_held():
  """collect() frees what is dropped. The tests that call this set
  thread_looks_away: under load the thread may otherwise free the dropped
  state first (rightly), and collect() would find nothing left to free."""
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  kept_params, kept = stepped(tx)
  _, dropped = stepped(tx)
  assert op._ffi.total_bytes() == before + 2 * NBYTES
  del dropped
  assert op.collect() == NBYTES
  assert op._ffi.total_bytes() == before + NBYTES
  assert op.collect() == 0
  # The kept state goes on as if nothing happened.
  kept_params, kept = tx.fused_update(grads(1), kept, kept_params)
  assert_same(kept_params, kept, *stepped(tx, 2))
  del kept
  assert op.collect() == 2 * NBYTES  # the kept state and the reference
  assert op._ffi.total_bytes() == before


def test_collect_frees_dropped_states_and_keeps_held_ones(thread_looks_away):
  check_collect_frees_dropped_and_keeps_held()


def test_uint32_arrays_that_are_no_handle_do_not_disturb_the_collector(thread_looks_away):
  strays = [jnp.uint32(0), jnp.uint32(2**31 + 5), jnp.uint32(2**32 - 1)]  # live during the check
  check_collect_frees_dropped_and_keeps_held()
  del strays


def test_the_collector_skips_a_platform_this_process_has_no_backend_for(
  monkeypatch, thread_looks_away
):
  """JAX_PLATFORMS=cuda leaves out the CPU backend, and asking for its arrays
  raises 'Unknown backend cpu': a look must skip a platform JAX has no
  backend for. "tpu" stands for it here."""
  platforms = sorted({"cpu", "tpu"} | {d.platform for d in jax.devices()})
  monkeypatch.setattr(_collector, "_platforms", platforms)
  check_collect_frees_dropped_and_keeps_held()


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


def test_looks_between_the_steps_of_a_donated_loop_change_no_result():
  tx = op.paged_adamw8bit()
  settled_registry_bytes()  # nothing else to free
  step = jax.jit(tx.fused_update, donate_argnums=(1, 2))

  def run(look):
    params, state = jax.tree.map(jnp.copy, PARAMS), tx.init(PARAMS)
    for i in range(4):
      params, state = step(grads(i), state, params)  # the old state is donated
      if look:
        assert op.collect() == 0  # the step maybe in flight, its input deleted
        assert _collector.scan(in_caller=False).freed == 0  # as the thread looks
    return params, state

  assert_same(*run(True), *run(False))


@single_threaded
def test_100_eager_init_step_drop_cycles_hold_at_most_two_states():
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  peak = 0
  for _ in range(100):
    _, state = stepped(tx)
    del state
    peak = max(peak, op._ffi.total_bytes() - before)
  assert peak <= 2 * NBYTES  # each eager init frees what is gone
  op.collect()
  assert op._ffi.total_bytes() == before


@single_threaded
def test_20_restores_in_a_loop_hold_at_most_two_states(tmp_path):
  tx = op.paged_adamw8bit()
  params, state = stepped(tx, 2)
  op.save_checkpoint(tmp_path / "ckpt", {"params": params, "opt_state": state})
  op.release(state)
  before = settled_registry_bytes()
  peak = 0
  for i in range(20):
    restored = op.restore_checkpoint(
      tmp_path / "ckpt", {"params": PARAMS, "opt_state": tx.init(PARAMS)}
    )
    p, s = tx.fused_update(grads(i), restored["opt_state"], restored["params"])
    jax.block_until_ready(p)
    del restored, p, s
    peak = max(peak, op._ffi.total_bytes() - before)
  assert peak <= 2 * NBYTES  # each restore frees the states restored before
  op.collect()
  assert op._ffi.total_bytes() == before


def test_a_dropped_state_is_freed_with_no_call():
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  _, state = stepped(tx)
  jax.block_until_ready(state)
  del state
  assert eventually(lambda: op._ffi.total_bytes() == before)


# -- the registry's decision ------------------------------------------------------------

FREE_NOW, RETIRE, RETIRE_AND_FREE = 0, 1, 2


def decide(held, candidates, mark, mode, grace_min_s=0.05):
  """(bytes freed, candidates in use, handles newly retired, retired due)."""
  return ops.collect(held, candidates, mark, mode, grace_min_s, 0.0)[:4]


@pytest.fixture
def thread_looks_away(monkeypatch):
  """The collector's thread leaves this test's states alone."""
  monkeypatch.setattr(_collector, "IDLE_S", 3600.0)


def test_a_candidate_is_freed_at_once_only_when_unheld_and_unused_since_the_mark(
  thread_looks_away,
):
  tx = op.paged_adamw8bit()
  params, state = stepped(tx)
  jax.block_until_ready(state)
  [handle] = op._ffi.handle_values(state.handle)
  assert decide([handle], [handle], ops.epoch(), FREE_NOW) == (0, 0, [], 0)  # held: kept
  mark = ops.epoch()
  params, state = tx.fused_update(grads(1), state, params)
  jax.block_until_ready(state)
  assert decide([], [handle], mark, FREE_NOW) == (0, 1, [], 0)  # used since the mark
  mark = ops.epoch()
  assert decide([], [], mark, FREE_NOW) == (0, 0, [], 0)  # not a candidate: kept
  assert decide([], [handle], mark, FREE_NOW) == (NBYTES, 0, [], 0)
  assert handle not in ops.handles_with_slots()
  with pytest.raises(Exception, match="freed by optax_paged8bit's collector"):
    jax.block_until_ready(tx.fused_update(grads(2), state, params))


def test_a_retired_candidate_is_freed_after_two_more_looks_and_its_grace(thread_looks_away):
  tx = op.paged_adamw8bit()
  params, state = stepped(tx)
  jax.block_until_ready(state)
  [handle] = op._ffi.handle_values(state.handle)
  assert decide([], [handle], ops.epoch(), RETIRE) == (0, 0, [handle], 0)
  assert ops.is_retired(handle)
  assert decide([handle], [handle], ops.epoch(), RETIRE) == (0, 0, [], 0)  # held: live again
  assert not ops.is_retired(handle)
  decide([], [handle], ops.epoch(), RETIRE)
  mark = ops.epoch()
  params, state = tx.fused_update(grads(1), state, params)  # used since retired: live again
  jax.block_until_ready(state)
  assert decide([], [handle], mark, RETIRE_AND_FREE) == (0, 1, [], 0)
  assert not ops.is_retired(handle)
  assert decide([], [handle], ops.epoch(), RETIRE_AND_FREE, grace_min_s=60) == (0, 0, [handle], 0)
  for _ in range(2):  # two more looks, but within the grace: due later
    assert decide([], [handle], ops.epoch(), RETIRE_AND_FREE, grace_min_s=60) == (0, 0, [], 0)
  time.sleep(0.06)  # the grace below, since the last use
  assert decide([], [handle], ops.epoch(), RETIRE) == (0, 0, [], 1)  # due: counted, kept
  assert decide([], [handle], ops.epoch(), RETIRE_AND_FREE) == (NBYTES, 0, [], 1)
  assert handle not in ops.handles_with_slots()


def test_idle_handles_leave_out_states_in_use_and_states_found_held(thread_looks_away):
  tx = op.paged_adamw8bit()
  _, state = stepped(tx)
  jax.block_until_ready(state)
  [handle] = op._ffi.handle_values(state.handle)

  def idle(idle_s, recheck_s):
    return ops.idle_handles(idle_s, 0.0, recheck_s, 60.0, 0.0)

  handles, next_s = idle(60.0, 0.0)
  assert handle not in handles and 0 < next_s <= 60  # just used
  time.sleep(0.02)
  assert handle in idle(0.01, 30.0)[0]  # unused, not found held since
  decide([handle], [], ops.epoch(), RETIRE)
  handles, next_s = idle(0.01, 30.0)
  assert handle not in handles and 0 < next_s <= 30  # found held: looked at again later
  assert handle in idle(0.01, 0.0)[0]
  op.release(state)


# -- what a look sees -------------------------------------------------------------------


def test_a_state_retired_while_its_step_is_in_flight_is_live_again_and_exact(thread_looks_away):
  """A look while a step given the state with donation is in flight finds
  no readable array of the state (the old one deleted, the new one not
  computed): it retires the state, and the step then finds it, the next
  look sees it live again, and the results equal an undisturbed run.

  On a GPU the update's handler reads the state's handle and count on the
  host when XLA dispatches it, so the dispatch returns only once the step's
  inputs are computed and its handler has run: the look finds the state
  live and retires nothing."""
  tx = op.paged_adamw8bit()
  step = jax.jit(tx.fused_update, donate_argnums=(1,))
  params, state = stepped(tx)
  jax.block_until_ready(state)
  [handle] = op._ffi.handle_values(state.handle)
  late = jax.tree.map(lambda x: x + slow_zero(x.dtype), grads(1))
  params, state = step(late, state, params)  # waits for `late`
  look = _collector.scan([handle], in_caller=False)
  if jax.default_backend() == "cpu":
    assert (look.freed, look.retired, look.blocked) == (0, 1, True) and ops.is_retired(handle)
  else:
    assert (look.freed, look.retired) == (0, 0) and not ops.is_retired(handle)
  jax.block_until_ready(state)
  look = _collector.scan([handle], in_caller=False)
  assert not ops.is_retired(handle)
  assert_same(params, state, *stepped(tx, 2))


def test_a_call_in_progress_since_before_a_retirement_holds_off_the_free(thread_looks_away):
  tx = op.paged_adamw8bit()
  _, state = stepped(tx)
  jax.block_until_ready(state)
  [handle] = op._ffi.handle_values(state.handle)
  begun = ops.call_begins()  # as a handler waiting for the step's forward pass
  assert decide([], [handle], ops.epoch(), RETIRE)[2] == [handle]
  time.sleep(0.06)
  for _ in range(3):
    assert decide([], [handle], ops.epoch(), RETIRE_AND_FREE) == (0, 0, [], 0)
  ops.call_ends(begun)
  assert decide([], [handle], ops.epoch(), RETIRE_AND_FREE) == (NBYTES, 0, [], 1)


@single_threaded
def test_collect_waits_for_an_export_in_flight_of_a_dropped_state():
  """In a process of one Python thread, collect() frees a dropped state at
  once, so only its wait for the export keeps the export's memory (with other
  threads it retires the state and frees it after a grace of seconds, long
  after the export ended, so a missing wait would go unseen)."""
  tx = op.paged_adamw8bit()
  before = settled_registry_bytes()
  _, state = stepped(tx, 2)
  _, reference = stepped(tx, 2)
  late = state._replace(count=state.count + slow_zero(state.count.dtype))
  exported = jax.jit(op.export_state)(late)  # waits a second for its count
  del state, late  # the state's arrays are gone; its export is in flight
  assert op.collect() == NBYTES
  for x, y in zip(
    jax.tree.leaves(exported), jax.tree.leaves(op.export_state(reference)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  op.release(reference)
  assert op._ffi.total_bytes() == before


def test_collect_accounts_for_a_dropped_state_whose_first_step_is_in_flight():
  tx = op.paged_adamw8bit()
  step = jax.jit(tx.fused_update)
  before = settled_registry_bytes()
  g = jax.tree.map(lambda x: x + slow_zero(x.dtype), grads(0))
  params, state = step(g, tx.init(PARAMS), PARAMS)  # allocates in about a second
  del state
  op.collect()  # waits for the params, and so for the step that allocates
  assert op._ffi.total_bytes() == before
  del params


def test_the_thread_frees_a_dropped_state_whose_first_step_ran_after_it_was_dropped(monkeypatch):
  monkeypatch.setattr(_collector, "IDLE_S", 1.0)  # time to see the slot before it goes
  tx = op.paged_adamw8bit()
  step = jax.jit(tx.fused_update)
  before = settled_registry_bytes()
  g = jax.tree.map(lambda x: x + slow_zero(x.dtype), grads(0))
  step(g, tx.init(PARAMS), PARAMS)  # every result dropped at once
  if jax.default_backend() == "cpu":
    assert op._ffi.total_bytes() == before  # it has not run yet
  # (A GPU's dispatch returns once the handler has run: the state is there.)
  assert eventually(lambda: op._ffi.total_bytes() == before + NBYTES)  # it ran
  assert eventually(lambda: op._ffi.total_bytes() == before)  # and was freed


# -- where looks run ----------------------------------------------------------------


def test_the_garbage_collector_callback_only_wakes_the_thread(monkeypatch):
  """It runs inside any allocation, in the middle of JAX's own C++ work
  too: calling into JAX from there crashed the process."""
  caller = []

  def record(*args, **kwargs):
    caller.append(threading.get_ident())
    return _collector._NOTHING

  def no_jax(*args, **kwargs):
    caller.append(threading.get_ident())
    raise AssertionError("called into JAX")

  _collector.ensure_started()
  monkeypatch.setattr(_collector, "scan", record)
  for name in ("live_arrays", "devices", "block_until_ready", "device_get"):
    monkeypatch.setattr(jax, name, no_jax)
  _collector._after_full_collection("stop", {"generation": 2})
  gc.collect()
  assert threading.get_ident() not in caller


@pytest.mark.parametrize("gc_threshold", [False, True], ids=["default", "gc.set_threshold(1,1,1)"])
def test_short_runs_that_export_their_state_do_not_crash(gc_threshold):
  """The loop that crashed the process from the garbage collector's callback
  (a segmentation fault in 3 of 3 runs), in a fresh process."""
  extra = ["--gc-threshold"] if gc_threshold else []
  result = run_stress("export-sweep", "--cycles", "1500" if not gc_threshold else "600", *extra)
  assert result["ok"] and result["peak_states"] <= 2, result


def test_donated_steps_on_4_threads_under_collections_lose_nothing():
  """4 threads train with donated steps while the main thread runs full
  garbage collections and the collector's thread looks at every state,
  those being trained included (each look races with 4 dispatching threads)."""
  result = run_stress("donated-threads", "--steps", "25", "--look-at-everything")
  assert result["ok"] and result["lost"] == 0, result


def test_a_donated_loop_beside_an_allocating_thread_loses_nothing():
  result = run_stress("loader", "--steps", "2000", "--look-at-everything")
  assert result["ok"], result


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_a_sweep_of_jitted_runs_stays_bounded_with_no_call(kind):
  """A jitted create_train_state and a jitted, donated step per run, no
  release or collect: the registry holds at most 2 states after each run,
  and process memory grows by less than one state from run 2 to run 10.
  Two steps a run, the second given the first's donated state; the state
  stays 32 MiB (with 8 MiB ones, the allocator's noise alone grew process
  memory by 2.5 states)."""
  result = run_stress("sweep", kind, "--runs", "10", "--steps", "2")
  assert result["ok"], result


# The child only collects garbage and writes to a pipe, so the warnings of JAX
# and of Python 3.12 about forking a multi-threaded process do not apply.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_never_looks():
  tx = op.paged_adamw8bit()
  _, state = stepped(tx)  # a state with registry memory: looks have work
  jax.block_until_ready(state)
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: nothing may touch JAX
    looks = []
    _collector.scan = lambda *a, **k: looks.append(1) or _collector._NOTHING
    gc.collect()
    _collector.ensure_started()
    _collector.look_now()
    os.write(write, json.dumps([len(looks), _collector._thread is None]).encode())
    os._exit(0)
  os.close(write)
  os.waitpid(pid, 0)
  assert json.loads(os.read(read, 64)) == [0, True]
  op.release(state)
