"""The only module that touches the compiled extension: it registers the FFI
targets with JAX and wraps the registry's host-side controls."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading

import jax
import numpy as np

try:
  from optax_paged8bit import _ops
except ImportError as e:
  raise ImportError(
    "optax_paged8bit's compiled extension (optax_paged8bit._ops) could not be imported. If you "
    "are in the repository's root, the source folder optax_paged8bit/ shadows the installed "
    "package, which alone holds the extension: install it editable "
    '(`pip install -e ".[examples,test]"`, as README.md does) or run from another folder. '
    "Otherwise build and install it: `pip install .`."
  ) from e

UPDATE_TARGET = "optax_paged8bit_update"
EXPORT_TARGET = "optax_paged8bit_export"
IMPORT_TARGET = "optax_paged8bit_import"
UPDATE_ARRAYS_TARGET = "optax_paged8bit_update_arrays"
BLOCK_NORMS_TARGET = "optax_paged8bit_block_norms"

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


# A state's handle leaf is uint32 (so that the collector can tell handles from
# the int32 step counts among the live arrays): a fresh token (the top bit
# set) until the first update, then a registry key (csrc/registry.h).
HANDLE_DTYPE = np.dtype(np.uint32)
_FRESH_BIT = 0x80000000


def handle_values(handle: jax.Array) -> list[int]:
  """The handle value of each device's buffer of a concrete handle array
  (with sharded params every device holds its own key)."""
  return [int(np.asarray(s.data)) for s in handle.addressable_shards]


def registry_key(value: int) -> int | None:
  """The registry key of a handle value; None for a fresh token."""
  return None if value & _FRESH_BIT else value


# release, is_released and slot_info take registry keys (registry_key).
def release(handle: int) -> int:
  return int(_ops.release(int(handle)))


def is_released(handle: int) -> bool:
  return bool(_ops.is_released(int(handle)))


def check_call(call: str, handle: jax.Array, count: jax.Array, layout) -> None:
  """Raises the error an eager `call` ("update" or "export") of a concrete
  state would fail with, before the call is issued: on each of this
  process's devices, the registry checks its own handle value. Under jit the
  custom call itself checks."""
  sizes, flags = [int(n) for n in layout.leaf_sizes()], list(layout.leaf_flags)
  for shard in handle.addressable_shards:
    device = shard.device
    # The device a custom call sees (XLA's device ordinal): a CPU device's
    # global id (2048 and up in process 1 of a multi-process run), a GPU's
    # index among this process's GPUs.
    cpu = device.platform == "cpu"
    error = _ops.check_call(
      call,
      int(np.asarray(shard.data)),
      layout.key,
      "cpu" if cpu else "cuda",
      int(device.id if cpu else device.local_hardware_id),
      int(count),
      sizes,
      flags,
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
# (csrc/registry.h says why two). Scans run when a state is created (an eager
# tx.init), after each full garbage collection, and from
# optax_paged8bit.collect().

_scanning = threading.Lock()
_platforms: list[str] = []  # set by the first scan outside the garbage collector


def _live_arrays() -> list[jax.Array]:
  arrays = []
  for platform in _platforms:
    # A platform this process has no backend for holds no arrays: with
    # JAX_PLATFORMS=cuda, jax.live_arrays("cpu") raises "Unknown backend cpu".
    with contextlib.suppress(RuntimeError):
      arrays += jax.live_arrays(platform)
  return arrays


def _held_handles(arrays: list[jax.Array]) -> set[int]:
  """Values of the handle-typed arrays among `arrays`, on every device (each
  holds its own key). One that cannot be read holds nothing: a failed
  computation's output (its state is unusable anyway), or one deleted by
  another thread since the listing (that thread's step is what the second
  look is for)."""
  held = set()
  for x in arrays:
    if x.dtype != HANDLE_DTYPE or x.shape != ():
      continue
    with contextlib.suppress(RuntimeError):
      held.update(handle_values(x))
  return {h for h in held if not h & _FRESH_BIT}


def _is_ready(x: jax.Array) -> bool:
  try:
    return x.is_ready()
  except RuntimeError:  # deleted by another thread since the listing
    return False


def scan_for_unheld_states(*, wait: bool, from_gc: bool = False) -> tuple[int, int]:
  """One collector scan; returns the bytes it freed, and how many unheld
  handles a call used since the previous scan (steps of a dropped state
  still in flight: collect() looks again once they are done).

  With `wait`, computations in flight are waited for (they may be about to use
  a state whose arrays are gone); without it, the scan gives up when anything
  is in flight (the garbage collector's and init's scans: they must not
  block). The garbage collector's scans run only once another scan has found
  the platforms in use (they must not be the first to touch JAX's backends).
  """
  if from_gc and (not _platforms or sys.is_finalizing()):
    return 0, 0
  # A waiting scan waits for one running on another thread; the garbage
  # collector's gives up (one may be running below it in this thread).
  if not _scanning.acquire(blocking=wait):
    return 0, 0
  try:
    if not _platforms:
      _platforms.extend(sorted({"cpu"} | {d.platform for d in jax.devices()}))
    with_slots = set(_ops.handles_with_slots())
    if not with_slots:
      return 0, 0
    mark = _ops.epoch()
    arrays = _live_arrays()
    ready = [_is_ready(x) for x in arrays]
    pending = [x for x, r in zip(arrays, ready, strict=True) if not r]
    if pending:
      held = _held_handles([x for x, r in zip(arrays, ready, strict=True) if r])
      if with_slots <= held:
        return _collect(held, mark)  # all held: nothing to wait for
      if not wait:
        return 0, 0
      for x in pending:
        with contextlib.suppress(RuntimeError):  # failed or deleted: _held_handles decides
          x.block_until_ready()
    return _collect(_held_handles(arrays), mark)
  finally:
    _scanning.release()


def _collect(held: set[int], mark: int) -> tuple[int, int]:
  freed, busy = _ops.collect(sorted(held), mark)
  return int(freed), int(busy)


_PID = os.getpid()


def _scan_after_full_collection(phase: str, info: dict) -> None:
  # Not in a forked child: it shares no device with the parent, and touching
  # the parent's JAX runtime there can hang.
  if phase == "stop" and info.get("generation") == 2 and os.getpid() == _PID:
    scan_for_unheld_states(wait=False, from_gc=True)


gc.callbacks.append(_scan_after_full_collection)
