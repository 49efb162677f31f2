"""Compiles a source tree's csrc/cuda_kernels.cu to a CUBIN with NVRTC and
the options of csrc/cuda_api.cc (kOptions), as the extension does at first
use: for comparing two versions of the kernels without a GPU (sass_same.sh).

    python benchmarks/nvrtc_cubin.py CSRC_DIR ARCH OUT.cubin
"""

from __future__ import annotations

import ctypes
import pathlib
import sys

import optax_paged8bit as op

OPTIONS = [
  "-std=c++17",
  "--fmad=false",
  "--prec-div=true",
  "--prec-sqrt=true",
  "--ftz=false",
  "-default-device",
]


def nvrtc_compile(source: bytes, name: str, arch: int, options=(), headers=()) -> bytes:
  """`source` compiled to a CUBIN for sm_`arch` by the NVRTC the extension
  loads, with `options` and `headers` ((name, text) pairs it includes);
  raises with NVRTC's log when it does not compile."""
  nvrtc = ctypes.CDLL(op._ffi.nvrtc_library())
  program = ctypes.c_void_p()
  array = lambda items: (ctypes.c_char_p * len(items))(*items)
  if nvrtc.nvrtcCreateProgram(
    ctypes.byref(program),
    source,
    name.encode(),
    len(headers),
    array([text for _, text in headers]),
    array([n.encode() for n, _ in headers]),
  ):
    raise RuntimeError(f"nvrtcCreateProgram failed for {name}")
  options = [o.encode() for o in [*options, f"-arch=sm_{arch}"]]
  if nvrtc.nvrtcCompileProgram(program, len(options), array(options)) != 0:
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    raise RuntimeError(log.value.decode())
  size = ctypes.c_size_t()
  nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
  cubin = ctypes.create_string_buffer(size.value)
  nvrtc.nvrtcGetCUBIN(program, cubin)
  return cubin.raw


def compile_cubin(csrc: pathlib.Path, arch: int) -> bytes:
  headers = [(name, (csrc / name).read_bytes()) for name in ("adam8bit.h", "cuda_kernels.h")]
  source = (csrc / "cuda_kernels.cu").read_bytes()
  return nvrtc_compile(source, "cuda_kernels.cu", arch, OPTIONS, headers)


if __name__ == "__main__":
  csrc, arch, out = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
  out.write_bytes(compile_cubin(csrc, arch))
