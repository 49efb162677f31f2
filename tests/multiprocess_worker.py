"""One process of a multi-process run (jax.distributed on 127.0.0.1, 2 CPU
devices or 1 GPU per process), started by test_multiprocess.py:

    python multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes N \\
      --process-id I --out DIR [--resume CKPT] [--save CKPT] [--extra-state]

Trains the tree of `host_tree()` sharded over the global mesh (all
processes' devices on one axis) for `--steps` steps with paged_adamw8bit
(fused step) and adamw8bit (update then apply_updates), both with percentile
clipping, each inside jax.jit. `--save`
writes both states and the params with save_checkpoint from every process;
`--resume` restores them (possibly written by a different number of
processes) and trains on. Process 0 writes the params and exported states,
gathered to the host, to DIR/result.npz. The same functions run in one
process (`run`) give the reference.
"""

from __future__ import annotations

import argparse
import os
import sys

SHAPES = {"rows": (1024, 512), "flat": (8192,), "bias": (300,), "emb": (64, 80)}


def specs(P):
  return {"rows": P("x"), "flat": P("x"), "bias": P(), "emb": P()}


def host_tree(seed):
  import numpy as np

  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in SHAPES.items()}


def place(tree, mesh):
  """Global arrays of `tree` (the same host values in every process)."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  return {
    k: jax.make_array_from_callback(
      v.shape, NamedSharding(mesh, specs(P)[k]), lambda index, v=v: v[index]
    )
    for k, v in tree.items()
  }


def optimizers():
  import optax_paged8bit as op

  kw = dict(min_8bit_size=1000, weight_decay=1e-2, percentile_clipping=80)
  return op.paged_adamw8bit(1e-3, **kw), op.adamw8bit(1e-3, **kw)


def train(mesh, start, steps, first_grad_seed):
  """`steps` jitted steps of both optimizers from `start` = (params_p, state_p,
  params_a, state_a); returns the same four."""
  import jax
  import optax

  paged, eight = optimizers()
  fused = jax.jit(paged.fused_update)

  @jax.jit
  def optax_step(grads, state, params):
    updates, state = eight.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  pp, sp, pa, sa = start
  for t in range(steps):
    # Norms that grow step by step: percentile clipping scales them down.
    grads = place({k: v * (1 + t) for k, v in host_tree(first_grad_seed + t).items()}, mesh)
    pp, sp = fused(grads, sp, pp)
    pa, sa = optax_step(grads, sa, pa)
  return pp, sp, pa, sa


def fresh(mesh):
  paged, eight = optimizers()
  pp, pa = place(host_tree(0), mesh), place(host_tree(0), mesh)
  return pp, paged.init(pp), pa, eight.init(pa)


def gathered(result):
  """Params and exported states of `result`, as host numpy arrays (every
  process takes part; all get the whole values)."""
  import jax
  from jax.experimental import multihost_utils

  import optax_paged8bit as op

  pp, sp, pa, sa = result
  tree = {"paged_params": pp, "paged_state": op.export_state(sp), "params": pa, "state": sa}
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    jax.tree_util.keystr(path): multihost_utils.process_allgather(x, tiled=True)
    for path, x in leaves
  }


def checkpoint_tree(result):
  pp, sp, pa, sa = result
  return {"paged_params": pp, "paged_state": sp, "params": pa, "state": sa}


def checks(mesh, result, args):
  """Stale-state detection and the collector, in every process: writes
  DIR/checks_<process id>.json."""
  import gc
  import json

  import jax

  import optax_paged8bit as op

  paged, _ = optimizers()
  pp, sp, _, _ = result
  grads = place(host_tree(50), mesh)
  step = jax.jit(paged.fused_update)
  newer_p, newer_s = step(grads, sp, pp)  # sp is now one step behind its slot
  stale = ""
  try:
    jax.block_until_ready(step(grads, sp, pp))
  except Exception as e:  # the custom call's error, as JAX raises it
    stale = str(e)
  jax.block_until_ready((newer_p, newer_s))
  # A dropped state's slots are collected.
  dropped_p, dropped_s = step(grads, paged.init(pp), pp)
  jax.block_until_ready(dropped_s)
  held = op._ffi.total_bytes()
  del dropped_p, dropped_s
  gc.collect()
  freed = op.collect()
  out = {
    "stale_error": stale,
    "freed": freed,
    "held_before": held,
    "held_after": op._ffi.total_bytes(),
    "state_bytes_here": newer_s.layout.state_nbytes() * len(jax.local_devices()),
  }
  with open(os.path.join(args.out, f"checks_{args.process_id}.json"), "w") as f:
    json.dump(out, f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--coordinator", required=True)
  ap.add_argument("--num-processes", type=int, required=True)
  ap.add_argument("--process-id", type=int, required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--save", default=None)
  ap.add_argument("--resume", default=None)
  ap.add_argument("--extra-state", action="store_true", help="process 1 makes a state first")
  ap.add_argument("--checks", action="store_true", help="stale states and the collector")
  ap.add_argument("--platform", default="cpu", help="cpu (2 devices each) or gpu (1 each)")
  args = ap.parse_args()

  import jax

  # CPU collectives: gloo, JAX's default.
  jax.config.update("jax_platforms", "cuda" if args.platform == "gpu" else "cpu")
  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  import numpy as np

  import optax_paged8bit as op

  local = 2 if args.platform == "cpu" else 1
  assert jax.process_count() == args.num_processes and len(jax.local_devices()) == local
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))
  if args.extra_state and args.process_id == 1:
    # A state of this process only, made and stepped before the shared ones.
    import jax.numpy as jnp

    local = {"w": jnp.ones((4096,))}
    extra_tx = op.paged_adamw8bit(1e-3)
    _, extra = extra_tx.update(local, extra_tx.init(local), local)
    jax.block_until_ready(extra)

  if args.resume:
    _paged, _eight = optimizers()
    target = checkpoint_tree(fresh(mesh))
    restored = op.restore_checkpoint(args.resume, target)
    start = tuple(restored[k] for k in ("paged_params", "paged_state", "params", "state"))
    result = train(mesh, start, args.steps, first_grad_seed=100)
  else:
    result = train(mesh, fresh(mesh), args.steps, first_grad_seed=10)
  if args.save:
    op.save_checkpoint(args.save, checkpoint_tree(result))
  values = gathered(result)
  if args.process_id == 0:
    np.savez(os.path.join(args.out, "result.npz"), **values)
  if args.checks:
    checks(mesh, result, args)  # steps result's paged state once more
  op.release(checkpoint_tree(result))
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.exit(main())
