"""Compile time and host costs against the number of leaves (CPU).

For N leaves of 3 float32 each: the first call of a jitted update +
optax.apply_updates (lowering + compiling + running), for optax.adamw,
paged_adamw8bit and adamw8bit, and of paged_adamw8bit's fused step
(paged_fused); for paged_adamw8bit also the first and second export_state,
save_checkpoint and restore_checkpoint, and the process's peak RSS. Each
measurement runs in a fresh process (no warm caches, its own RSS).
A bare jitted SGD step (p - lr * g) over the same leaves is the floor of any
per-leaf update on XLA's CPU backend; ffi_results is one custom call with N
results (lowered and compiled only), XLA's cost of the paged call's result
per leaf. The first call is timed in parts: lowering, XLA's compile, the run.

    python benchmarks/compile_time.py --leaves 300,1000,3000,10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, tempfile, time
import jax, jax.numpy as jnp, optax
import optax_paged8bit as op
n, kind = int(sys.argv[1]), sys.argv[2]
params = {f"l{i:05d}": jnp.full((3,), 0.1, jnp.float32) for i in range(n)}
grads = jax.tree.map(lambda p: p * 0.01, params)
out = {"leaves": n, "kind": kind}
def first_call(step, *args, run=True):  # the first call's work: lowering, XLA's compile, the run
  t0 = time.perf_counter(); lowered = step.lower(*args)
  t1 = time.perf_counter(); compiled = lowered.compile()
  t2 = time.perf_counter(); result = jax.block_until_ready(compiled(*args)) if run else None
  t3 = time.perf_counter()
  out.update(first_step_s=t3 - t0, lower_s=t1 - t0, compile_s=t2 - t1)
  if run:
    out["run_s"] = t3 - t2
  return result
if kind == "sgd":
  first_call(jax.jit(lambda p, g: jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)), params, grads)
elif kind == "ffi_results":
  # XLA's own cost of one custom call with n results (lowered and compiled,
  # not run): the paged transform's call has one result per leaf.
  from optax_paged8bit import _ffi
  shapes = [jax.ShapeDtypeStruct((3,), jnp.float32)] * n
  call = jax.jit(lambda x: jax.ffi.ffi_call(_ffi.BLOCK_NORMS_TARGET, shapes)(x))
  first_call(call, params["l00000"], run=False)
else:
  tx = {"optax.adamw": optax.adamw(1e-3), "paged_adamw8bit": op.paged_adamw8bit(1e-3),
        "paged_fused": op.paged_adamw8bit(1e-3), "adamw8bit": op.adamw8bit(1e-3)}[kind]
  state = tx.init(params)
  @jax.jit
  def step(p, s, g):
    if kind == "paged_fused":
      return tx.fused_update(g, s, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  params, state = first_call(step, params, state, grads)
  if kind == "paged_adamw8bit":
    for name in ("export", "export_again"):
      t0 = time.perf_counter(); jax.block_until_ready(op.export_state(state))
      out[name + "_s"] = time.perf_counter() - t0
    d = tempfile.mkdtemp()
    t0 = time.perf_counter(); op.save_checkpoint(os.path.join(d, "c"), state)
    out["save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter(); r = op.restore_checkpoint(os.path.join(d, "c"), tx.init(params))
    jax.block_until_ready(r); out["restore_s"] = time.perf_counter() - t0
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps(out))
"""

KINDS = ("sgd", "optax.adamw", "paged_adamw8bit", "paged_fused", "adamw8bit", "ffi_results")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", default="300,1000,3000")
  parser.add_argument("--kinds", default=",".join(KINDS))
  parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  rows = []
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(CHILD)
  for n in (int(x) for x in args.leaves.split(",")):
    for kind in args.kinds.split(","):
      try:
        done = subprocess.run(
          [sys.executable, f.name, str(n), kind],
          capture_output=True,
          text=True,
          timeout=args.timeout,
          env={"JAX_PLATFORMS": "cpu", **__import__("os").environ},
        )
        row = json.loads(done.stdout.strip().splitlines()[-1])
      except subprocess.TimeoutExpired:
        row = {"leaves": n, "kind": kind, "first_step_s": None, "timeout_s": args.timeout}
      rows.append(row)
      extra = "".join(
        f" {k} {row[k]:.2f}"
        for k in ("export_s", "export_again_s", "save_s", "restore_s")
        if row.get(k) is not None
      )
      first = row["first_step_s"]
      first = f"{first:.2f} s" if first is not None else f"> {args.timeout:.0f} s"
      if row.get("compile_s") is not None:
        first += f" (XLA compile {row['compile_s']:.2f} s)"
      rss = row.get("peak_rss_gb")
      rss = f", peak RSS {rss:.2f} GB" if rss else ""
      print(f"{n:6d} leaves  {kind:16} first step {first}{extra}{rss}", flush=True)
  if args.json:
    with open(args.json, "w") as out:
      json.dump(rows, out, indent=1)


if __name__ == "__main__":
  main()
