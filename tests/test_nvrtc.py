"""The CUDA kernels compiled at first use by NVRTC, with no GPU and no CUDA
toolkit: NVRTC from NVIDIA's pip wheel (the test extra installs it, as JAX's
CUDA wheels do), the compiled kernels cached on disk, written atomically,
found by the next process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import optax_paged8bit as op

# A fresh process compiles (or finds) the kernels for one GPU architecture.
COMPILE = """
import json, sys, time
import optax_paged8bit as op
start = time.perf_counter()
path, compiled = op._ffi._ops.compile_kernels(int(sys.argv[1]))
print(json.dumps({"path": path, "compiled": compiled, "seconds": time.perf_counter() - start}))
"""

ENTRY_POINTS = [
  b"op8_update_params",
  b"op8_update_updates",
  b"op8_block_norm_sq",
  b"op8_ring_scale",
  b"op8_whole_leaf_max",
  b"op8_build_quant_tables",
  b"op8_store_whole_scales",
  b"op8_store_words",
  b"op8_load_latency",
]


def start(cache: pathlib.Path, arch: int) -> subprocess.Popen:
  env = {**os.environ, "OPTAX_PAGED8BIT_CACHE_DIR": str(cache), "XLA_FLAGS": ""}
  return subprocess.Popen(
    [sys.executable, "-c", COMPILE, str(arch)], env=env, stdout=subprocess.PIPE, text=True
  )


def result(process: subprocess.Popen) -> dict:
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 0, out
  return json.loads(out.strip().splitlines()[-1])


def test_nvrtc_is_found_where_pip_put_it():
  library = op._ffi.nvrtc_library()
  assert os.path.isfile(library) and "libnvrtc.so" in library, library
  assert op._ffi._nvrtc_problem() is None


def test_kernels_compile_without_a_gpu_two_processes_at_once_and_the_next_one_reuses_them(
  tmp_path,
):
  """Two processes compile for sm_90 into an empty cache at the same time
  (each renames a whole file into place: no reader sees part of one), and a
  third finds the result and compiles nothing."""
  cache = tmp_path / "cache"
  first, second = start(cache, 90), start(cache, 90)
  a, b = result(first), result(second)
  assert a["path"] == b["path"] and a["compiled"] and b["compiled"]
  cubin = pathlib.Path(a["path"])
  assert cubin.parent == cache and "sm90" in cubin.name
  assert [p.name for p in cache.iterdir()] == [cubin.name]  # no temporary file left
  data = cubin.read_bytes()
  assert data[:4] == b"\x7fELF" and all(name in data for name in ENTRY_POINTS)
  again = result(start(cache, 90))
  assert again == {**again, "path": a["path"], "compiled": False} and again["seconds"] < 5
  assert cubin.read_bytes() == data
