"""The examples, run as a user runs them: train_digits.py stopped and resumed
from its orbax checkpoints ends bit-identical to a run never stopped;
pjit_sharded.py as 2 jax.distributed processes started by launch.py."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def digits(tmp_path, *args) -> dict[str, str]:
  done = subprocess.run(
    [sys.executable, str(EXAMPLES / "train_digits.py"), "--plot", str(tmp_path / "p.png"), *args],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  line = re.search(r"params digests: (.*)", done.stdout).group(1)
  return dict(part.rsplit(" ", 1) for part in line.split(", "))


def test_train_digits_resumes_from_its_checkpoints_bit_identically(tmp_path):
  unbroken = digits(tmp_path, "--steps", "90")
  ckpt = str(tmp_path / "ckpt")
  digits(
    tmp_path, "--steps", "50", "--checkpoint-dir", ckpt, "--checkpoint-every", "20", "--keep", "2"
  )
  kept = sorted(p.name for p in (tmp_path / "ckpt" / "paged_adamw8bit").iterdir())
  assert kept == ["40", "50"]  # every 20 steps and the last, the last 2 kept
  resumed = digits(tmp_path, "--steps", "90", "--checkpoint-dir", ckpt, "--resume")
  assert resumed == unbroken


def test_pjit_sharded_runs_as_two_processes(tmp_path):
  done = subprocess.run(
    [
      sys.executable,
      str(EXAMPLES / "launch.py"),
      "-n",
      "2",
      str(EXAMPLES / "pjit_sharded.py"),
      "--steps",
      "20",
      "--plot",
      str(tmp_path / "loss.png"),
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
    # Without this process's 8 fake devices: the script gives each process 4.
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  # The script exits non-zero when its loss does not go down.
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "2 process(es), 8 cpu devices, mesh {'data': 2, 'model': 4}" in done.stdout
  assert (tmp_path / "loss.png").exists()
