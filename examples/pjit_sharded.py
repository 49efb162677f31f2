"""A small character-level transformer LM, sharded over a (data, model) mesh and
trained with paged_adamw8bit.

The params are placed with `NamedSharding` (tensor-parallel on the `model` axis,
replicated on `data`), the batch is split on `data`, and the whole train step
is one `jax.jit`. The optimizer runs its custom call inside `jax.shard_map`, so
each device updates only its own shards with its own 8-bit state.

Runs on 8 fake CPU devices by default (2 x 4 mesh) and on the GPUs when there
are some:

  python examples/pjit_sharded.py
  python examples/pjit_sharded.py --steps 600 --plot /tmp/pjit_loss.png

The same script runs as several processes of JAX's multi-controller runtime
(`jax.distributed`): one process per host or per GPU, the mesh made of every
process's devices. examples/launch.py starts N processes on this machine
(on CPUs each gets 8 / N fake devices):

  python examples/launch.py -n 2 examples/pjit_sharded.py --steps 100

or give each process --num-processes, --process-id and --coordinator
yourself, or --distributed under a cluster launcher whose environment JAX
reads (SLURM, Open MPI). Prints the loss, the optimizer-state bytes on each
device (against what optax.adamw would keep there), and saves a plot of the
loss (process 0).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import fake_devices  # noqa: F401 (before jax: 8 fake CPU devices in all)
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged8bit as op

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VOCAB = 128  # ASCII


class Block(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    qkv = nn.Dense(3 * self.dim, name="qkv")(h)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim // self.heads)
    q, k, v = split(q), split(k), split(v)
    seq = x.shape[1]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.dim // self.heads)
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape)
    x = x + nn.Dense(self.dim, name="proj")(out)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(4 * self.dim, name="fc")(h)
    return x + nn.Dense(self.dim, name="fc2")(jax.nn.gelu(h))


class LM(nn.Module):
  dim: int = 256
  heads: int = 4
  layers: int = 2
  seq: int = 64

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.dim, name="embed")(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (self.seq, self.dim))
    for i in range(self.layers):
      x = Block(self.dim, self.heads, name=f"block{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def spec_for(path: tuple, shape: tuple) -> P:
  """Tensor parallelism on `model`: column-parallel in, row-parallel out."""
  names = [getattr(k, "key", str(k)) for k in path]
  if names[-1] == "kernel" and names[-2] in ("qkv", "fc"):
    return P(None, "model")
  if names[-1] == "kernel" and names[-2] in ("proj", "fc2"):
    return P("model", None)
  if names[-1] == "bias" and names[-2] in ("qkv", "fc"):
    return P("model")
  if names[-1] == "embedding":
    return P(None, "model")
  return P()  # layer norms, position table, head: replicated


def corpus() -> np.ndarray:
  text = ""
  root = pathlib.Path(__file__).resolve().parent.parent
  for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
    if path.exists():
      text += path.read_text(errors="ignore")
  if len(text) < 10_000:
    text += (__doc__ or "") * 50
  return np.frombuffer(text.encode("ascii", errors="ignore"), np.uint8).astype(np.int32) % VOCAB


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--model-axis", type=int, default=4)
  parser.add_argument("--plot", default="pjit_loss.png")
  parser.add_argument("--num-processes", type=int, default=1, help="jax.distributed processes")
  parser.add_argument("--process-id", type=int, default=0, help="this process's index")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument(
    "--distributed", action="store_true", help="jax.distributed.initialize() from the environment"
  )
  args = parser.parse_args()

  if args.num_processes > 1 or args.distributed:
    if args.distributed:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  main_process = jax.process_index() == 0
  say = print if main_process else (lambda *a, **k: None)

  devices = jax.devices()
  model_axis = min(args.model_axis, len(devices))
  mesh = jax.make_mesh(
    (len(devices) // model_axis, model_axis),
    ("data", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  say(
    f"{jax.process_count()} process(es), {len(devices)} {devices[0].platform} devices, "
    f"mesh {dict(mesh.shape)}"
  )

  model = LM()
  data = corpus()
  rng = np.random.default_rng(0)

  def batch():
    starts = rng.integers(0, data.size - model.seq - 1, args.batch_size)
    chunk = np.stack([data[s : s + model.seq + 1] for s in starts])
    # Every process draws the same batch and hands over the rows of its devices.
    sharding = NamedSharding(mesh, P("data", None))
    x = jax.make_array_from_callback(chunk.shape, sharding, lambda index: chunk[index])
    return x[:, :-1], x[:, 1:]

  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.seq), jnp.int32))
  shardings = jax.tree_util.tree_map_with_path(
    lambda path, p: NamedSharding(mesh, spec_for(path, p.shape)), jax.eval_shape(init)
  )
  params = jax.jit(init, out_shardings=shardings)()
  n_params = sum(p.size for p in jax.tree.leaves(params))

  tx = optax.chain(optax.clip_by_global_norm(1.0), op.paged_adamw8bit(args.lr, weight_decay=0.01))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    params, opt_state, loss = train_step(params, opt_state, *batch())
    losses.append(float(loss))
    if step == 1 or step % 50 == 0 or step == args.steps:
      say(f"step {step:4d}  loss {np.mean(losses[-50:]):.4f}")
  say(f"{args.steps} steps in {time.perf_counter() - start:.1f} s, {n_params:,} params")

  per_device = {}
  for info in op.slot_info(opt_state):  # this process's devices
    per_device[info["device"]] = per_device.get(info["device"], 0) + info["bytes"]
  adamw_bytes = sum(
    8 * int(np.prod(p.sharding.shard_shape(p.shape))) for p in jax.tree.leaves(params)
  )
  say("optimizer state per device (bytes): paged_adamw8bit vs optax.adamw's mu + nu")
  for device, nbytes in sorted(per_device.items()):
    say(f"  device {device}: {nbytes:>10,}  vs {adamw_bytes:>10,}")

  op.release(opt_state)
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  if not losses[-1] < losses[0]:
    raise SystemExit("the loss did not go down")
  if not main_process:
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
  ax.plot(np.arange(len(smooth)) + 10, smooth)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (10-step mean)")
  shape = "x".join(str(n) for n in mesh.shape.values())
  ax.set_title(f"char LM, {n_params / 1e6:.1f}M params, {shape} mesh, paged_adamw8bit", fontsize=10)
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"loss plot saved to {args.plot}")


if __name__ == "__main__":
  main()
