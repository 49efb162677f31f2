"""The eviction sign's rules (csrc/eviction_sign.h) checked on the CPU: when a
step's check and the eviction watch count a GPU state as evicted by a memory
spike, and when the watch brings it back (the GPU tests in test_gpu.py make
real spikes). Sizes in MiB."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_native_check

GIB = 1024  # MiB

# (query, expected): a state of 2 GiB on the device (its sign: a rise of
# more than 128 MiB); its last step saw 60 GiB free.
CASES = [
  # The step's check.
  (["sign", 2048, 60 * GIB, 62 * GIB], 1),  # the spike evicted it and is gone
  (["sign", 2048, 60 * GIB, 60 * GIB + 128], 0),  # a sixteenth is not more than a sixteenth
  (["sign", 2048, 60 * GIB, 60 * GIB + 129], 1),
  (["sign", 2048, 60 * GIB, 1], 0),  # the spike is still there
  (["sign", 2048, 0, 62 * GIB], 0),  # nothing to compare with (the last step moved the pages)
  (["sign", 0, 60 * GIB, 62 * GIB], 0),  # nothing on the device (paged out, pinned)
  (["sign", 16, 60 * GIB, 60 * GIB + 2], 0),  # a small state's sign is at least 2 MiB
  (["sign", 16, 60 * GIB, 60 * GIB + 3], 1),
  # The watch: the sign, and the device seen full or the state idle for 0.3 s.
  (["watch", 2048, 60 * GIB, 62 * GIB, 1, 0], 1),
  (["watch", 2048, 60 * GIB, 62 * GIB, 0, 300], 1),
  (["watch", 2048, 60 * GIB, 62 * GIB, 0, 299], 0),  # XLA handing a step's buffers back
  (["watch", 2048, 60 * GIB, 60 * GIB + 100, 1, 5000], 0),  # no sign
  (["watch", 2048, 0, 62 * GIB, 1, 5000], 0),  # restored already: only a step sets it again
  # Full: under a thirty-second of the device's memory.
  (["full", 2 * GIB, 80 * GIB], 1),
  (["full", 2560, 80 * GIB], 0),
  (["full", 2559, 80 * GIB], 1),
  # A residency probe that made the driver take device memory moves the
  # reference down as far, so the sign survives it.
  (["probe", 60 * GIB, 62 * GIB, 60 * GIB], 58 * GIB),
  (["probe", 60 * GIB, 62 * GIB, 62 * GIB], 60 * GIB),  # the probe took nothing
  (["probe", 60 * GIB, 60 * GIB, 61 * GIB], 60 * GIB),  # free memory rose meanwhile
  (["probe", 0, 62 * GIB, 60 * GIB], 0),  # nothing to compare with stays so
  (["probe", 1 * GIB, 70 * GIB, 60 * GIB], 0),  # never below nothing
]


@pytest.fixture(scope="module")
def compiler():
  found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  assert found, "a C++ compiler is needed (the extension's build needs one too)"
  return [found, "-O1", "-std=c++17"]


def test_the_sign_the_watch_and_the_probe_follow_their_rules(compiler, tmp_path):
  args = [str(word) for query, _ in CASES for word in query]
  words = run_native_check(compiler, "eviction_sign_check.cc", args, tmp_path)
  assert len(words) == len(CASES), words
  for (query, expected), got in zip(CASES, words, strict=True):
    assert int(got) == expected, (query, got)


def test_the_sign_survives_a_probe_after_a_spike(compiler, tmp_path):
  """What the first version missed (benchmarks/RESULTS.md): after a spike
  evicted 2 GiB and was freed, a residency probe took the 2 GiB of free
  memory back; the next step must still find the sign."""
  seen, after_spike, after_probe = 60 * GIB, 62 * GIB, 60 * GIB
  query = ["probe", seen, after_spike, after_probe]
  [kept] = run_native_check(compiler, "eviction_sign_check.cc", [str(w) for w in query], tmp_path)
  query = ["sign", 2048, seen, after_probe, "sign", 2048, kept, after_probe]
  words = run_native_check(compiler, "eviction_sign_check.cc", [str(w) for w in query], tmp_path)
  assert words == ["0", "1"]  # hidden without the probe's correction, found with it
