"""Seconds of `save_checkpoint` and of `restore_checkpoint` for a tree of many
leaf shapes, each in a fresh process (nothing compiled yet), with the leaves'
checksums computed as the library does (one compiled function per set of
devices) and, as the baseline in the same run, one leaf at a time (one
compile per leaf shape, as before).

    python benchmarks/checkpoint_time.py --shapes 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time


def child(mode: str, per_leaf: bool, shapes: int, where: str) -> float:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import optax_paged8bit as op
  from optax_paged8bit import checkpoint

  if per_leaf:
    checkpoint._checksums = lambda tree: np.asarray(
      [checkpoint._checksum(x) for x in jax.tree.leaves(tree)], np.uint32
    ).reshape(-1)
  params = {f"w{i}": jnp.ones((64 + i, 32 + i), jnp.float32) for i in range(shapes)}
  tx = op.paged_adamw8bit(1e-3)
  if mode == "save":
    params, state = jax.jit(tx.fused_update)(params, tx.init(params), params)
    jax.block_until_ready(op.export_state({"p": params, "o": state}))  # compiled before timing
    t = time.perf_counter()
    op.save_checkpoint(where, {"p": params, "o": state})
  else:
    target = {"p": params, "o": tx.init(params)}
    t = time.perf_counter()
    jax.block_until_ready(op.restore_checkpoint(where, target))
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    mode, per_leaf, where = args.child
    print(child(mode, per_leaf == "1", args.shapes, where))
    return
  out = {}
  for per_leaf in ("0", "1"):
    name = "per_leaf" if per_leaf == "1" else "batched"
    for _ in range(args.repeats):
      where = tempfile.mkdtemp() + "/ckpt"
      for mode in ("save", "restore"):
        command = [sys.executable, __file__, "--shapes", str(args.shapes)]
        done = subprocess.run(
          [*command, "--child", mode, per_leaf, where],
          capture_output=True,
          text=True,
          check=True,
        )
        out.setdefault(f"{name}_{mode}_s", []).append(round(float(done.stdout.split()[-1]), 2))
      shutil.rmtree(where, ignore_errors=True)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
