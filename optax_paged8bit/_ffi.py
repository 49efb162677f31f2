"""The only module that touches the compiled extension: it registers the FFI
targets with JAX, tells the CUDA backend where NVRTC and the kernel cache
are, and wraps the registry's host-side controls."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import re
import sys

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


def _framework_ffi_api_version() -> tuple[int, int] | None:
  """The XLA FFI API version of the installed jaxlib, read from the headers it
  ships (None where they are absent)."""
  try:
    header = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    with open(header) as f:
      text = f.read()
  except (OSError, AttributeError):
    return None
  found = [re.search(rf"#define XLA_FFI_API_{part} (\d+)", text) for part in ("MAJOR", "MINOR")]
  return None if None in found else (int(found[0].group(1)), int(found[1].group(1)))


def check_ffi_api_version(built: tuple[int, int], framework: tuple[int, int] | None) -> None:
  """Raises ImportError where XLA cannot run handlers built against `built`:
  another major version, or a minor version newer than the framework's."""
  if framework is None or (built[0] == framework[0] and built[1] <= framework[1]):
    return
  raise ImportError(
    f"optax_paged8bit's extension was built against XLA FFI API {built[0]}.{built[1]}, which "
    f"the installed jax {jax.__version__} (FFI API {framework[0]}.{framework[1]}) cannot run. "
    "It was built against another jaxlib's headers; reinstall it against this jax: "
    "`pip install --force-reinstall --no-deps --no-build-isolation optax_paged8bit` "
    "(or `pip install .` from the source tree, whose build uses the oldest supported jax)."
  )


check_ffi_api_version(tuple(_ops.ffi_api_version), _framework_ffi_api_version())

for _name, _capsule in _ops.cpu_registrations().items():
  jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
for _name, _capsule in _ops.cuda_registrations().items():
  jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")

# The CUDA kernels are compiled at first use by NVRTC, the one that JAX's
# CUDA plugin installed (the nvidia-cuda-nvrtc wheel of its CUDA major) or a
# CUDA toolkit's, and cached on disk.


def _cuda_majors() -> list[int]:
  """The CUDA majors of the JAX CUDA plugins installed, newest first (13, 12
  when none is)."""
  found = []
  for major in (13, 12):
    try:
      if importlib.util.find_spec(f"jax_plugins.xla_cuda{major}") is not None:
        found.append(major)
    except ModuleNotFoundError:  # no jax_plugins package: no CUDA plugin at all
      break
  return found or [13, 12]


def _wheel_nvrtc(major: int) -> str | None:
  """libnvrtc of NVIDIA's pip wheel for CUDA `major`, where pip put it."""
  relative = (
    os.path.join("nvidia", "cu13", "lib", "libnvrtc.so.13")
    if major >= 13
    else os.path.join("nvidia", "cuda_nvrtc", "lib", f"libnvrtc.so.{major}")
  )
  for root in sys.path:
    path = os.path.join(root or ".", relative)
    if os.path.isfile(path):
      return path
  return None


def _toolkit_nvrtc(major: int) -> str | None:
  for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
    for name in (f"libnvrtc.so.{major}", "libnvrtc.so"):
      path = os.path.join(home or "", "lib64", name)
      if home and os.path.isfile(path):
        return path
  return None


def nvrtc_library() -> str:
  """Where the CUDA backend loads NVRTC from: OPTAX_PAGED8BIT_NVRTC, else the
  wheel of JAX's CUDA major, else a CUDA toolkit's, else the name the dynamic
  linker looks up."""
  override = os.environ.get("OPTAX_PAGED8BIT_NVRTC")
  if override:
    return override
  majors = _cuda_majors()
  for major in majors:
    path = _wheel_nvrtc(major) or _toolkit_nvrtc(major)
    if path:
      return path
  return f"libnvrtc.so.{majors[0]}"


def kernel_cache_dir() -> str:
  """Where compiled kernels are kept: OPTAX_PAGED8BIT_CACHE_DIR, else the
  user's cache folder."""
  override = os.environ.get("OPTAX_PAGED8BIT_CACHE_DIR")
  if override:
    return os.path.abspath(override)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "optax_paged8bit")


_ops.configure_cuda(nvrtc_library(), kernel_cache_dir())
# The eviction watch's thread (memory.set_eviction_watch) is stopped before the
# interpreter and the CUDA driver go away (it exists only once a GPU state did).
atexit.register(_ops.set_eviction_watch, False)


@functools.cache
def _nvrtc_problem() -> str | None:
  """Why NVRTC cannot compile the kernels (the backend's own loader says), or
  None when it can."""
  return _ops.nvrtc_problem(nvrtc_library()) or None


def check_backend(platform: str) -> None:
  """Raises when the arrays live on a platform this process cannot serve."""
  if platform in ("gpu", "cuda") and _nvrtc_problem():
    raise RuntimeError(_nvrtc_problem())
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
