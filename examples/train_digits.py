"""Train a small MLP on scikit-learn's digits with optax.adamw and paged_adamw8bit.

Both runs start from the same initial params, see the same minibatches in the same
order and use the same learning rate and weight decay; only the optimizer differs.
The script prints each optimizer's test accuracy and optimizer-state size, and saves
both training-loss curves to a PNG. paged_adamw8bit keeps the moments of leaves with at
least 4096 elements as uint8 codes plus one float32 scale per 256-element block (a little
over 2 bytes per parameter here, as the small leaves keep float32 moments) where
optax.adamw keeps 8 bytes per parameter, and it should reach the same accuracy.

Needs the `examples` extras (flax, scikit-learn, matplotlib, tqdm). Run it with

  python examples/train_digits.py
  python examples/train_digits.py --steps 3000 --lr 1e-3 --plot /tmp/loss.png

It exits with a non-zero status when the two test accuracies differ by more than
1 point, so CI can use it as a smoke test. Keep the learning rate moderate: with the
default eps=1e-8, the 8-bit run diverges here from lr=2e-2 on (a second moment that
quantizes to zero while its first moment does not gives a step of about lr * m / eps),
where optax.adamw still trains; a larger eps (1e-6) avoids it.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import optax_paged8bit

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MAX_ACCURACY_GAP = 1.0  # points


class MLP(nn.Module):
  """64 -> 256 -> 256 -> 10.

  The two hidden kernels (64x256 and 256x256) have at least 4096 elements
  (paged_adamw8bit's default min_8bit_size), so their moments are stored in
  8 bits; the biases and the 10-wide head (256x10 = 2560 elements) are smaller
  and keep float32 moments.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


def load_data(seed: int) -> tuple[np.ndarray, ...]:
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)  # pixels are 0..16
  y = digits.target.astype(np.int32)
  return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def train(name, tx, model, params, x_train, y_train, steps, batch_size, seed):
  """Trains a copy of `params` with `tx`; returns (params, opt_state, per-step losses)."""

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)  # paged_adamw8bit needs params
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)  # the donated buffers must not be the shared init
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)  # same seed -> same minibatch order for both optimizers
  losses = np.empty(steps, np.float32)
  perm, pos = rng.permutation(len(x_train)), 0
  with tqdm(range(steps), desc=f"{name:>15}", ncols=90) as bar:
    for i in bar:
      if pos + batch_size > len(perm):
        perm, pos = rng.permutation(len(x_train)), 0
      idx = perm[pos : pos + batch_size]
      pos += batch_size
      # A paged state advances in place: always continue from the returned state.
      params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
      losses[i] = loss
      if i % 50 == 0 or i == steps - 1:
        bar.set_postfix(loss=f"{losses[max(0, i - 49) : i + 1].mean():.4f}")
  return params, opt_state, losses


def accuracy(model, params, x, y) -> float:
  logits = jax.jit(model.apply)(params, x)
  return 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == y))


def smooth(losses: np.ndarray, window: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """Moving average of the losses, with the 0-based step each window ends on."""
  window = max(1, min(window, len(losses)))
  mean = np.convolve(losses, np.ones(window) / window, mode="valid")
  return np.arange(window - 1, len(losses)), mean


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500, help="training steps per optimizer")
  parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of both optimizers")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
  parser.add_argument("--plot", default="digits_loss.png", help="where to save the loss curves")
  args = parser.parse_args()

  x_train, x_test, y_train, y_test = load_data(args.seed)
  model = MLP()
  init_params = model.init(jax.random.key(args.seed), x_train[:1])
  num_params = sum(p.size for p in jax.tree.leaves(init_params))
  print(f"digits: {len(x_train)} train / {len(x_test)} test, MLP with {num_params:,} params")

  optimizers = {
    "optax.adamw": optax.adamw(args.lr, weight_decay=1e-2),
    "paged_adamw8bit": optax_paged8bit.paged_adamw8bit(args.lr, weight_decay=1e-2),
  }
  results = {}
  start = time.perf_counter()
  for name, tx in optimizers.items():
    params, opt_state, losses = train(
      name, tx, model, init_params, x_train, y_train, args.steps, args.batch_size, args.seed
    )
    results[name] = dict(
      acc=accuracy(model, params, x_test, y_test),
      nbytes=optax_paged8bit.state_nbytes(opt_state),
      losses=losses,
      opt_state=opt_state,
    )
  elapsed = time.perf_counter() - start

  print(f"\n{'optimizer':<16} {'test acc':>9} {'state bytes':>12} {'bytes/param':>12}")
  for name, r in results.items():
    per_param = r["nbytes"] / num_params
    print(f"{name:<16} {r['acc']:>8.2f}% {r['nbytes']:>12,} {per_param:>12.2f}")
  gap = results["paged_adamw8bit"]["acc"] - results["optax.adamw"]["acc"]
  print(f"accuracy difference (8-bit - float32): {gap:+.2f} points")
  print(f"wall time: {elapsed:.1f} s ({args.steps} steps x {len(optimizers)} optimizers, with jit)")

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, r in results.items():
    ax.plot(*smooth(r["losses"]), label=name)
  ax.set(xlabel="step", ylabel="training loss (50-step mean)", yscale="log")
  ax.set_title(f"MLP on digits, lr={args.lr:g}, batch {args.batch_size}")
  ax.legend()
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"loss curves saved to {args.plot}")

  optax_paged8bit.release(results["paged_adamw8bit"]["opt_state"])

  if abs(gap) > MAX_ACCURACY_GAP:
    raise SystemExit(
      f"test accuracies differ by {abs(gap):.2f} points (more than {MAX_ACCURACY_GAP:g})"
    )


if __name__ == "__main__":
  main()
