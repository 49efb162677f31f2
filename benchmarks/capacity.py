"""What 8 bits buy: the largest decoder-only transformer whose full training
step runs on one GPU, per optimizer and param dtype.

The family keeps depth and width in a fixed ratio (layers = d_model / 128,
4x MLP, 32k vocab), its layers stacked under `jax.lax.scan` with
rematerialisation, so that params, grads and optimizer state (not
activations) are what fill the GPU. A trial builds one model, jits the whole
step (forward, backward, optimizer; params and state donated), runs a few
steps and times them. Each trial runs in a fresh process, so that a failed
one (out of memory) leaves nothing behind.

Methods: optax.adamw; adamw8bit through update and apply_updates, and through
its fused step; paged_adamw8bit (fused step) with its state on the GPU;
paged_adamw8bit with its state placed in host memory by the budget guard
(`set_device_memory_budget(0)`). A paged trial whose state the guard could
not place on the GPU counts as not fitting "on the device".

The search starts from an estimate (bytes per param of each method against
the free memory) and walks the width ladder up or down, one trial at a time,
until it has the largest width that fits and the next one that does not.
Never allocates managed memory beyond what the guard allows.

    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \\
      python benchmarks/capacity.py --json out.json --plot capacity.png
    python benchmarks/capacity.py --trial paged_device float32 512   # one trial
    python benchmarks/capacity.py --from f32.json bf16.json --plot capacity.png  # merge runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

VOCAB = 32768
SEQ = 256
BATCH = 2
STEP = 128  # width ladder
METHODS = ("adamw", "adamw8bit", "adamw8bit_fused", "paged_device", "paged_host")
LABELS = ("optax.adamw", "adamw8bit", "adamw8bit (fused)", "paged (GPU)", "paged (host)")
# Bytes per param on the device besides activations: params, grads, optimizer
# state (8-bit: 2 bytes of codes + scales), and an update buffer for the
# optax path. Only a starting point for the search.
BYTES_PER_PARAM = {
  ("adamw", "float32"): 20,
  ("adamw", "bfloat16"): 10,
  ("adamw8bit", "float32"): 14,
  ("adamw8bit", "bfloat16"): 8,
  ("adamw8bit_fused", "float32"): 10,
  ("adamw8bit_fused", "bfloat16"): 6,
  ("paged_device", "float32"): 12,
  ("paged_device", "bfloat16"): 6,
  ("paged_host", "float32"): 10,
  ("paged_host", "bfloat16"): 4,
}


def layers_for(width: int) -> int:
  return max(1, width // 128)


def num_params(width: int) -> int:
  return layers_for(width) * 12 * width * width + 2 * VOCAB * width


# -- one trial (child process) ---------------------------------------------------


def trial(method: str, dtype_name: str, width: int, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import optax_paged8bit as op

  dtype = jnp.dtype(dtype_name)
  layers = layers_for(width)
  key = jax.random.PRNGKey(0)

  def init():
    ks = jax.random.split(key, 6)
    n = lambda k, shape, fan: (jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan)).astype(
      dtype
    )
    return {
      "embed": n(ks[0], (VOCAB, width), 1.0) * 0.02,
      "qkv": n(ks[1], (layers, width, 3 * width), width),
      "proj": n(ks[2], (layers, width, width), width),
      "fc": n(ks[3], (layers, width, 4 * width), width),
      "fc2": n(ks[4], (layers, 4 * width, width), 4 * width),
      "head": n(ks[5], (width, VOCAB), width),
    }

  def block(x, w):
    qkv, proj, fc, fc2 = w
    h = x / jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)
    q, k, v = jnp.split(h @ qkv, 3, axis=-1)
    att = jnp.einsum("bqd,bkd->bqk", q, k) / math.sqrt(width)
    att = jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), att, -1e9)
    x = x + jax.nn.softmax(att.astype(jnp.float32), -1).astype(x.dtype) @ v @ proj
    h = x / jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)
    return x + jax.nn.gelu(h @ fc) @ fc2, None

  def loss_fn(p, tokens):
    x = p["embed"][tokens[:, :-1]]
    x, _ = jax.lax.scan(jax.checkpoint(block), x, (p["qkv"], p["proj"], p["fc"], p["fc2"]))
    logits = (x @ p["head"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  if method == "adamw":
    tx = optax.adamw(1e-4)
  elif method.startswith("adamw8bit"):
    tx = op.adamw8bit(1e-4)
  else:
    tx = op.paged_adamw8bit(1e-4)
    op.set_device_memory_budget(0 if method == "paged_host" else None)
  # adamw8bit takes the optax path (update, apply_updates) as most users do,
  # "adamw8bit_fused" its fused step (FusedTrainState, FusedOptimizer).
  fused = method.startswith("paged") or method == "adamw8bit_fused"

  def step(p, s, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
    if fused:
      p, s = tx.fused_update(grads, s, p)
    else:
      updates, s = tx.update(grads, s, p)
      p = optax.apply_updates(p, updates)
    return p, s, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  out = {"method": method, "dtype": dtype_name, "width": width, "layers": layers}
  out["params"] = num_params(width)
  tokens = jax.random.randint(key, (BATCH, SEQ + 1), 0, VOCAB)
  try:
    params = jax.jit(init)()
    state = tx.init(params)
    compiled = step.lower(params, state, tokens).compile()
    memory = compiled.memory_analysis()
    if memory is not None:  # what XLA needs besides the arguments
      out["temp_bytes"] = int(memory.temp_size_in_bytes)
    out["copies"] = len(re.findall(r"= \S+ copy(?:-start)?\(", compiled.as_text()))
    step = compiled
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      params, state, loss = step(params, state, tokens)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - t0)
  except Exception as e:  # out of memory, as XLA or the guard reports it
    out.update(fits=False, error=str(e).splitlines()[0][:300])
    return out
  out.update(fits=True, step_ms=1e3 * min(times[1:] or times), loss=float(loss))
  if method.startswith("paged"):
    placed = op.residency(state)
    out["state_on_device"] = placed["bytes_on_device"]
    out["state_on_host"] = placed["bytes_on_host"]
    if method == "paged_device" and placed["bytes_on_host"] > 0:
      out.update(fits=False, error="the guard placed part of the state in host memory")
  stats = jax.devices()[0].memory_stats() or {}
  out["peak_bytes"] = stats.get("peak_bytes_in_use")
  return out


# -- the search (parent process) --------------------------------------------------


def run_trial(method, dtype, width, steps, timeout) -> dict:
  cmd = [sys.executable, __file__, "--trial", method, dtype, str(width), "--steps", str(steps)]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"method": method, "dtype": dtype, "width": width, "fits": False, "error": "timeout"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
  return {"method": method, "dtype": dtype, "width": width, "fits": False, "error": tail[0][:300]}


def search(method, dtype, free_bytes, args) -> dict:
  """The largest width of the ladder that fits, and the trials that show it."""
  budget = free_bytes / BYTES_PER_PARAM[(method, dtype)]
  width = STEP
  while num_params(width + STEP) <= budget:
    width += STEP
  trials, best, failed = [], None, None
  while best is None or failed is None:
    if width < STEP or width > args.max_width or len(trials) >= args.max_trials:
      break
    r = run_trial(method, dtype, width, args.steps, args.timeout)
    trials.append(r)
    print(json.dumps(r), flush=True)
    if r["fits"]:
      best = r if best is None or r["width"] > best["width"] else best
      width += STEP
    else:
      failed = r if failed is None or r["width"] < failed["width"] else failed
      width -= STEP
    if best is not None and failed is not None and failed["width"] - best["width"] > STEP:
      width = best["width"] + STEP  # a gap between them: probe it
      failed = None
  return {"method": method, "dtype": dtype, "best": best, "trials": trials}


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dtypes = sorted({r["dtype"] for r in results})
  shown = [m for m in METHODS if any(r["method"] == m for r in results)]
  fig, ax = plt.subplots(figsize=(7, 3.8))
  width = 0.8 / len(dtypes)
  for j, dtype in enumerate(dtypes):
    values = []
    for method in shown:
      r = next((r for r in results if r["method"] == method and r["dtype"] == dtype), None)
      values.append((r["best"]["params"] / 1e9) if r and r["best"] else 0)
    xs = [i + (j - (len(dtypes) - 1) / 2) * width for i in range(len(shown))]
    bars = ax.bar(xs, values, width, label=dtype)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
  ax.set_xticks(range(len(shown)), [LABELS[METHODS.index(m)] for m in shown])
  ax.set_ylabel("largest model (billion params)")
  ax.set_title("Largest transformer whose training step fits on one GPU", fontsize=10)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def table(results):
  print(f"\n{'method':14} {'dtype':9} {'width':>6} {'layers':>6} {'params':>10} {'step ms':>9}")
  for r in results:
    b = r["best"]
    if b is None:
      print(f"{r['method']:14} {r['dtype']:9} {'none fits':>6}")
      continue
    print(
      f"{r['method']:14} {r['dtype']:9} {b['width']:6d} {b['layers']:6d} "
      f"{b['params'] / 1e9:9.2f}B {b['step_ms']:9.1f}"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--trial", nargs=3, metavar=("METHOD", "DTYPE", "WIDTH"))
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--max-width", type=int, default=16384)
  ap.add_argument("--max-trials", type=int, default=6, help="per method and dtype")
  ap.add_argument("--timeout", type=float, default=240, help="seconds per trial")
  ap.add_argument("--free-bytes", type=float, default=None, help="instead of cudaMemGetInfo")
  ap.add_argument(
    "--from",
    dest="sources",
    nargs="+",
    default=None,
    help="print and plot the results of earlier runs (--json files)",
  )
  ap.add_argument("--json", default=None)
  ap.add_argument("--plot", default=None)
  args = ap.parse_args()
  if args.trial:
    method, dtype, width = args.trial
    print(json.dumps(trial(method, dtype, int(width), args.steps)), flush=True)
    return
  if args.sources:
    results = []
    for path in args.sources:
      with open(path) as f:
        results += json.load(f)["results"]
    table(results)
    if args.plot:
      plot(results, args.plot)
    return
  free = args.free_bytes
  if free is None:
    from optax_paged8bit import _ffi

    free = float(_ffi._ops.device_memory_info(0)[0])
  t0 = time.perf_counter()
  results = []
  for dtype in args.dtypes.split(","):
    for method in args.methods.split(","):
      results.append(search(method, dtype, free, args))
  table(results)
  print(f"search: {time.perf_counter() - t0:.0f} s, free memory at start {free / 2**30:.1f} GiB")
  if args.json:
    with open(args.json, "w") as f:
      env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))}
      json.dump({"free_bytes": free, "results": results, "env": env}, f, indent=1)
  if args.plot:
    plot(results, args.plot)


if __name__ == "__main__":
  main()
