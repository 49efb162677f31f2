"""Each error path of the custom call in a fresh process, on the CPU and the GPU
backend: prints how each ended (a Python exception is the expected outcome)."""

from __future__ import annotations

import os
import subprocess
import sys

SCENARIO = r"""
import jax, jax.numpy as jnp
import optax_paged8bit as op
p = {"w": jnp.zeros((64, 80))}
g = {"w": jnp.ones((64, 80))}
tx = op.paged_adamw8bit()
s = tx.init(p)
kind = "%s"
try:
  if kind == "eager":
    jax.block_until_ready(tx.update(g, s._replace(handle=jnp.int32(10**6)), p))
  elif kind == "ffi":  # the custom call's own error, bypassing the host-side pre-check
    jax.block_until_ready(jax.jit(tx.update)(g, s._replace(handle=jnp.int32(10**6)), p))
  elif kind == "jit":
    jax.block_until_ready(jax.jit(tx.update)(g, s._replace(count=jnp.int32(3)), p))
  elif kind == "stale":
    _, s1 = tx.update(g, s, p)
    jax.block_until_ready(tx.update(g, s, p))
  print("NO ERROR RAISED")
except Exception as e:
  print("raised", type(e).__name__, str(e)[:100])
"""

for platform in ("cpu", "cuda"):
  for kind in ("eager", "ffi", "jit", "stale"):
    env = dict(os.environ, JAX_PLATFORMS=platform)
    r = subprocess.run(
      [sys.executable, "-c", SCENARIO % kind],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      cwd="/",
    )
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    print(f"{platform:5} {kind:6} rc={r.returncode} {tail[0][:160]}")
