"""Runs a few fused steps of one benchmark case, for a profiler (ncu) to
attach to: `ncu -k regex:op8_update -s 2 -c 1 python benchmarks/profile_step.py 0`."""

from __future__ import annotations

import sys

import jax
from bench_adamw import CASES, jitted_step, make_tree

import optax_paged8bit as op

name, (shapes, dtype) = list(CASES.items())[int(sys.argv[1]) if len(sys.argv) > 1 else 0]
params = make_tree(shapes, dtype, jax.random.PRNGKey(0))
grads = make_tree(shapes, dtype, jax.random.PRNGKey(1))
tx = op.paged_adamw8bit(2e-4)
state = tx.init(params)
step = jitted_step(tx, fused=True)
for _ in range(4):
  params, state = step(params, state, grads)
jax.block_until_ready(params)
print(name, "done")
