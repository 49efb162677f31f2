"""The resident fused step of benchmarks/paging_pressure.py's tree alone (64 x
(4096, 4096) float32, a 2.03 GiB state), for A/B runs of two builds in one
run on one GPU (the eviction check's cost on a resident step):

    pip install --no-build-isolation --no-deps ./old && python benchmarks/resident_step.py old
    pip install --no-build-isolation --no-deps . && python benchmarks/resident_step.py new

Prints the median and minimum of 60 awaited steps after 5 warm-up steps.
"""

import statistics
import sys

import jax
from paging_pressure import make_tree, timed

import optax_paged8bit as op


def main():
  label = sys.argv[1] if len(sys.argv) > 1 else "this build"
  tx = op.paged_adamw8bit(2e-4)
  params = make_tree(64, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: p * 1e-3, make_tree(64, jax.random.PRNGKey(1)))
  step = jax.jit(lambda p, s: tx.fused_update(grads, s, p), donate_argnums=(0, 1))
  carry = (params, tx.init(params))
  for _ in range(5):
    _, carry = timed(step, carry)
  times = []
  for _ in range(60):
    ms, carry = timed(step, carry)
    times.append(ms)
  print(f"{label}: resident step median {statistics.median(times):.3f} ms, min {min(times):.3f} ms")


if __name__ == "__main__":
  main()
