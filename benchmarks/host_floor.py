"""The host's floor for a step over many small leaves: a jitted fused
`paged_adamw8bit` step against a bare jitted SGD step that takes and returns
the same arrays (params and grads in, params out), and `optax.adamw`'s update +
apply_updates. With leaves of a few elements the device work is negligible,
so each figure (the median of awaited steps) is what JAX's dispatch and the
call cost on the host.

  python benchmarks/host_floor.py --leaves 1152 --size 16
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from bench_adamw import time_steps

import optax_paged8bit as op


def awaited_ms(step, carry, iters):
  """Median ms of `carry = step(*carry)`, each step awaited (bench_adamw's)."""
  return time_steps(step, carry, iters)[0] * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--leaves", type=int, default=1152)
  parser.add_argument("--size", type=int, default=16, help="float32 elements per leaf")
  parser.add_argument("--iters", type=int, default=30)
  args = parser.parse_args()

  def tree(value=1.0):
    return {f"leaf{i:05d}": jnp.full((args.size,), value, jnp.float32) for i in range(args.leaves)}

  grads = tree(0.01)
  tx = op.paged_adamw8bit(1e-3)
  params = tree()
  fused = jax.jit(lambda p, s: tx.fused_update(grads, s, p), donate_argnums=(0, 1))
  fused_ms = awaited_ms(fused, (params, tx.init(params)), args.iters)

  sgd = jax.jit(lambda p: (jax.tree.map(lambda a, b: a - 0.1 * b, p, grads),), donate_argnums=0)
  sgd_ms = awaited_ms(sgd, (tree(),), args.iters)

  adamw = optax.adamw(1e-3)

  def adamw_step(p, s):
    u, s = adamw.update(grads, s, p)
    return optax.apply_updates(p, u), s

  params = tree()
  adamw_ms = awaited_ms(
    jax.jit(adamw_step, donate_argnums=(0, 1)), (params, adamw.init(params)), args.iters
  )
  print(
    f"{args.leaves} leaves of {args.size} float32 on {jax.devices()[0].device_kind}: "
    f"paged fused {fused_ms:.2f} ms, bare SGD {sgd_ms:.2f} ms, "
    f"optax.adamw {adamw_ms:.2f} ms per awaited step (median)"
  )


if __name__ == "__main__":
  main()
