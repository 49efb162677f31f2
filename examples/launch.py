"""Starts N processes of a jax.distributed script on this machine, the way a
cluster launcher starts one per host or GPU:

  python examples/launch.py -n 2 examples/pjit_sharded.py --steps 100

Each process gets `--num-processes N --process-id I --coordinator
127.0.0.1:PORT` after the script's own arguments. Process 0's output is shown
as it comes; the others' output is shown if they fail. Exits with the first
non-zero exit status. On a machine with several GPUs, --one-gpu-each gives
process I only GPU I (CUDA_VISIBLE_DEVICES=I), as `srun --gpus-per-task=1`
does on a cluster:

  python examples/launch.py -n 2 --one-gpu-each examples/pjit_sharded.py
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("-n", "--num-processes", type=int, default=2)
  parser.add_argument(
    "--one-gpu-each", action="store_true", help="process I sees only GPU I (CUDA_VISIBLE_DEVICES)"
  )
  parser.add_argument("script")
  parser.add_argument("args", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  coordinator = f"127.0.0.1:{free_port()}"
  procs, logs = [], []
  for i in range(args.num_processes):
    extra = ["--num-processes", str(args.num_processes), "--process-id", str(i)]
    command = [sys.executable, args.script, *args.args, *extra, "--coordinator", coordinator]
    log = None if i == 0 else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed below)
    logs.append(log)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i)) if args.one_gpu_each else None
    stderr = subprocess.STDOUT if log else None
    procs.append(subprocess.Popen(command, stdout=log, stderr=stderr, env=env))
  status = 0
  for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
    code = p.wait()
    if code != 0 and log is not None:
      log.seek(0)
      print(f"--- process {i} exited with {code}:\n{log.read()[-4000:]}", file=sys.stderr)
    if log is not None:
      log.close()
    status = status or code
  return status


if __name__ == "__main__":
  sys.exit(main())
