"""Fake CPU devices for a mesh on one machine, for the sharded examples: 8 in
all, shared among the processes of a --num-processes run (ignored when GPUs
are used). Imported before jax, whose CPU backend reads XLA_FLAGS once."""

from __future__ import annotations

import os
import sys

TOTAL = 8

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  processes = (
    int(sys.argv[sys.argv.index("--num-processes") + 1]) if "--num-processes" in sys.argv else 1
  )
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={max(1, TOTAL // processes)}"
  ).strip()
