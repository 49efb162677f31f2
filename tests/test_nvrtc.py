"""The CUDA kernels compiled at first use by NVRTC, with no GPU and no CUDA
toolkit: NVRTC from NVIDIA's pip wheel (the test extra installs it, as JAX's
CUDA wheels do), for sm_80 and sm_90 here (the programs a first step needs;
.ci/run compiles every program for sm_80, sm_90 and sm_100 and checks them
with check_cubins), the compiled kernels cached on disk, written atomically,
found by the next process; and the errors of what cannot work.

Run as a script, `python tests/test_nvrtc.py ARCH...` compiles every program
for each ARCH into a fresh cache and checks the CUBINs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import optax_paged8bit as op

# A fresh process compiles (or finds) the kernels for one GPU architecture.
COMPILE = """
import json, sys, time
import optax_paged8bit as op
start = time.perf_counter()
programs = [int(p) for p in sys.argv[2].split(",")] if sys.argv[2] else None
paths, compiled = op._ffi._ops.compile_kernels(int(sys.argv[1]), programs)
print(json.dumps({"paths": paths, "compiled": compiled, "seconds": time.perf_counter() - start}))
"""

ENTRY_POINTS = [
  *(b"op8_update_params_" + t for t in (b"f32", b"bf16", b"f16")),
  *(b"op8_update_updates_" + t for t in (b"f32", b"bf16", b"f16")),
  b"op8_block_norm_sq",
  b"op8_ring_scale",
  b"op8_whole_leaf_max",
  b"op8_build_quant_tables",
  b"op8_store_whole_scales",
  b"op8_store_words",
  b"op8_load_latency",
  b"op8_copy_ranges",
]


def start(cache: pathlib.Path, arch: int, programs: str = "") -> subprocess.Popen:
  env = {**os.environ, "OPTAX_PAGED8BIT_CACHE_DIR": str(cache), "XLA_FLAGS": ""}
  return subprocess.Popen(
    [sys.executable, "-c", COMPILE, str(arch), programs],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def result(process: subprocess.Popen) -> dict:
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, out + err
  return {**json.loads(out.strip().splitlines()[-1]), "stderr": err}


def check_cubins(paths: list[str], arch: int) -> bytes:
  """The CUBINs of one architecture: ELF files, named for it, that hold every
  entry point between them (the small kernels, then each update kernel in a
  program of its own); returns them joined."""
  assert len(paths) == 7, paths
  data = b""
  for path in map(pathlib.Path, paths):
    assert f"-sm{arch}-" in path.name, path
    blob = path.read_bytes()
    assert blob[:4] == b"\x7fELF", path
    data += blob
  assert all(name in data for name in ENTRY_POINTS)
  for update, path in zip(ENTRY_POINTS[:6], paths[1:], strict=True):
    assert update + b"\x00" in pathlib.Path(path).read_bytes(), (update, path)
  return data


def test_nvrtc_is_found_where_pip_put_it():
  library = op._ffi.nvrtc_library()
  assert os.path.isfile(library) and "libnvrtc.so" in library, library
  assert op._ffi._nvrtc_problem() is None


def test_kernels_compile_without_a_gpu_racing_processes_and_an_unwritable_cache(tmp_path):
  """Three processes compile at once: two for sm_90 into one empty cache, the
  small kernels and the fused float32 update (what a first step needs; each
  renames whole files into place: no reader sees part of one, and no
  temporary file stays), one the small kernels and the optax path's float32
  update for sm_80, the architecture floor, with a cache folder that cannot
  be made (it compiles all the same, keeps nothing, and says why once on
  stderr). A fourth process finds the two sm_90 programs and compiles
  nothing. (.ci/run compiles every program for sm_80, sm_90 and sm_100, with
  check_cubins.)"""
  cache = tmp_path / "cache"
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  first_step = "0,1"
  first, second = start(cache, 90, first_step), start(cache, 90, first_step)
  floor = start(blocker / "cache", 80, "0,4")
  a, b, c = result(first), result(second), result(floor)
  assert a["compiled"] and b["compiled"] and a["paths"] == b["paths"], (a, b)
  assert a["stderr"] == b["stderr"] == "", (a, b)
  assert [bool(p) for p in a["paths"]] == [True, True] + [False] * 5, a
  assert sorted(p.name for p in cache.iterdir()) == sorted(
    pathlib.Path(p).name for p in a["paths"] if p
  )
  assert c["compiled"] and c["paths"] == [""] * 7, c
  assert c["stderr"].count("cannot be cached") == 1, c["stderr"]
  assert "OPTAX_PAGED8BIT_CACHE_DIR" in c["stderr"] and "a_file" in c["stderr"], c["stderr"]
  again = result(start(cache, 90, first_step))
  assert again["paths"] == a["paths"] and not again["compiled"], again
  assert again["seconds"] < 5, again
  for path in a["paths"][:2]:
    assert pathlib.Path(path).read_bytes()[:4] == b"\x7fELF", path
  assert b"op8_update_params_f32\x00" in pathlib.Path(a["paths"][1]).read_bytes()
  with pytest.raises(RuntimeError, match=r"no program 7 \(0\.\.6\)"):
    op._ffi._ops.compile_kernels(90, [7])


def test_gpus_below_the_floor_and_archs_nvrtc_lacks_say_so():
  floor = r"compute capability 8\.0 \(Ampere\) or newer; this one is 7\.5"
  with pytest.raises(RuntimeError, match=floor):
    op._ffi._ops.compile_kernels(75)
  with pytest.raises(RuntimeError, match=r"NVRTC 1\d\.\d+ cannot compile for sm_990"):
    op._ffi._ops.compile_kernels(990)


def test_a_driver_older_than_nvrtc_says_what_to_install():
  nvrtc_major = int(op._ffi.nvrtc_library().rsplit(".so.", 1)[1].split(".")[0])
  assert op._ffi._ops.driver_problem(nvrtc_major * 1000) == ""
  assert op._ffi._ops.driver_problem(nvrtc_major * 1000 + 80) == ""
  old = (nvrtc_major - 1) * 1000 + 80
  message = op._ffi._ops.driver_problem(old)
  assert f"supports CUDA {nvrtc_major - 1}.8, older than the NVRTC {nvrtc_major}." in message
  assert f"jax[cuda{nvrtc_major - 1}]" in message and f"driver for CUDA {nvrtc_major}" in message


def test_the_extension_runs_on_this_jax_and_one_built_for_a_newer_says_so():
  built = tuple(op._ffi._ops.ffi_api_version)
  framework = op._ffi._framework_ffi_api_version()
  assert framework is not None and built[0] == framework[0] and built[1] <= framework[1]
  op._ffi.check_ffi_api_version(built, framework)
  op._ffi.check_ffi_api_version((framework[0], framework[1] - 1), framework)
  newer = (framework[0], framework[1] + 1)
  with pytest.raises(ImportError, match=rf"built against XLA FFI API {newer[0]}\.{newer[1]}"):
    op._ffi.check_ffi_api_version(newer, framework)
  with pytest.raises(ImportError, match="--no-build-isolation"):
    op._ffi.check_ffi_api_version((framework[0] + 1, 0), framework)


if __name__ == "__main__":
  import tempfile
  import time

  for arch in map(int, sys.argv[1:]):
    op._ffi._ops.configure_cuda(op._ffi.nvrtc_library(), tempfile.mkdtemp())  # a fresh cache
    begin = time.perf_counter()
    paths, compiled = op._ffi._ops.compile_kernels(arch)
    assert compiled, paths
    check_cubins(paths, arch)
    print(
      f"sm_{arch}: {len(paths)} CUBINs, every entry point, in {time.perf_counter() - begin:.1f} s"
    )
