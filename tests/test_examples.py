"""The examples, run as a user runs them: train_digits.py stopped and resumed
from its orbax checkpoints ends bit-identical to a run never stopped, and
launch.py gives each process its arguments and its GPU. (.ci/run runs the
others whole, each failing on its own checks: pjit_sharded.py and
fsdp_qlora.py on 8 fake devices and as 2 processes, lora_finetune.py, which
checks that only its adapters change, that the loss goes down and that its
state is under a third of optax.adamw's.)"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import shared_compilation_cache

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(tmp_path, script: str, *args: str) -> str:
  """Runs examples/<script> with `args` in tmp_path, as a user would (without
  this test process's 8 fake devices); returns its output. The examples exit
  non-zero when their own checks fail (a loss that does not go down, ...).
  The runs of one test share their compiled programs."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    [sys.executable, str(EXAMPLES / script), *args],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
    env={**env, **shared_compilation_cache(tmp_path)},
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return done.stdout


def digits(tmp_path, *args) -> dict[str, str]:
  out = run_example(tmp_path, "train_digits.py", "--plot", str(tmp_path / "p.png"), *args)
  line = re.search(r"params digests: (.*)", out).group(1)
  return dict(part.rsplit(" ", 1) for part in line.split(", "))


def test_train_digits_resumes_from_its_checkpoints_bit_identically(tmp_path):
  unbroken = digits(tmp_path, "--steps", "40")
  ckpt = str(tmp_path / "ckpt")
  digits(
    tmp_path, "--steps", "25", "--checkpoint-dir", ckpt, "--checkpoint-every", "10", "--keep", "2"
  )
  kept = sorted(p.name for p in (tmp_path / "ckpt" / "paged_adamw8bit").iterdir())
  assert kept == ["20", "25"]  # every 10 steps and the last, the last 2 kept
  resumed = digits(tmp_path, "--steps", "40", "--checkpoint-dir", ckpt, "--resume")
  assert resumed == unbroken


def test_launch_gives_each_process_its_own_gpu_and_its_arguments(tmp_path):
  """launch.py --one-gpu-each, checked with a script that writes what it got
  (the 2-GPU run of pjit_sharded.py is in benchmarks/RESULTS.md)."""
  script = tmp_path / "show.py"
  script.write_text(
    "import os, sys\n"
    "i = sys.argv[sys.argv.index('--process-id') + 1]\n"
    "with open(f'got_{i}.txt', 'w') as f:\n"
    "  f.write(os.environ.get('CUDA_VISIBLE_DEVICES', '-') + ' ' + ' '.join(sys.argv[1:]))\n"
  )
  run_example(tmp_path, "launch.py", "-n", "3", "--one-gpu-each", str(script), "--steps", "5")
  for i in range(3):
    visible, *args = (tmp_path / f"got_{i}.txt").read_text().split()
    assert visible == str(i)
    assert args[:6] == ["--steps", "5", "--num-processes", "3", "--process-id", str(i)]
    assert args[6] == "--coordinator" and args[7].startswith("127.0.0.1:")
