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

With --checkpoint-dir, each run saves {params, opt_state} with an orbax
CheckpointManager every --checkpoint-every steps, keeping the last --keep
(optax_paged8bit.save_checkpoint: the paged state's moments are exported, every
leaf checksummed). Stop it at any time: Ctrl-C ends the run after the step in
flight and saves that step. --resume continues each run from its latest
checkpoint, and the result is bit-identical to a run that was never stopped
(the minibatches follow the step number):

  python examples/train_digits.py --checkpoint-dir /tmp/digits --steps 3000
  python examples/train_digits.py --checkpoint-dir /tmp/digits --steps 3000 --resume

It exits with a non-zero status when the two test accuracies differ by more than 1
point (for runs of 1000 steps or more), so CI can use it as a smoke test. Keep the
learning rate moderate: with the default eps=1e-8, the 8-bit run diverges here from
lr=2e-2 on (a second moment that quantizes to zero while its first moment does not
gives a step of about lr * m / eps), where optax.adamw still trains; a larger eps
(1e-6) avoids it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
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


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """The minibatch of a step: each epoch's permutation comes from (seed,
  epoch), so that a resumed run sees the same batches as an unbroken one."""
  per_epoch = num_examples // batch_size
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[k * batch_size : (k + 1) * batch_size]


def train(name, tx, model, params, data, args, checkpoints=None):
  """Trains a copy of `params` with `tx`; returns (params, opt_state, per-step
  losses). With a CheckpointManager, saves every --checkpoint-every steps and
  on Ctrl-C, and with --resume starts from the latest checkpoint."""
  x_train, y_train = data

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
  first = 0
  if checkpoints is not None and args.resume and checkpoints.latest_step() is not None:
    # The checkpoint's params and state, in the form of the fresh ones.
    restored = optax_paged8bit.restore_checkpoint(
      checkpoints, {"params": params, "opt_state": opt_state}
    )
    params, opt_state = restored["params"], restored["opt_state"]
    first = checkpoints.latest_step()
    print(f"{name}: resumed from the checkpoint of step {first}")
  losses = np.full(args.steps, np.nan, np.float32)
  # Ctrl-C only asks the loop to stop after the step in flight: the step
  # donates params and opt_state, so an exception between its dispatch and the
  # assignment of its results would leave both deleted (and the moments one
  # step ahead of them).
  stop = []
  previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
  done = first
  try:
    with tqdm(range(first, args.steps), desc=f"{name:>15}", ncols=90) as bar:
      for i in bar:
        idx = batch_indices(i, len(x_train), args.batch_size, args.seed)
        # A paged state advances in place: always continue from the returned state.
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        done = i + 1
        losses[i] = loss
        last = done == args.steps or bool(stop)
        if checkpoints is not None and (done % args.checkpoint_every == 0 or last):
          tree = {"params": params, "opt_state": opt_state}
          optax_paged8bit.save_checkpoint(checkpoints, tree, step=done)
        if i % 50 == 0 or i == args.steps - 1:
          bar.set_postfix(loss=f"{np.nanmean(losses[max(0, i - 49) : i + 1]):.4f}")
        if stop:
          break
  finally:
    signal.signal(signal.SIGINT, previous)
  if checkpoints is not None:
    checkpoints.wait_until_finished()
  if stop:
    saved = f"; saved step {done}, continue with --resume" if checkpoints is not None else ""
    raise SystemExit(f"{name}: interrupted after step {done}{saved}")
  return params, opt_state, losses


def digest(params) -> str:
  """A short fingerprint of the params' bits, to compare runs."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


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
  parser.add_argument("--checkpoint-dir", help="save checkpoints here (one folder per optimizer)")
  parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between saves")
  parser.add_argument("--keep", type=int, default=2, help="checkpoints to keep per optimizer")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
  args = parser.parse_args()
  if args.resume and not args.checkpoint_dir:
    parser.error("--resume needs --checkpoint-dir")

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
    checkpoints = None
    if args.checkpoint_dir:
      import orbax.checkpoint as ocp  # only to checkpoint: it takes seconds to import

      options = ocp.CheckpointManagerOptions(max_to_keep=args.keep)
      path = os.path.abspath(os.path.join(args.checkpoint_dir, name))
      checkpoints = ocp.CheckpointManager(path, options=options)
    params, opt_state, losses = train(
      name, tx, model, init_params, (x_train, y_train), args, checkpoints
    )
    if checkpoints is not None:
      checkpoints.close()
    results[name] = dict(
      acc=accuracy(model, params, x_test, y_test),
      nbytes=optax_paged8bit.state_nbytes(opt_state),
      losses=losses,
      opt_state=opt_state,
      digest=digest(params),
    )
  elapsed = time.perf_counter() - start

  print(f"\n{'optimizer':<16} {'test acc':>9} {'state bytes':>12} {'bytes/param':>12}")
  for name, r in results.items():
    per_param = r["nbytes"] / num_params
    print(f"{name:<16} {r['acc']:>8.2f}% {r['nbytes']:>12,} {per_param:>12.2f}")
  gap = results["paged_adamw8bit"]["acc"] - results["optax.adamw"]["acc"]
  print(f"accuracy difference (8-bit - float32): {gap:+.2f} points")
  print(f"wall time: {elapsed:.1f} s ({args.steps} steps x {len(optimizers)} optimizers, with jit)")
  print("params digests: " + ", ".join(f"{n} {r['digest']}" for n, r in results.items()))

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

  if args.steps >= 1000 and abs(gap) > MAX_ACCURACY_GAP:
    raise SystemExit(
      f"test accuracies differ by {abs(gap):.2f} points (more than {MAX_ACCURACY_GAP:g})"
    )


if __name__ == "__main__":
  main()
