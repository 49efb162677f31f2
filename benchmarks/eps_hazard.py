"""The eps hazard that 8-bit Adam shares with bitsandbytes, measured: where a
block's second moment quantizes to zero while the first does not, the step is
about lr * m / eps, far larger than Adam's usual lr. Trains the digits MLP of
examples/train_digits.py for 200 steps at lr 2e-4 with optax.adamw and with
paged_adamw8bit at eps 1e-8 (the default) and 1e-6, and counts the weights
that moved by more than 0.1 and the largest single step, in units of lr.

Usage: python benchmarks/eps_hazard.py [--steps 200] [--lr 2e-4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import optax_paged8bit as op

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from train_digits import MLP, batch_indices, load_data


def run(tx, model, params, x, y, steps: int, lr: float) -> dict:
  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

  @jax.jit
  def step(p, s, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
    u, s = tx.update(g, s, p)
    new = optax.apply_updates(p, u)
    leaves = zip(jax.tree.leaves(new), jax.tree.leaves(p), strict=True)
    biggest = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in leaves]))
    return new, s, loss, biggest

  start = params
  state = tx.init(params)
  largest_step = 0.0
  for t in range(steps):
    idx = batch_indices(t, len(x), 64, 0)
    params, state, loss, biggest = step(params, state, x[idx], y[idx])
    largest_step = max(largest_step, float(biggest))
  moved = sum(
    int(jnp.sum(jnp.abs(a - b) > 0.1))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start), strict=True)
  )
  return {"moved_over_0.1": moved, "largest_step_in_lr": largest_step / lr, "loss": float(loss)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--lr", type=float, default=2e-4)
  parser.add_argument("--json")
  args = parser.parse_args()
  x_train, _, y_train, _ = load_data(0)
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
  results = {}
  for name, tx in {
    "optax.adamw eps=1e-8": optax.adamw(args.lr, eps=1e-8, weight_decay=1e-2),
    "paged_adamw8bit eps=1e-8": op.paged_adamw8bit(args.lr, eps=1e-8),
    "paged_adamw8bit eps=1e-6": op.paged_adamw8bit(args.lr, eps=1e-6),
  }.items():
    r = results[name] = run(tx, model, params, x_train, y_train, args.steps, args.lr)
    print(
      f"{name:<26} weights moved > 0.1: {r['moved_over_0.1']:>4}   largest step: "
      f"{r['largest_step_in_lr']:7.1f} x lr   final loss {r['loss']:.4f}"
    )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
