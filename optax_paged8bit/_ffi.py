"""The only module that touches the compiled extension: it registers the FFI
targets with JAX and wraps the registry's host-side controls."""

from __future__ import annotations

import math

import jax

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


def new_handle() -> int:
  return int(_ops.new_handle())


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
    int(handle),
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
