"""Shared test helpers."""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import subprocess

# 8 fake CPU devices for the sharding tests (single-device tests use device 0);
# set before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax
import jax.numpy as jnp
import pytest

import optax_paged8bit as op

# Platform of the multi-device tests: 8 fake CPU devices by default; on a
# machine with several GPUs, OPTAX_PAGED8BIT_TEST_PLATFORM=gpu runs them there.
TEST_PLATFORM = os.environ.get("OPTAX_PAGED8BIT_TEST_PLATFORM", "cpu")


def mesh_devices(n: int) -> list:
  """The first n devices of the test platform; skips the test when there are fewer."""
  devices = jax.devices(TEST_PLATFORM)
  if len(devices) < n:
    pytest.skip(f"needs {n} {TEST_PLATFORM} devices, found {len(devices)}")
  return devices[:n]


@contextlib.contextmanager
def raises_at_runtime(match: str):
  """Expects the custom call to fail with `match` when the result is awaited.

  JAX keeps the runtime token of the last side-effecting computation per
  device and waits for it at exit; a successful side-effecting call afterwards
  replaces the failed one so that the error is not reported twice.
  """
  with pytest.raises(Exception, match=match):
    yield
  fresh = op.paged_adamw8bit().init({"x": jnp.zeros(1)})
  jax.block_until_ready(op.export_state(fresh))
  op.release(fresh)


def settled_registry_bytes() -> int:
  """Frees the registry memory of every state that earlier tests dropped (some
  reachable only from garbage cycles, such as a caught exception's frames) and
  returns the bytes still held, so that a test can count bytes without a
  collection freeing other tests' states in between."""
  gc.collect()
  op.collect()
  return op._ffi.total_bytes()


def shared_compilation_cache(tmp_path) -> dict[str, str]:
  """Environment variables that give the fresh processes one test starts
  JAX's persistent compilation cache, in the test's own tmp_path: a program
  compiled by one process is loaded, not compiled again, by the next (on a
  CPU of 2 cores, compiling takes most of an example's run). The same
  program compiles to the same executable, so what the processes compute is
  unchanged; no other test and no later run sees the cache."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_compilation_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


NATIVE = pathlib.Path(__file__).parent / "native"
CSRC = pathlib.Path(__file__).parent.parent / "csrc"


def run_native_check(compiler: list[str], source: str, args: list[str], tmp_path) -> list[str]:
  """Builds tests/native/`source` with `compiler` (and its flags) against
  csrc/, runs it with `args`, asserts it succeeded; returns its output's words."""
  exe = tmp_path / pathlib.Path(source).stem
  subprocess.run([*compiler, f"-I{CSRC}", "-o", str(exe), str(NATIVE / source)], check=True)
  out = subprocess.run([str(exe), *args], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout.split()
