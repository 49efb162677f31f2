"""examples/fsdp_qlora.py: its NF4 quantizer against exactly known cases, and
a run resumed from a mid-run checkpoint against the uninterrupted run (CI runs
the whole example on 8 fake devices and as 2 processes)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_compilation_cache

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "fsdp_qlora.py"
sys.path.insert(0, str(EXAMPLE.parent))  # its fake_devices module
spec = importlib.util.spec_from_file_location("fsdp_qlora", EXAMPLE)
qlora = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qlora)

# QLoRA's NF4 levels as its authors published them (bitsandbytes' table).
PUBLISHED_NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
]  # fmt: skip


def test_the_nf4_table_is_qloras():
  table = qlora.nf4_table()
  assert table.dtype == np.float32 and table.shape == (16,)
  np.testing.assert_allclose(table, np.float32(PUBLISHED_NF4), rtol=0, atol=2e-7)
  assert table[7] == 0.0 and table[0] == -1.0 and table[15] == 1.0  # zero and the ends exact


def test_nf4_blocks_scales_and_the_round_trip_of_the_tables_own_values():
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, (4, 256)).astype(np.uint8)
  codes[:, ::64] = 15  # every block holds the level 1.0: its scale is its largest magnitude
  scales = np.float32([[0.5, 2.0, 0.125, 3.0]] * 4) * np.float32([[1], [2], [4], [8]])
  w = qlora.NF4[codes] * np.repeat(scales, 64, axis=1)  # exact: powers of 2 and 3 times levels
  packed, got_scales = qlora.nf4_quantize(w)
  assert packed.dtype == np.uint8 and packed.shape == (4, 128)
  np.testing.assert_array_equal(got_scales, scales)
  np.testing.assert_array_equal(packed >> 4, codes[:, 0::2])  # the first of a pair: high half
  np.testing.assert_array_equal(packed & 15, codes[:, 1::2])
  np.testing.assert_array_equal(
    np.asarray(qlora.nf4_dequantize(jnp.asarray(packed), got_scales)), w
  )
  # Between two levels, the nearer one; a block of zeros keeps a zero scale.
  half = (qlora.NF4[9] + qlora.NF4[10]) / 2
  row = np.zeros((1, 128), np.float32)
  row[0, :2] = [1.0, half - 1e-3]
  packed, got_scales = qlora.nf4_quantize(row)
  assert (packed[0, 0] >> 4, packed[0, 0] & 15) == (15, 9)
  np.testing.assert_array_equal(got_scales, [[1.0, 0.0]])


def run(tmp_path, *args) -> str:
  """Runs the example on 2 fake devices in tmp_path, on the base model
  written there; the runs of one test share their compiled programs (the
  resumed run compiles nothing)."""
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    **shared_compilation_cache(tmp_path),
  }
  done = subprocess.run(
    [sys.executable, str(EXAMPLE), "--base", "base.msgpack", *args],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "base model loaded from base.msgpack" in done.stdout
  return done.stdout


def write_base(tmp_path) -> None:
  """The float base model the runs load: weights of the model's shapes,
  drawn here. Any base will do (the runs are compared with each other);
  pretraining one is not what the test checks (CI runs the whole example)
  and would compile a step of the whole model."""
  import jax
  from flax import serialization

  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(qlora.init_model, jax.random.PRNGKey(0))
  base = jax.tree.map(lambda s: np.float32(0.1) * rng.standard_normal(s.shape, np.float32), shapes)
  (tmp_path / "base.msgpack").write_bytes(serialization.to_bytes(base))


def test_a_run_resumed_from_its_mid_run_checkpoint_equals_the_unbroken_run(tmp_path):
  write_base(tmp_path)
  common = ["--steps", "4", "--checkpoint-every", "2", "--checkpoint-dir", "ckpt"]
  unbroken = run(tmp_path, *common)
  shutil.rmtree(tmp_path / "ckpt" / "4")  # as if stopped after step 2's checkpoint
  resumed = run(tmp_path, *common, "--resume")
  assert "resumed from the checkpoint of step 2" in resumed
  digests = [re.search(r"adapters digest: (\w+)", out).group(1) for out in (unbroken, resumed)]
  assert digests[0] == digests[1]
