"""The only module that touches the compiled extension: it registers the FFI
targets with JAX and wraps the registry's host-side controls."""

from __future__ import annotations

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
# the int32 step counts among the arrays): a fresh token (the top bit
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
