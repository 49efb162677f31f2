"""The collector under the loads that broke it, each in a fresh process.

  python tests/collector_stress.py export-sweep [--cycles N] [--gc-threshold]
  python tests/collector_stress.py donated-threads [--steps N] [--size N] [--repeat R]
  python tests/collector_stress.py loader [--steps N]
  python tests/collector_stress.py sweep {linen,nnx} [--runs N] [--size N]

Each prints one JSON line of what it measured and exits 1 when a check
fails. test_collector.py runs them small; benchmarks/RESULTS.md has full-size
runs. --look-at-everything makes the collector's thread look at the states
being trained too (it normally leaves alone a state used in the last
_collector.IDLE_S), so that its every look races with the training threads.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_paged8bit as op
from optax_paged8bit import _collector


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096


def registry_bytes() -> int:
  return op._ffi.total_bytes()


def export_sweep(args) -> dict:
  """Short runs that export their state and drop it: the loop that crashed
  the process in the garbage collector's callback."""
  if args.gc_threshold:
    gc.set_threshold(1, 1, 1)
  params = {"w": jnp.ones((512, 512)), "b": jnp.ones((100,))}
  tx = op.paged_adamw8bit(1e-3)
  step = jax.jit(tx.fused_update)
  peak = 0
  for _ in range(args.cycles):
    s = tx.init(params)
    p, s = step(params, s, params)
    e = op.export_state(s)
    del s, e, p
    peak = max(peak, registry_bytes())
  nbytes = tx.init(params).layout.state_nbytes()
  return {"cycles": args.cycles, "peak_states": peak / nbytes, "ok": peak <= 2 * nbytes}


def _train(tx, step, seed: int, steps: int, size: int) -> np.ndarray:
  params = {"w": jnp.full((size, size), 0.1 * (seed + 1)), "b": jnp.ones((100,))}
  state = tx.init(params)
  for i in range(steps):
    g = jax.tree.map(lambda x, i=i: jnp.full(x.shape, 0.01 * (i % 7 + 1)), params)
    params, state = step(g, state, params)  # state and params donated
  return np.asarray(params["w"])


def donated_threads(args) -> dict:
  """4 threads train with donated steps while the main thread runs full
  garbage collections; each final result must equal the same run alone."""
  tx = op.paged_adamw8bit(1e-3)
  step = jax.jit(tx.fused_update, donate_argnums=(1, 2))
  reference = [_train(tx, step, k, args.steps, args.size) for k in range(4)]
  lost, runs, collections = 0, [], 0
  for _ in range(args.repeat):
    out: dict[int, object] = {}

    def run(k, out=out):
      try:
        out[k] = _train(tx, step, k, args.steps, args.size)
      except Exception as e:  # a freed state fails its next step
        out[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
      t.start()
    while any(t.is_alive() for t in threads):
      gc.collect()
      collections += 1
      time.sleep(0)  # let the trainers have the GIL between collections
    bad = [
      k
      for k in range(4)
      if isinstance(out[k], Exception) or not np.array_equal(out[k], reference[k])
    ]
    lost += len(bad)
    runs.append([str(out[k])[:200] if isinstance(out[k], Exception) else "differs" for k in bad])
  return {
    "repeat": args.repeat,
    "lost": lost,
    "collections": collections,
    "failures": runs,
    "ok": lost == 0,
  }


def loader(args) -> dict:
  """A donated training loop beside a thread that only allocates Python
  objects (a data loader), which sets off garbage collections at any point."""
  tx = op.paged_adamw8bit(1e-3)
  step = jax.jit(tx.fused_update, donate_argnums=(1, 2))
  stop = threading.Event()

  def allocate():
    junk = []
    while not stop.is_set():
      junk.append([{"i": i} for i in range(100)])
      if len(junk) > 100:
        junk.clear()
      time.sleep(0)  # a loader waits for I/O now and then

  thread = threading.Thread(target=allocate)
  thread.start()
  start = time.perf_counter()
  try:
    got = _train(tx, step, 0, args.steps, 256)
    error = None
  except Exception as e:
    got, error = None, str(e)[:300]
  finally:
    stop.set()
    thread.join()
  seconds = time.perf_counter() - start
  same = got is not None and np.array_equal(got, _train(tx, step, 0, args.steps, 256))
  return {"steps": args.steps, "seconds": round(seconds, 1), "error": error, "ok": same}


def _linen_run(size: int, steps: int, min_run_s: float):
  from flax.training import train_state

  base = {"w": jnp.full((size, size), 0.1), "b": jnp.zeros((size,))}

  def create(rng):
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(rng, p.shape), base)
    return train_state.TrainState.create(apply_fn=None, params=params, tx=op.paged_adamw8bit(1e-3))

  def train_step(state, x):
    def loss(p):
      return jnp.mean((x @ p["w"] + p["b"]) ** 2)

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), value

  create, train_step = jax.jit(create), jax.jit(train_step, donate_argnums=0)
  x = jnp.ones((8, size))

  def run(seed):
    state = create(jax.random.key(seed))
    start, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - start < min_run_s:
      state, loss = train_step(state, x)
      done += 1
      if done % 10 == 0:
        float(loss)  # a loop that logs its loss now and then
    return float(loss)

  return run


def _nnx_run(size: int, steps: int, min_run_s: float):
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(size, size, rngs=rngs)

  @nnx.jit
  def create(key):
    model = Model(nnx.Rngs(key))
    return model, nnx.Optimizer(model, op.paged_adamw8bit(1e-3), wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, x):
    def loss(m):
      return jnp.mean(m.linear(x) ** 2)

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  x = jnp.ones((8, size))

  def run(seed):
    model, optimizer = create(jax.random.key(seed))
    start, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - start < min_run_s:
      loss = train_step(model, optimizer, x)
      done += 1
      if done % 10 == 0:
        float(loss)
    return float(loss)

  return run


def sweep(args) -> dict:
  """The memory guide's sweep (docs/memory.md): one jitted create_train_state and one jitted,
  donated step, a new state per run, no release or collect. After each run
  (given a few seconds, with no call) the registry holds at most 2 states,
  and process memory grows by less than one state from run 2 to the last;
  with runs of --min-run-s 3 or more, a GPU holds at most 2 states at each
  run's end."""
  run = (_linen_run if args.kind == "linen" else _nnx_run)(args.size, args.steps, args.min_run_s)
  like = {"w": jnp.zeros((args.size, args.size)), "b": jnp.zeros((args.size,))}
  state = op.paged_adamw8bit(1e-3).init(like).layout.state_nbytes()
  gpu = jax.devices()[0].platform == "gpu"
  device_bytes = (lambda: op._ffi._ops.managed_device_bytes(0)) if gpu else (lambda: 0)
  device0 = device_bytes()
  registry, rss, settle, device, at_end = [], [], [], [], []
  for seed in range(args.runs):
    run(seed)
    at_end.append(registry_bytes() / state)
    device.append((device_bytes() - device0) / state)
    start = time.perf_counter()
    while registry_bytes() > 2 * state and time.perf_counter() - start < 10:
      time.sleep(0.01)
    settle.append(round(time.perf_counter() - start, 2))
    registry.append(registry_bytes() / state)
    rss.append(rss_bytes())
  # Process memory, robust to the allocator's noise: runs 2-4 against the last 3.
  growth = (float(np.median(rss[-3:])) - float(np.median(rss[1:4]))) / state
  return {
    "kind": args.kind,
    "state_mib": round(state / 2**20, 1),
    "registry_states_at_run_end": [round(r, 2) for r in at_end],
    "device_states_at_run_end": [round(r, 2) for r in device],
    "registry_states_settled": [round(r, 2) for r in registry],
    "settle_s": settle,
    "rss_growth_states_run2_to_last": round((rss[-1] - rss[1]) / state, 2),
    "rss_growth_states_median": round(growth, 2),
    # States in use at a run's end: this run's, and those whose grace (two
    # seconds at least) has not passed; with runs longer than that, at most 2.
    "ok": max(registry) <= 2 and growth < 1 and (args.min_run_s < 3 or max(device) <= 2),
  }


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("case", choices=["export-sweep", "donated-threads", "loader", "sweep"])
  ap.add_argument("kind", nargs="?", choices=["linen", "nnx"], default="linen")
  ap.add_argument("--cycles", type=int, default=1500)
  ap.add_argument("--gc-threshold", action="store_true", help="gc.set_threshold(1, 1, 1)")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--size", type=int, default=None)
  ap.add_argument("--repeat", type=int, default=1)
  ap.add_argument("--runs", type=int, default=10)
  ap.add_argument("--min-run-s", type=float, default=0.0, help="steps until a run took this long")
  ap.add_argument("--look-at-everything", action="store_true")
  args = ap.parse_args()
  if args.look_at_everything:
    _collector.IDLE_S = 0.0
  if args.case == "export-sweep":
    result = export_sweep(args)
  elif args.case == "donated-threads":
    args.steps, args.size = args.steps or 200, args.size or 256
    result = donated_threads(args)
  elif args.case == "loader":
    args.steps = args.steps or 20000
    result = loader(args)
  else:
    args.steps, args.size = args.steps or 3, args.size or 4096
    result = sweep(args)
  result["case"] = args.case
  result["platform"] = jax.devices()[0].platform
  print(json.dumps(result))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
