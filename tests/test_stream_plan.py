"""The plan of a streamed step (csrc/stream_plan.h) checked on the CPU: every
element and scale of every streamed leaf goes through the window once and
comes back to its place, and nothing else is written (the GPU tests in
test_host_state.py run the plan for real)."""

from __future__ import annotations

import shutil

import jax
import pytest
from conftest import run_native_check


@pytest.fixture(scope="module")
def compiler():
  found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  assert found, "a C++ compiler is needed (the extension's build needs one too)"
  return [found, "-O1", "-std=c++17", f"-I{jax.ffi.include_dir()}"]


def plan(compiler, tmp_path, chunk_bytes, buffers, first, staged):
  words = run_native_check(
    compiler,
    "stream_plan_check.cc",
    [str(chunk_bytes), str(buffers), str(first), str(staged)],
    tmp_path,
  )
  assert words[-2:] == ["bad", "0"], words
  return dict(zip(words[-12::2], map(int, words[-11::2]), strict=True))


@pytest.mark.parametrize(
  ("chunk_bytes", "buffers", "first", "staged"),
  [(1 << 20, 3, 0, 0), (1 << 20, 2, 1, 1), (3 << 20, 8, 5, 0), (32 << 20, 4, 2, 1)],
)
def test_every_streamed_element_goes_through_the_window_once(
  compiler, tmp_path, chunk_bytes, buffers, first, staged
):
  got = plan(compiler, tmp_path, chunk_bytes, buffers, first, staged)
  assert got["max_used"] <= chunk_bytes
  # 300 leaves of one dtype need two launch tables even when they fit one chunk.
  assert got["chunks"] >= 2 and got["pieces"] > got["chunks"]


def test_runs_of_whole_leaves_move_in_one_copy(compiler, tmp_path):
  """With chunks far larger than the leaves, whole leaves laid out in the
  window as in the arena merge into one copy per run."""
  big = plan(compiler, tmp_path, 64 << 20, 2, 0, 0)
  small = plan(compiler, tmp_path, 1 << 20, 2, 0, 0)
  assert big["copies_in"] < big["pieces"] and big["copies_in"] == big["copies_out"]
  assert small["chunks"] > big["chunks"]


def test_the_stream_window_refuses_bad_shapes_and_keeps_its_own():
  """Shapes are checked wherever the GPU is (here, none): a refused one
  leaves the window as it was."""
  from optax_paged8bit import _ffi

  before = _ffi._ops.stream_window()
  mib = 1 << 20
  bad = [(1000, 2), (mib, 1), (mib, 9), (mib + 1, 2), (0, 2), (mib, 2, 256), (mib, 2, -1)]
  for shape in bad:
    with pytest.raises(ValueError, match="chunk_bytes must be at least 1 MiB"):
      _ffi._ops.set_stream_window(*shape)
    assert _ffi._ops.stream_window() == before
  try:
    _ffi._ops.set_stream_window(2 * mib, 3, 64)
    assert _ffi._ops.stream_window() == (2 * mib, 3, 64)
    _ffi._ops.set_stream_window(0, 0)
    assert _ffi._ops.stream_window() == (0, 0, 0)
  finally:
    _ffi._ops.set_stream_window(*before)
  assert _ffi._ops.stream_window() == before
