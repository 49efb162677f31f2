"""LoRA fine-tuning with paged_adamw8bit: a small character-level transformer
is trained on English prose (this repository's README and guides), frozen, and rank-r
adapters on its attention and MLP matrices are trained on a different text
(the package's Python source), once with paged_adamw8bit and once with
optax.adamw.

The base is frozen the way optax users freeze params: `optax.multi_transform`
sends the adapters to the optimizer and everything else to
`optax.set_to_zero()`. The base model is written to --base (and loaded from it
when it exists), so a second run fine-tunes at once:

  python examples/lora_finetune.py
  python examples/lora_finetune.py --rank 16 --steps 400 --plot /tmp/lora_loss.png

Prints the fine-tuning loss before and after, the optimizer-state bytes of
each run, and saves a plot of both loss curves. Runs on the CPU in well under a
minute with its defaults, and on a GPU when there is one.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

import optax_paged8bit as op

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VOCAB = 128  # ASCII
ROOT = pathlib.Path(__file__).resolve().parent.parent


class LoRADense(nn.Module):
  """Dense whose kernel gets a rank-r update (x @ A) @ B * alpha / r; B starts
  at zero, so the adapted model starts as the base model."""

  features: int
  rank: int
  alpha: float = 16.0

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.features, name="base")(x)
    if self.rank == 0:
      return y
    a = self.param("lora_a", nn.initializers.normal(1.0 / x.shape[-1]), (x.shape[-1], self.rank))
    b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
    return y + (x @ a) @ b * (self.alpha / self.rank)


# The model of pjit_sharded.py with LoRADense layers: each example stays one
# file a reader can take on its own.
class Block(nn.Module):
  dim: int
  heads: int
  rank: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = jnp.split(LoRADense(3 * self.dim, self.rank, name="qkv")(h), 3, axis=-1)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim // self.heads)
    q, k, v = split(q), split(k), split(v)
    seq = x.shape[1]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.dim // self.heads)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape)
    x = x + LoRADense(self.dim, self.rank, name="proj")(out)
    h = nn.LayerNorm(name="ln2")(x)
    h = LoRADense(4 * self.dim, self.rank, name="fc")(h)
    return x + LoRADense(self.dim, self.rank, name="fc2")(jax.nn.gelu(h))


# The small LM of pjit_sharded.py with LoRA adapters: each example is one
# file a reader can follow alone, so the model is written again here.
class LM(nn.Module):
  rank: int = 0
  dim: int = 128
  heads: int = 4
  layers: int = 2
  seq: int = 64

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.dim, name="embed")(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (self.seq, self.dim))
    for i in range(self.layers):
      x = Block(self.dim, self.heads, self.rank, name=f"block{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def text(paths) -> np.ndarray:
  data = "".join(p.read_text(errors="ignore") for p in paths)
  return np.frombuffer(data.encode("ascii", errors="ignore"), np.uint8).astype(np.int32) % VOCAB


def batches(data, seq, batch_size, seed):
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, data.size - seq - 1, batch_size)
    chunk = np.stack([data[s : s + seq + 1] for s in starts])
    yield jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:])


def loss_fn(model, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()


def train(model, params, tx, data, steps, batch_size, seed, desc):
  """Returns the params, the optimizer state and the loss of every step."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  stream = batches(data, model.seq, batch_size, seed)
  for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
    params, state, loss = step(params, state, *next(stream))
    losses.append(float(loss))
  return params, state, np.asarray(losses)


def base_model(args, prose):
  """The base model: loaded from --base, or trained briefly and written there."""
  model = LM()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.seq), jnp.int32))
  path = pathlib.Path(args.base)
  if path.exists():
    try:
      loaded = serialization.from_bytes(params, path.read_bytes())
      if jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, params):
        print(f"base model loaded from {path}")
        return loaded
      print(f"{path} holds another model's params; training a new base model")
    except (ValueError, KeyError, TypeError) as e:
      print(f"{path} is not a base model of this script ({type(e).__name__}); training a new one")
  params, _, losses = train(
    model, params, optax.adamw(3e-3), prose, args.base_steps, args.batch_size, 0, "base model"
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.to_bytes(params))
  print(f"base model: loss {losses[0]:.3f} -> {losses[-10:].mean():.3f}, written to {path}")
  return params


def state_bytes(state) -> int:
  """Optimizer-state bytes: JAX arrays plus the registry's moments."""
  return op.state_nbytes(state)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--base-steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--base", default="lora_base.msgpack", help="base model file")
  parser.add_argument("--plot", default="lora_loss.png")
  args = parser.parse_args()
  start = time.perf_counter()
  print(f"{jax.devices()[0].platform} device: {jax.devices()[0].device_kind}")

  prose = text([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
  code = text(sorted((ROOT / "optax_paged8bit").glob("*.py")))
  base = base_model(args, prose)

  # The adapted model: the base's params, plus adapters at zero.
  model = LM(rank=args.rank)
  fresh = model.init(jax.random.PRNGKey(1), jnp.zeros((1, model.seq), jnp.int32))
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(base)[0]}

  def from_base(path, leaf):
    name = jax.tree_util.keystr(path).replace("['base']", "")
    return flat.get(name, leaf) if "lora_" not in jax.tree_util.keystr(path) else leaf

  params = jax.tree_util.tree_map_with_path(from_base, fresh)
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "lora" if "lora_" in jax.tree_util.keystr(path) else "frozen", params
  )
  n_lora = sum(
    x.size
    for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True)
    if lab == "lora"
  )
  n_all = sum(x.size for x in jax.tree.leaves(params))
  x0, y0 = next(batches(code, model.seq, 64, seed=123))
  before = float(loss_fn(model, params, x0, y0))
  print(f"LoRA rank {args.rank}: {n_lora:,} trainable of {n_all:,} params")

  runs = {}
  for name, inner in (
    # This toy model's adapters have 1K-4K elements; bitsandbytes' default
    # min_8bit_size (4096) would keep most of them in float32. A real model's
    # (4096 x 16 and up) are far above it.
    ("paged_adamw8bit", op.paged_adamw8bit(args.lr, weight_decay=0.0, min_8bit_size=1024)),
    ("optax.adamw", optax.adamw(args.lr, weight_decay=0.0)),
  ):
    tx = optax.multi_transform({"lora": inner, "frozen": optax.set_to_zero()}, labels)
    tuned, state, losses = train(model, params, tx, code, args.steps, args.batch_size, 1, name)
    frozen_kept = all(
      bool(jnp.array_equal(a, b))
      for a, b, lab in zip(
        jax.tree.leaves(tuned), jax.tree.leaves(params), jax.tree.leaves(labels), strict=True
      )
      if lab == "frozen"
    )
    runs[name] = {
      "losses": losses,
      "after": float(loss_fn(model, tuned, x0, y0)),
      "bytes": state_bytes(state),
      "frozen_kept": frozen_kept,
    }
    op.release(state)

  print(f"\nfine-tuning loss on held-out code: before {before:.3f}")
  print(f"{'optimizer':18} {'loss after':>10} {'state bytes':>12} {'bytes/trainable':>16}")
  for name, r in runs.items():
    print(f"{name:18} {r['after']:10.3f} {r['bytes']:12,} {r['bytes'] / n_lora:16.2f}")
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, r in runs.items():
    smooth = np.convolve(r["losses"], np.ones(10) / 10, mode="valid")
    ax.plot(np.arange(len(smooth)) + 10, smooth, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (10-step mean)")
  ax.set_title(
    f"LoRA rank {args.rank} on a frozen char LM ({n_lora:,} trainable params)", fontsize=10
  )
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"loss plot saved to {args.plot} ({time.perf_counter() - start:.0f} s in all)")
  for name, r in runs.items():
    if not r["frozen_kept"]:
      raise SystemExit(f"{name}: a frozen param changed")
    if not r["after"] < before:
      raise SystemExit(f"{name}: the fine-tuning loss did not go down")
  if not runs["paged_adamw8bit"]["bytes"] * 3 < runs["optax.adamw"]["bytes"]:
    raise SystemExit("paged_adamw8bit's state is not under a third of optax.adamw's")


if __name__ == "__main__":
  main()
