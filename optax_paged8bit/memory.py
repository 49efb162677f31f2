"""The paged states' memory: release and collection, paging between a GPU and
host RAM, residency and size. Every function takes any pytree that holds
paged states (an opt_state, a TrainState, an `nnx.state(optimizer)`)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from optax_paged8bit import _collector, _ffi
from optax_paged8bit._states import paged_states, registry_keys, wait_for

# collect() looks again while a dropped state's steps are still running, or
# its grace runs, up to this long.
_COLLECT_PATIENCE_S = 60.0


def release(tree: Any) -> int:
  """Frees the registry memory of every paged state in `tree` now.

  The handles are tombstoned: updating, exporting or importing a released
  state (or an older copy of it) is an error. A state that was never updated
  holds no memory. Returns the bytes freed.
  """
  states = paged_states(tree)
  # Dispatch is asynchronous: let the update that made each state, and any
  # export or import still in flight, finish before their memory goes.
  wait_for(states)
  return sum(_ffi.release(key) for s in states for key in registry_keys(s))


def collect() -> int:
  """Frees the registry memory of every paged state that is gone, now.

  A state is gone when no `jax.Array` holds its handle any more: it was
  dropped, or kept only as a host copy (`jax.device_get`, pickle; save states
  with `save_checkpoint` or `export_state` instead). The collector also frees
  such states by itself, in a thread of its own, with no call: soon after a
  state is dropped, a new one made, or a full garbage collection ran.

  `collect()` first waits for the computations in flight whose results are
  held (a step or an export of a dropped state may be among them). In a
  process whose only Python thread is the caller's (besides the collector's),
  what no array holds is then gone and is freed at once. With other threads,
  one of them may be dispatching a step that was given its state with
  donation (the state's old arrays deleted, its new ones not made yet), so a
  state that no array holds is first retired (on a GPU its memory is paged
  out to host RAM) and freed after a grace period of a few seconds, or
  several of its steps, in which no array held it and no call used it;
  `collect()` waits for that, up to a minute. Returns the bytes freed;
  `release(tree)` frees given states at once.
  """
  _collector.ensure_started()
  # A step in flight may make the slot of a state that is already dropped.
  _collector.wait_for_work_in_flight()
  freed = 0
  start = time.monotonic()
  pause = 1e-3
  while True:
    scan = _collector.scan(in_caller=True)
    freed += scan.freed
    retired = any(_ffi._ops.is_retired(h) for h in _ffi._ops.handles_with_slots())
    if not (scan.busy or scan.blocked or retired):
      return freed
    if time.monotonic() - start > _COLLECT_PATIENCE_S:
      return freed
    time.sleep(pause)  # a dropped state's steps are still running, or its grace
    pause = min(2 * pause, 0.05)


def state_nbytes(tree: Any) -> int:
  """Bytes of optimizer state: the arrays of `tree` plus, for each paged
  state, what its layout keeps in the registry on all its devices (allocated
  at the first update)."""
  arrays = sum(
    np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
    for x in jax.tree.leaves(tree)
    if hasattr(x, "dtype")
  )
  return arrays + sum(s.layout.state_nbytes() * s.layout.num_devices for s in paged_states(tree))


def slot_info(tree: Any) -> list[dict]:
  """Per-slot registry info of every paged state in `tree`: platform, device,
  step, bytes, bytes placed on the device and on the host, layout key, and
  `evictions_seen`, the steps that found the driver had evicted the slot's
  pages (a rise of free GPU memory) and prefetched them back,
  `evictions_restored`, the times the eviction watch found the same between
  steps and prefetched them back (`set_eviction_watch`), and
  `streamed_steps` and `streamed_bytes`, the steps that streamed the part of
  the state in host RAM and the bytes the last one moved each way, and
  `bytes_pinned`, the bytes in page-locked host memory
  (`set_host_memory_kind`)."""
  out = []
  for s in paged_states(tree):
    for key in registry_keys(s):
      for info in _ffi.slot_info(key):
        out.append({"handle": key, **info})
  return out


def page_out(tree: Any) -> int:
  """Moves the GPU-resident state of every paged state in `tree` to host RAM
  (to free HBM for evaluation, generation or a memory spike).

  Waits for the updates in flight first. The next update brings the pages
  back itself (prefetched on XLA's stream before the kernel), so `page_in` is
  optional. Returns the bytes moved; 0 for CPU states.
  """
  states = paged_states(tree)
  wait_for(states)
  # The extension's paging passes over CPU slots (host memory already).
  return sum(int(_ffi._ops.page_out(key)) for s in states for key in registry_keys(s))


def page_in(tree: Any) -> int:
  """Moves paged-out state back to its GPUs now; returns the bytes moved.

  Raises when free device memory cannot take it (the state then stays on the
  host, and the next update reads it there instead of oversubscribing).
  """
  return sum(int(_ffi._ops.page_in(key)) for s in paged_states(tree) for key in registry_keys(s))


def residency(tree: Any) -> dict[str, int]:
  """Bytes of registry state placed on GPUs and in host memory, over every
  paged state in `tree` (CPU states count as host).

  This is the placement the library keeps: where each slot was put (the
  budget guard), paged out (`page_out`) or brought back (the next update,
  `page_in`). Under memory pressure the CUDA driver may evict device-placed
  pages to the host without telling anyone, and no driver query says where
  pages are; `measure_residency` measures that. Evicted pages come back once
  the spike is gone: by the eviction watch between steps
  (`set_eviction_watch`), or by the next update before its kernel runs, so
  this placement is where the state is whenever a step runs.
  """
  on_device = on_host = 0
  for info in slot_info(tree):
    on_device += info["bytes_on_device"]
    on_host += info["bytes_on_host"]
  return {"bytes_on_device": on_device, "bytes_on_host": on_host}


def measure_residency(tree: Any) -> dict[str, int]:
  """Where the registry state of every paged state in `tree` really is now,
  measured on its GPUs: one load per 2 MiB (the driver's migration unit) is
  timed and compared with loads of device memory and of pinned host memory.

  Returns `bytes_on_device` and `bytes_on_host` (what `residency` reports,
  as found rather than as placed) and the median load cycles of the two
  references, `device_load_cycles` and `host_load_cycles`, which show how
  clearly they separate. Waits for the updates in flight; takes a few
  milliseconds. A chunk the driver evicted and unmapped may be brought back
  by the load that measures it. CPU states count as host.
  """
  states = paged_states(tree)
  wait_for(states)
  out = {"bytes_on_device": 0, "bytes_on_host": 0, "device_load_cycles": 0, "host_load_cycles": 0}
  for s in states:
    for key in registry_keys(s):
      # CPU slots count as host there, and time no load.
      on_device, on_host, device_cycles, host_cycles = _ffi._ops.measure_residency(key)
      out["bytes_on_device"] += int(on_device)
      out["bytes_on_host"] += int(on_host)
      out["device_load_cycles"] = max(out["device_load_cycles"], int(device_cycles))
      out["host_load_cycles"] = max(out["host_load_cycles"], int(host_cycles))
  return out


_HOST_MEMORY_KINDS = ("pinned", "managed")


def set_host_memory_kind(kind: str) -> str:
  """Chooses the host RAM for a GPU state that finds no room on its GPU (no
  free memory, or a `set_device_memory_budget` of 0) when its first step or
  an import allocates it, and returns the kind set before. States made
  earlier keep theirs.

  - "pinned" (the default): page-locked host memory, which each step copies
    in and out with the GPU's copy engines, both directions at once: the
    bus's full speed. Locked memory cannot be swapped by the operating
    system; a host that refuses to lock that much gets "managed" instead.
  - "managed": CUDA managed memory homed in host RAM, which each step copies
    with kernels; the copies take about half again as long (docs/memory.md).

  A state that fits on its GPU in part keeps that part there and the rest in
  managed host memory, whichever kind is set. A state placed in host RAM
  stays there, either kind; to bring it onto a GPU with room now, export and
  import it (`export_state`, `import_state`). No effect on the CPU."""
  if kind not in _HOST_MEMORY_KINDS:
    raise ValueError(
      f"set_host_memory_kind: kind must be one of {_HOST_MEMORY_KINDS}, got {kind!r}"
    )
  before = host_memory_kind()
  _ffi._ops.set_pinned_host(kind == "pinned")
  return before


def host_memory_kind() -> str:
  """The kind of host RAM that `set_host_memory_kind` set: "pinned" or "managed"."""
  return "pinned" if _ffi._ops.pinned_host() else "managed"


def set_eviction_watch(on: bool) -> bool:
  """Turns the eviction watch on (the default) or off; returns whether it
  was on.

  A memory spike on a GPU (JAX arrays under an allocator that does not
  preallocate, another process, a plain `cudaMalloc`) that needs more than
  free memory makes the CUDA driver evict pages of device-placed state to
  host RAM. The watch, a thread of the extension, checks each GPU's free
  memory every 20 ms; when it has risen above what it was at a state's last
  step, and the GPU was full since the last check or the state has had no
  step for 0.3 s, it prefetches that state's pages back, so the next step
  finds them on the device. Off, the next step finds the same sign and
  prefetches them itself, before its kernel runs (the driver brings evicted
  pages back more slowly than paged-out ones: docs/memory.md has the
  figures). Either way the results are the same. `slot_info` counts both (`evictions_restored`,
  `evictions_seen`). Off stops the thread; it starts at the next GPU step
  once on again. No effect on the CPU."""
  if not isinstance(on, bool):
    raise ValueError(f"set_eviction_watch: on must be True or False, got {on!r}")
  before = eviction_watch()
  _ffi._ops.set_eviction_watch(on)
  return before


def eviction_watch() -> bool:
  """Whether the eviction watch is on (`set_eviction_watch`)."""
  return bool(_ffi._ops.eviction_watch())


def set_device_memory_budget(nbytes: int | None) -> None:
  """Caps the bytes of paged state placed on each GPU. A state that does not fit
  whole keeps on the GPU the part that fits (whole 2 MiB units) and the rest in
  host RAM, which each step streams through a small device window. None
  removes the cap (free device memory, minus a reserve, is always a cap).
  Applies to allocations made after the call, and to paged-out states when a
  step brings them back."""
  if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
    raise ValueError(
      f"set_device_memory_budget: nbytes must be None or an int >= 0, got {nbytes!r}"
    )
  _ffi._ops.set_device_budget(-1 if nbytes is None else nbytes)
