"""The only module that touches the compiled extension: it registers the FFI
targets with JAX and wraps the registry's host-side controls."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import threading

import jax
import numpy as np

from optax_paged8bit import _ops

UPDATE_TARGET = "optax_paged8bit_update"
EXPORT_TARGET = "optax_paged8bit_export"
IMPORT_TARGET = "optax_paged8bit_import"
UPDATE_ARRAYS_TARGET = "optax_paged8bit_update_arrays"

BUILT_WITH_CUDA: bool = bool(_ops.built_with_cuda)

for _name, _capsule in _ops.cpu_registrations().items():
  jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
for _name, _capsule in _ops.cuda_registrations().items():
  jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")

_NOT_BUILT_WITH_CUDA = (
  "optax_paged8bit was built without its CUDA backend, so it cannot update params on a GPU. "
  "Rebuild it with the CUDA toolkit's nvcc on PATH: "
  "`OPTAX_PAGED8BIT_CUDA=ON pip install --no-build-isolation --force-reinstall .` "
  "(or run on the CPU backend)."
)


def check_backend(platform: str) -> None:
  """Raises when the arrays live on a platform this build cannot serve."""
  if platform in ("gpu", "cuda") and not BUILT_WITH_CUDA:
    raise RuntimeError(_NOT_BUILT_WITH_CUDA)
  if platform not in ("cpu", "gpu", "cuda"):
    raise RuntimeError(
      f"optax_paged8bit runs on CPU and CUDA GPUs; the arrays are on platform {platform!r}."
    )


# The dtype of a state's handle leaf: uint32, so that the collector can tell
# handles from the int32 step counts among the live arrays.
HANDLE_DTYPE = np.dtype(np.uint32)


def new_handle() -> int:
  return int(_ops.new_handle())


def registry_handle(handle) -> int:
  """The registry's int32 key for a handle value; values it never hands out
  map to 0, which it rejects as unknown (RegistryHandle in ffi_common.h)."""
  value = int(handle)
  return value if 0 < value < 2**31 else 0


# release, is_released and slot_info take registry keys (registry_handle).
def release(handle: int) -> int:
  return int(_ops.release(int(handle)))


def is_released(handle: int) -> bool:
  return bool(_ops.is_released(int(handle)))


def check_update(handle, count, layout) -> None:
  """Raises the error an update of a concrete state would fail with, before the
  call is issued (under jit the custom call itself checks)."""
  device = next(iter(handle.devices()))
  platform = "cpu" if device.platform == "cpu" else "cuda"
  ordinal = getattr(device, "local_hardware_id", None)
  ordinal = device.id if ordinal is None else ordinal
  sizes = [math.prod(shape) for shape in layout.shapes]
  error = _ops.check_update(
    registry_handle(handle),
    platform,
    int(ordinal),
    int(count),
    sizes,
    list(layout.leaf_flags),
    layout.block_wise,
  )
  if error:
    raise ValueError(error)


def slot_info(handle: int) -> list[dict]:
  return list(_ops.slot_info(int(handle)))


def total_bytes() -> int:
  return int(_ops.total_bytes())


# The collector. A paged state's memory lives in the registry, outside JAX, so
# nothing frees it when the state's arrays go away. No Python object lives
# exactly as long as a state either: after each jitted step the handle is a
# new array (and the donated old one is deleted), so a weakref.finalize on one
# would fire after the first step. The collector asks instead which handles
# are still held: a handle is held while a live jax.Array of its dtype and
# shape (uint32[]) holds its value. Registry::Collect frees the slots of a
# handle that two scans found unheld with no call using it in between
# (csrc/registry.h says why two). Scans run when a state is created (tx.init),
# after each full garbage collection, and from optax_paged8bit.collect().

_scanning = threading.Lock()
_platforms: list[str] = []  # set by the first scan outside the garbage collector


def _live_arrays() -> list[jax.Array]:
  return [x for platform in _platforms for x in jax.live_arrays(platform)]


def _held_handles(arrays: list[jax.Array]) -> set[int]:
  """Values of the handle-typed arrays among `arrays`. One that cannot be read
  holds nothing: a failed computation's output (its state is unusable anyway),
  or one deleted by another thread since the listing (that thread's step is
  what the second look is for)."""
  held = set()
  for x in arrays:
    if x.dtype != HANDLE_DTYPE or x.shape != ():
      continue
    with contextlib.suppress(RuntimeError):
      held.add(registry_handle(np.asarray(x.addressable_data(0))))
  held.discard(0)  # uint32 values that are no registry key
  return held


def _is_ready(x: jax.Array) -> bool:
  try:
    return x.is_ready()
  except RuntimeError:  # deleted by another thread since the listing
    return False


def scan_for_unheld_states(*, wait: bool) -> int:
  """One collector scan; returns the bytes it freed.

  With `wait`, computations in flight are waited for (they may be about to use
  a state whose arrays are gone); without it, the scan gives up when anything
  is in flight (the garbage collector's scans: they must not block).
  """
  if not wait and (not _platforms or sys.is_finalizing()):
    return 0
  # A waiting scan waits for one running on another thread; the garbage
  # collector's gives up (one may be running below it in this thread).
  if not _scanning.acquire(blocking=wait):
    return 0
  try:
    if wait and not _platforms:
      _platforms.extend(sorted({"cpu"} | {d.platform for d in jax.devices()}))
    with_slots = set(_ops.handles_with_slots())
    if not with_slots:
      return 0
    mark = _ops.epoch()
    arrays = _live_arrays()
    ready = [_is_ready(x) for x in arrays]
    pending = [x for x, r in zip(arrays, ready, strict=True) if not r]
    if pending:
      held = _held_handles([x for x, r in zip(arrays, ready, strict=True) if r])
      if with_slots <= held:
        return int(_ops.collect(sorted(held), mark))  # all held: nothing to wait for
      if not wait:
        return 0
      for x in pending:
        with contextlib.suppress(RuntimeError):  # failed or deleted: _held_handles decides
          x.block_until_ready()
    return int(_ops.collect(sorted(_held_handles(arrays)), mark))
  finally:
    _scanning.release()


_PID = os.getpid()


def _scan_after_full_collection(phase: str, info: dict) -> None:
  # Not in a forked child: it shares no device with the parent, and touching
  # the parent's JAX runtime there can hang.
  if phase == "stop" and info.get("generation") == 2 and os.getpid() == _PID:
    scan_for_unheld_states(wait=False)


gc.callbacks.append(_scan_after_full_collection)
