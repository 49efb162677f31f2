"""Multi-process training: jax.distributed on 127.0.0.1 with 2 and 4
processes of 2 CPU devices each (gloo collectives), or with
OPTAX_PAGED8BIT_TEST_PLATFORM=gpu 2 processes of one GPU each, against one
process on a mesh of the same shape. The processes run
multiprocess_worker.py."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import multiprocess_worker as worker
import numpy as np
import pytest
from conftest import TEST_PLATFORM, mesh_devices
from test_oracle import assert_bit_equal

import optax_paged8bit as op

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# On GPUs (OPTAX_PAGED8BIT_TEST_PLATFORM=gpu) each process takes one GPU, and
# a mesh of one process per device is compared with this process's GPUs.
PER_PROCESS = 1 if TEST_PLATFORM == "gpu" else 2


def worker_env(i: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  if TEST_PLATFORM == "gpu":
    # This process holds its own share of every GPU; each worker takes a little of one.
    env |= {"CUDA_VISIBLE_DEVICES": str(i), "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1"}
  else:
    env |= {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  return env


def launch(n: int, out: pathlib.Path, *args: str) -> dict[str, np.ndarray]:
  """Runs n worker processes to the end; returns process 0's result."""
  out.mkdir(parents=True, exist_ok=True)
  mesh_devices(n * PER_PROCESS)  # skips the test when this machine has fewer
  port = free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(WORKER),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n),
        "--process-id",
        str(i),
        "--out",
        str(out),
        "--platform",
        TEST_PLATFORM,
        *args,
      ],
      env=worker_env(i),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(n)
  ]
  logs, timed_out = [], False
  for p in procs:
    try:
      logs.append(p.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:
      # One process waiting for another that failed: kill them all and show every log.
      timed_out = True
      for q in procs:
        q.kill()
      logs.append(p.communicate()[0])
  for i, p in enumerate(procs):
    why = "timed out (killed after 150 s)" if timed_out else "failed"
    tails = "\n".join(f"--- process {j}:\n{log[-3000:]}" for j, log in enumerate(logs))
    assert p.returncode == 0 and not timed_out, f"process {i} of {n} {why}:\n{tails}"
  with np.load(out / "result.npz") as f:
    return dict(f)


def reference(devices: int, *segments: tuple[int, int]) -> dict[str, np.ndarray]:
  """One process, a mesh of `devices` fake CPU devices: the worker's training
  for each (steps, first grad seed) segment in turn."""
  mesh = jax.sharding.Mesh(np.asarray(mesh_devices(devices)), ("x",))
  result = worker.fresh(mesh)
  for steps, seed in segments:
    result = worker.train(mesh, result, steps, seed)
  values = worker.gathered(result)
  op.release(worker.checkpoint_tree(result))
  return values


def assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    assert_bit_equal(got[k], want[k], k)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_train_bit_identical_to_one_process(processes, tmp_path):
  """Process 1 makes and steps a state of its own first: handles differ
  between processes, and the shared step must not mind."""
  got = launch(processes, tmp_path, "--extra-state", "--checks")
  assert_same(got, reference(PER_PROCESS * processes, (3, 10)))
  for i in range(processes):
    checks = json.loads((tmp_path / f"checks_{i}.json").read_text())
    assert "stale optimizer state" in checks["stale_error"], checks
    # The dropped state's slots on this process's devices were freed.
    assert checks["freed"] == checks["state_bytes_here"], checks
    assert checks["held_before"] - checks["held_after"] == checks["freed"], checks


def test_checkpoint_of_two_processes_resumes_in_four_and_in_one(tmp_path):
  ckpt = tmp_path / "ckpt"
  first = launch(2, tmp_path / "a", "--save", str(ckpt))
  assert_same(first, reference(2 * PER_PROCESS, (3, 10)))
  want = reference(2 * PER_PROCESS, (3, 10), (3, 100))
  # Four new processes (a mesh of 8 CPU devices; shards stay block-aligned).
  if TEST_PLATFORM == "cpu":
    assert_same(launch(4, tmp_path / "b", "--resume", str(ckpt)), want)
  # This process, a mesh of 2 devices.
  mesh = jax.sharding.Mesh(np.asarray(mesh_devices(2)), ("x",))
  restored = op.restore_checkpoint(ckpt, worker.checkpoint_tree(worker.fresh(mesh)))
  start = tuple(restored[k] for k in ("paged_params", "paged_state", "params", "state"))
  result = worker.train(mesh, start, 3, 100)
  assert_same(worker.gathered(result), want)
  op.release(worker.checkpoint_tree(result))
