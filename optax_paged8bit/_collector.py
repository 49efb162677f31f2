"""The collector: frees the registry memory of paged states that are gone.

A paged state's moments live in the registry (csrc/registry.h), outside JAX,
so nothing frees them when the state's arrays go away, and no Python object
lives exactly as long as a state (each jitted step returns new arrays). A
state can be stepped, exported or saved again only through a jax.Array that
holds its handle, a uint32 scalar (one value per device). A look lists JAX's
live arrays, waits for the computations in flight among them (one may be an
export of a state whose own arrays are gone), and reads the handles; a handle
that no live array holds and that no call used since the look began is
unheld.

Unheld is not gone. While a thread dispatches a jitted call that was given
the state with donation, the donated arrays are already deleted (live arrays
leave them out) and the call's outputs are no Python objects yet: the thread
waits for the GIL, or, on a GPU, for the previous step to finish so that the
call can read the handle. So an unheld state is freed at once only when that
cannot be: the look runs in the user's thread, inside one of this package's
functions (an eager `tx.init`, `import_state`, `collect()`), so that thread
dispatches nothing, and the process has no other Python thread but the
collector's. Otherwise the state is retired: on a GPU its memory is paged out
to host RAM at once (the GPU memory comes back), and a retired state that is
used again is paged back in by its next step, bit-identical, as after
`page_out`. It is freed once it stayed unheld and unused for a grace period:
two more looks, and GRACE_MIN_S since its last use, or GRACE_INTERVALS times
the time between its last two steps if that is longer. Every look first waits
for the computations in flight whose results are held, so a dispatch blocked
behind them gets its turn before the decision. What the grace assumes away is
a dispatch that keeps its donated state out of sight longer than that behind
work whose results nobody holds.

Where looks run: never inside the garbage collector or a finalizer, where a
call into JAX can land in the middle of JAX's own C++ work (that crashed the
process). They run in the user's thread at the calls above, and in a daemon
thread, woken when a slot is made (a state's first step, an import), after a
full garbage collection (the callback only wakes it), when a state has not
been used for max(IDLE_S, IDLE_INTERVALS x its step interval), and when a
retired state's grace ends. It leaves alone states being stepped, so that a
resident step pays nothing.

A state kept only as a host copy (`jax.device_get`, pickle) holds no
jax.Array: it is collected, and using it later fails with an error that says
so.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
import time
import warnings
import weakref
from typing import NamedTuple

import jax

from optax_paged8bit import _ffi

_ops = _ffi._ops

# The thread looks at a state unused for max(IDLE_S, IDLE_INTERVALS x its
# step interval); one found held is looked at again after RECHECK_S without
# use (or at the next wake-up call).
IDLE_S = 0.1
IDLE_INTERVALS = 2.0
RECHECK_S = 5.0
# A retired state is freed once unused for max(GRACE_MIN_S, GRACE_INTERVALS x
# its step interval), after two more looks that found it unheld and unused.
GRACE_MIN_S = 2.0
GRACE_INTERVALS = 4.0
# At least this long between two looks of the thread (a burst of wake-up
# calls, say from gc.set_threshold(1, 1, 1), makes one look).
MIN_PAUSE_S = 0.05
# A look that found a handle it could not read, or a state in use, is retried
# after a pause that doubles up to this.
MAX_RETRY_PAUSE_S = 0.25
# A look that frees waits for the work in flight, then this long.
FREE_MARGIN_S = 0.1


class Scan(NamedTuple):
  freed: int  # bytes
  busy: int  # unheld candidates that a call used while the look ran, or since retired
  retired: int  # candidates newly retired
  blocked: bool  # a handle could not be read: some decisions wait for a later look


_NOTHING = Scan(0, 0, 0, False)
_platforms: list[str] = []


def _live_arrays() -> list[jax.Array]:
  if not _platforms:
    _platforms.extend(sorted({"cpu"} | {d.platform for d in jax.devices()}))
  arrays = []
  for platform in _platforms:
    # A platform this process has no backend for holds no arrays: with
    # JAX_PLATFORMS=cuda, jax.live_arrays("cpu") raises "Unknown backend cpu".
    with contextlib.suppress(RuntimeError):
      arrays += jax.live_arrays(platform)
  return arrays


def _is_handle_typed(x: jax.Array) -> bool:
  return x.dtype == _ffi.HANDLE_DTYPE and x.shape == ()


def _held_by(x: jax.Array) -> frozenset[int] | None:
  """The registry keys `x` holds (waiting for its computation); None when it
  was donated (deleted) by another thread before it could be read."""
  try:
    values = _ffi.handle_values(x)
  except Exception:
    with contextlib.suppress(Exception):
      if not x.is_deleted():
        return frozenset()  # a failed computation's output: no state survives in it
    return None
  return frozenset(v for v in values if _ffi.registry_key(v) is not None)


def _ready_handles_held() -> tuple[set[int], bool]:
  """(registry keys held by the live handle-typed arrays that are ready now,
  whether every live handle-typed array was): a look that waits for
  nothing."""
  held, all_read = set(), True
  for x in _live_arrays():
    with contextlib.suppress(Exception):
      if _is_handle_typed(x):
        values = _held_by(x) if x.is_ready() else None
        if values is None:
          all_read = False
        else:
          held |= values
  return held, all_read


def _wait(pending: list[weakref.ref]) -> None:
  for ref in pending:
    x = ref()
    if x is not None:
      with contextlib.suppress(Exception):  # deleted or failed: the reading decides
        x.block_until_ready()
    del x


def wait_for_work_in_flight() -> None:
  """Waits for the computations whose results some live array holds (a
  dropped state's step or export may be among them)."""
  pending = []
  for x in _live_arrays():
    with contextlib.suppress(Exception):
      if not x.is_ready():
        pending.append(weakref.ref(x))
  _wait(pending)


def _held_after_work_in_flight() -> tuple[set[int], bool]:
  """(registry keys that live arrays hold once the computations in flight
  among them have run, whether every handle-typed array could be read: one
  donated meanwhile belongs to a dispatch in progress)."""
  handles, pending = [], []
  for x in _live_arrays():
    with contextlib.suppress(Exception):
      if _is_handle_typed(x):
        handles.append(x)
      elif not x.is_ready():
        pending.append(weakref.ref(x))
  _wait(pending)
  held, all_read = set(), True
  for x in handles:
    values = _held_by(x)
    if values is None:
      all_read = False
    else:
      held |= values
  return held, all_read


def _alone() -> bool:
  """Whether no Python thread but this one and the collector's exists."""
  return set(sys._current_frames()) <= {threading.get_ident(), _thread_id}


_FREE_NOW, _RETIRE, _RETIRE_AND_FREE = 0, 1, 2


def _decide(held: set[int], wanted: set[int], mark: int, mode: int) -> tuple:
  """(bytes freed, candidates in use, handles newly retired, retired handles
  due, whether a call was in progress)."""
  freed, busy, retired, due, calls_running = _ops.collect(
    sorted(held), sorted(wanted), mark, mode, GRACE_MIN_S, GRACE_INTERVALS
  )
  return int(freed), int(busy), list(retired), int(due), bool(calls_running)


def scan(candidates: list[int] | None = None, *, in_caller: bool) -> Scan:
  """One look at the candidates (every handle with slots when None).

  `in_caller`: the calling thread dispatches nothing while it looks (a
  user's thread inside this package's functions). With no other thread in
  the process, what no live array holds once the work in flight has run is
  gone, and is freed at once. Otherwise what no live array holds is retired
  (paged out on a GPU when every handle could be read, so that a state whose
  handle is still being computed is not paged out by mistake), and a retired
  state whose grace is over is freed by a look that first waits for the work
  in flight whose results are held, then gives dispatches FREE_MARGIN_S."""
  with_slots = set(_ops.handles_with_slots())
  wanted = with_slots if candidates is None else with_slots & set(candidates)
  if not wanted:
    return _NOTHING
  mark = _ops.epoch()
  held, all_read = _ready_handles_held()
  if not wanted - held:
    _decide(held, set(), mark, _RETIRE)  # record what is held
    return _NOTHING
  if in_caller and _alone():
    held, all_read = _held_after_work_in_flight()
    if not all_read:  # cannot be, alone: a thread started meanwhile
      return Scan(0, 0, 0, True)
    freed, busy, *_ = _decide(held, wanted, mark, _FREE_NOW)
    return Scan(freed, busy, 0, False)
  freed, busy, retired, due, calls_running = _decide(held, wanted, mark, _RETIRE)
  if retired and threading.get_ident() != _thread_id:
    _ops.request_scan()  # the thread times the grace of what this look retired
  if retired and all_read and not calls_running:
    # Its GPU memory comes back now. Not while a call runs: it may be the
    # next step of a retired state, waiting for its forward pass.
    for handle in retired:
      with contextlib.suppress(ValueError):  # freed or released meanwhile
        _ops.retire(handle)
  if due:
    mark = _ops.epoch()
    held, _ = _held_after_work_in_flight()
    time.sleep(FREE_MARGIN_S)  # a dispatch waiting for that work uses its state now
    more, busy, *_ = _decide(held, wanted, mark, _RETIRE_AND_FREE)
    freed += more
  return Scan(freed, busy, len(retired), not all_read)


def look_now() -> None:
  """A look in the calling thread at a point where it dispatches nothing (an
  eager init or import): frees or retires what is unheld, never waits to
  retry."""
  if _automatic():
    scan(in_caller=True)


# -- the thread -----------------------------------------------------------------------

_PID = os.getpid()
# OPTAX_PAGED8BIT_AUTO_COLLECT=0 turns the automatic path off (the thread and
# the looks at init and import); release() and collect() still free.
AUTOMATIC = os.environ.get("OPTAX_PAGED8BIT_AUTO_COLLECT", "1") != "0"
_lock = threading.Lock()
_thread: threading.Thread | None = None
_thread_id: int | None = None
_stopping = False


def _usable() -> bool:
  return os.getpid() == _PID and not _stopping and not sys.is_finalizing()


def _automatic() -> bool:
  return AUTOMATIC and _usable()


def ensure_started() -> None:
  """Starts the collector's thread (once per process; not in a forked child,
  which shares no device with its parent)."""
  global _thread
  if _thread is not None or not _automatic():
    return
  with _lock:
    if _thread is None:
      _thread = threading.Thread(target=_run, name="optax_paged8bit collector", daemon=True)
      _thread.start()


def _idle(recheck_s: float) -> tuple[list[int], float]:
  idle, next_s = _ops.idle_handles(IDLE_S, IDLE_INTERVALS, recheck_s, GRACE_MIN_S, GRACE_INTERVALS)
  return list(idle), float(next_s)


def _run() -> None:
  global _thread_id
  _thread_id = threading.get_ident()
  retry = 0.0
  wait = -1.0
  while True:
    asked = _ops.wait_for_scan_request(wait)
    if not _usable():
      return
    try:
      idle, _ = _idle(0.0 if asked else RECHECK_S)
      result = scan(idle, in_caller=False) if idle else _NOTHING
      _, next_s = _idle(RECHECK_S)
    except Exception as e:  # never let the thread die: the next look may do
      warnings.warn(f"optax_paged8bit's collector failed: {e!r}", RuntimeWarning, stacklevel=1)
      result, next_s = Scan(0, 0, 0, True), -1.0
    if result.blocked or result.busy:
      retry = min(MAX_RETRY_PAUSE_S, max(0.01, 2 * retry))
      wait = retry if next_s < 0 else min(retry, next_s)
    else:
      retry = 0.0
      wait = next_s
    time.sleep(MIN_PAUSE_S)


def _stop() -> None:
  global _stopping
  _stopping = True
  _ops.request_scan()
  thread = _thread
  if thread is not None and thread is not threading.current_thread():
    thread.join(timeout=5.0)


def _after_full_collection(phase: str, info: dict) -> None:
  # Only wakes the thread: no call into JAX from inside the garbage collector.
  if phase == "stop" and info.get("generation") == 2 and _thread is not None and _usable():
    _ops.request_scan()


def _in_forked_child() -> None:
  global _thread, _stopping
  _stopping = True  # the child shares no device with the parent: never look there
  _thread = None


atexit.register(_stop)
os.register_at_fork(after_in_child=_in_forked_child)
gc.callbacks.append(_after_full_collection)
