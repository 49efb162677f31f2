"""Dynamic maps bit-equal to the reference tables; scale shapes; dequantize."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest
from conftest import run_native_check

from optax_paged8bit import quantization as q

REFERENCE = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_bit_equal_to_reference(signed):
  name = "signed" if signed else "unsigned"
  text = (REFERENCE / f"dynamic_map_{name}.txt").read_text().split()
  ref = np.array([np.float32(x) for x in text], np.float32)
  got = q.dynamic_map(signed)
  assert got.dtype == np.float32 and got.shape == (256,)
  np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_map_landmarks():
  assert q.QMAP_SIGNED[127] == 0.0 and q.QMAP_SIGNED[255] == 1.0
  assert q.QMAP_SIGNED[0] == np.float32(-0.99296874) and -1.0 not in q.QMAP_SIGNED
  assert q.QMAP_UNSIGNED[0] == 0.0 and q.QMAP_UNSIGNED[255] == 1.0
  assert np.all(np.diff(q.QMAP_SIGNED) > 0) and np.all(np.diff(q.QMAP_UNSIGNED) > 0)


@pytest.mark.parametrize(
  ("shape", "block_wise", "want"),
  [
    ((1024, 512), True, (1024, 2)),
    ((4097,), True, (17,)),
    ((3, 300), True, (4,)),
    ((512,), True, (2,)),
    ((64, 80), False, (1,)),
  ],
)
def test_scale_shape(shape, block_wise, want):
  assert q.scale_shape(shape, block_wise) == want


def test_dequantize_blockwise_and_whole():
  codes = np.array([255, 127, 0, 255] * 128, np.uint8).reshape(2, 256)
  absmax = np.array([2.0, 4.0], np.float32)
  out = np.asarray(q.dequantize_blockwise(codes, absmax, q.QMAP_SIGNED))
  assert out[0, 0] == 2.0 and out[1, 0] == 4.0 and out[0, 1] == 0.0
  whole = q.dequantize_blockwise(codes, np.array([3.0], np.float32), q.QMAP_SIGNED, False)
  assert whole[1, 3] == 3.0


def test_fast_quantizer_route_equals_definition(tmp_path):
  # Both backends quantize through adam8bit.h's tables (midpoint counts per
  # bucket); the definition is the nearest map entry with ties to even. The
  # check program compares them on every 257th float32 bit pattern (the whole
  # range was checked once, stride 1: see benchmarks/RESULTS.md).
  compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  assert compiler, "a C++ compiler is needed (the extension's build needs one too)"
  maps = tmp_path / "qmaps.bin"
  q.QMAPS.astype(np.float32).tofile(maps)
  words = run_native_check(
    [compiler, "-O2", "-std=c++17", "-ffp-contract=off"],
    "quantizer_check.cc",
    [str(maps), "257"],
    tmp_path,
  )
  assert words[-4:] == ["mismatches", "0", "fast", "1"], words
  assert int(words[1]) == (1 << 32) // 257 + 1
