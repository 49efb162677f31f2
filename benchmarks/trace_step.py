"""Where a step's time goes: traces a few steps of one benchmark case with the
JAX profiler and prints, per device stream and for the host, the events with
the largest total time per step.

    python benchmarks/trace_step.py 2 --out trace_dir   # case 2: GPT-2 medium

Traces optax.adamw and the paged fused step of the same case (--methods picks
others: "paged optax path", "adamw8bit optax path", "adamw8bit fused"), each
step awaited, or with --back-to-back dispatched without waiting (where the
device idles between steps shows there). The perfetto trace (json.gz) stays
in --out for a closer look.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil

import jax
import optax
from bench_adamw import CASES, LR, jitted_step, make_tree

import optax_paged8bit as op


def summarize(trace_dir: str, steps: int, top: int) -> list[str]:
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  with gzip.open(path[-1]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
  totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") != "X":
      continue
    key = (names.get(e["pid"], str(e["pid"])), e["name"][:90])
    totals[key][0] += float(e.get("dur", 0.0))
    totals[key][1] += 1
  lines = []
  for proc in sorted({k[0] for k in totals}):
    rows = sorted(((v, k[1]) for k, v in totals.items() if k[0] == proc), reverse=True)
    lines.append(f"  [{proc}]")
    if proc.startswith("/device:"):
      lines.append("    " + busy_line(events, names, proc, steps))
    for (dur, n), name in rows[:top]:
      lines.append(f"    {dur / steps / 1e3:9.3f} ms/step  x{n / steps:6.1f}/step  {name}")
  return lines


def busy_line(events: list, names: dict, proc: str, steps: int) -> str:
  """How much of the window from the device's first event to its last it was
  busy (the union of its events, which a kernel can appear in twice: on its
  stream and as an op); the rest it idled, waiting for the host."""
  spans = sorted(
    (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
    for e in events
    if e.get("ph") == "X" and names.get(e["pid"]) == proc
  )
  busy, end = 0.0, float("-inf")
  for start, stop in spans:
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  window = end - spans[0][0] if spans else 0.0  # to the latest end, not the last start's
  return (
    f"busy {busy / steps / 1e3:.3f} ms/step of a {window / steps / 1e3:.3f} ms/step window "
    f"({100 * busy / window if window else 0:.0f}%)"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("case", type=int, nargs="?", default=2)
  parser.add_argument("--out", default="trace_out")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--methods", default="optax.adamw,paged fused", help="comma-separated")
  parser.add_argument(
    "--back-to-back",
    action="store_true",
    help="dispatch the traced steps without awaiting each (as a training loop runs them)",
  )
  args = parser.parse_args()
  name, (shapes, dtype) = list(CASES.items())[args.case]
  params = make_tree(shapes, dtype, jax.random.PRNGKey(0))
  grads = make_tree(shapes, dtype, jax.random.PRNGKey(1))
  print(f"{name} on {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for method in args.methods.split(","):
    fused = method.endswith("fused")
    if method == "optax.adamw":
      tx = optax.adamw(LR, weight_decay=1e-2)
    else:
      tx = (op.adamw8bit if method.startswith("adamw8bit") else op.paged_adamw8bit)(LR)
    step = jitted_step(tx, fused)
    state = tx.init(params)
    for _ in range(3):
      params, state = step(params, state, grads)
    jax.block_until_ready(params)
    trace_dir = os.path.join(args.out, method.replace(" ", "_").replace(".", "_"))
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        params, state = step(params, state, grads)
        if not args.back_to_back:
          jax.block_until_ready(params)
      jax.block_until_ready(params)
    print(method)
    print("\n".join(summarize(trace_dir, args.steps, args.top)), flush=True)
    if isinstance(tx, op.PagedGradientTransformation):
      op.release(state)


if __name__ == "__main__":
  main()
