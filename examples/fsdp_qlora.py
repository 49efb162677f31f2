"""FSDP QLoRA in JAX: a 4-bit frozen base model sharded over every device,
LoRA adapters trained with paged_adamw8bit.

The pipeline bitsandbytes' PagedAdamW8bit is best known for, end to end:
- a small character-level transformer is pretrained on English prose (this
  repository's README and guides) and written to --base (loaded from there when
  it exists);
- its linear layers are quantized to NF4, QLoRA's 4-bit NormalFloat (16 levels
  at the quantiles of a normal distribution, one float32 scale per 64
  weights), and dequantized on the fly in the forward pass; embeddings, norms
  and the head stay float32 and frozen, as in QLoRA;
- the base is sharded FSDP-style: every weight's first axis over a 1-D mesh of
  all devices (of every process with --num-processes), the batch over the same
  axis;
- rank-r adapters on the attention and MLP layers, sharded along their long
  axis, are fine-tuned on the package's Python source with paged_adamw8bit;
  `optax.multi_transform` gives the frozen parts `optax.set_to_zero()`, so they
  have no optimizer state at all;
- the adapters and the optimizer state are checkpointed with save_checkpoint
  every --checkpoint-every steps (--checkpoint-dir), and --resume continues from
  the latest checkpoint bit-identically (the base is never re-saved).

  python examples/fsdp_qlora.py                       # 8 fake CPU devices, or the GPUs
  python examples/launch.py -n 2 examples/fsdp_qlora.py  # 2 processes of 4 devices

Prints the loss on held-out code before and after, each part's bytes per device
against LoRA on a float32 base with optax.adamw, a digest of the trained
adapters, and saves a plot of the loss.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import statistics
import time

import fake_devices  # noqa: F401 (before jax: 8 fake CPU devices in all)
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import serialization
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged8bit as op

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB, DIM, HEADS, LAYERS, SEQ = 128, 128, 4, 2, 64
LINEARS = {"qkv": (DIM, 3 * DIM), "proj": (DIM, DIM), "fc": (DIM, 4 * DIM), "fc2": (4 * DIM, DIM)}
NF4_BLOCK = 64  # weights per NF4 scale, as in QLoRA
LORA_ALPHA = 16.0


# -- NF4: QLoRA's 4-bit NormalFloat ------------------------------------------------------


def nf4_table() -> np.ndarray:
  """The 16 NF4 levels: 8 positive and 7 negative quantiles of the standard
  normal distribution, taken at evenly spaced probabilities from 0.5 to
  OFFSET, plus an exact zero, scaled so that the largest is 1 (and the
  smallest -1). OFFSET puts the outermost level halfway between the last
  quantiles of 15 and of 16 equal bins, as QLoRA does."""
  offset = 0.9677083
  ppf = statistics.NormalDist().inv_cdf
  positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.asarray([*positive, 0.0, *negative]))
  return (levels / levels.max()).astype(np.float32)


NF4 = nf4_table()


def nf4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(codes, scales) of a float matrix whose last axis is a multiple of 64:
  each block of 64 consecutive weights of a row is divided by its largest
  magnitude (its float32 scale) and each weight becomes the index of the
  nearest NF4 level. Two 4-bit codes share a byte (the first in the high
  half): 0.5 bytes per weight plus 4 bytes per 64."""
  rows, cols = w.shape
  blocks = np.asarray(w, np.float32).reshape(rows, cols // NF4_BLOCK, NF4_BLOCK)
  scales = np.abs(blocks).max(axis=-1)
  unit = blocks / np.where(scales == 0, 1, scales)[..., None]
  codes = np.abs(unit[..., None] - NF4).argmin(axis=-1).astype(np.uint8).reshape(rows, cols)
  return (codes[:, 0::2] << 4) | codes[:, 1::2], scales.astype(np.float32)


def nf4_dequantize(codes: jax.Array, scales: jax.Array) -> jax.Array:
  """The float32 matrix the codes and scales stand for."""
  rows = codes.shape[0]
  both = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(rows, -1, NF4_BLOCK)
  return (jnp.asarray(NF4)[both] * scales[..., None]).reshape(rows, -1)


# -- the model: a character-level transformer, written as plain JAX ---------------------


def init_model(key) -> tuple[dict, dict]:
  """(float params, linear weights) of the base model."""
  keys = iter(jax.random.split(key, 4 + 4 * LAYERS))
  normal = lambda shape, scale: jax.random.normal(next(keys), shape) * scale
  norm = lambda: {"scale": jnp.ones((DIM,)), "bias": jnp.zeros((DIM,))}
  params = {
    "embed": normal((VOCAB, DIM), 0.02),
    "pos": normal((SEQ, DIM), 0.02),
    "blocks": [{"ln1": norm(), "ln2": norm()} for _ in range(LAYERS)],
    "ln_f": norm(),
    "head": normal((DIM, VOCAB), DIM**-0.5),
  }
  weights = {
    "blocks": [
      {name: normal(shape, shape[0] ** -0.5) for name, shape in LINEARS.items()}
      for _ in range(LAYERS)
    ]
  }
  return params, weights


def layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def linear(x, weight, lora=None):
  """x @ W, W a float matrix or NF4 (codes, scales) dequantized here, plus
  the adapter's (x @ A) @ B * alpha / r when there is one."""
  w = nf4_dequantize(*weight) if isinstance(weight, tuple) else weight
  y = x @ w
  if lora is not None:
    y = y + (x @ lora["a"]) @ lora["b"] * (LORA_ALPHA / lora["a"].shape[1])
  return y


def forward(params, weights, tokens, adapters=None):
  x = params["embed"][tokens] + params["pos"]
  for i, (p, w) in enumerate(zip(params["blocks"], weights["blocks"], strict=True)):
    lora = adapters["blocks"][i] if adapters is not None else {}
    q, k, v = jnp.split(linear(layer_norm(x, p["ln1"]), w["qkv"], lora.get("qkv")), 3, axis=-1)
    heads = lambda t: t.reshape(*t.shape[:-1], HEADS, DIM // HEADS)
    att = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / np.sqrt(DIM // HEADS)
    att = jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), att, -1e9)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), heads(v)).reshape(x.shape)
    x = x + linear(out, w["proj"], lora.get("proj"))
    h = jax.nn.gelu(linear(layer_norm(x, p["ln2"]), w["fc"], lora.get("fc")))
    x = x + linear(h, w["fc2"], lora.get("fc2"))
  return layer_norm(x, params["ln_f"]) @ params["head"]


def loss_fn(params, weights, x, y, adapters=None):
  logits = forward(params, weights, x, adapters)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def init_adapters(key, rank: int) -> dict:
  """A starts small and random, B at zero: the adapted model starts as the base."""
  keys = iter(jax.random.split(key, LAYERS * len(LINEARS)))
  return {
    "blocks": [
      {
        name: {
          "a": jax.random.normal(next(keys), (n_in, rank)) / n_in,
          "b": jnp.zeros((rank, n_out)),
        }
        for name, (n_in, n_out) in LINEARS.items()
      }
      for _ in range(LAYERS)
    ]
  }


# -- data ------------------------------------------------------------------------------


def text(paths) -> np.ndarray:
  data = "".join(p.read_text(errors="ignore") for p in paths)
  return np.frombuffer(data.encode("ascii", errors="ignore"), np.uint8).astype(np.int32) % VOCAB


def batch(data: np.ndarray, step: int, size: int, sharding) -> tuple[jax.Array, jax.Array]:
  """The step's batch (every process draws the same one, from the step's
  seed, and hands over the rows of its devices), sharded over the mesh."""
  starts = np.random.default_rng([7, step]).integers(0, data.size - SEQ - 1, size)
  chunk = np.stack([data[s : s + SEQ + 1] for s in starts])
  x = jax.make_array_from_callback(chunk.shape, sharding, lambda index: chunk[index])
  return x[:, :-1], x[:, 1:]


# -- the base model ---------------------------------------------------------------------


def pretrained_base(path: pathlib.Path, steps: int, prose: np.ndarray) -> tuple[dict, dict]:
  """The float base model: loaded from `path`, or pretrained on one device
  and written there (by the first process)."""
  params, weights = init_model(jax.random.PRNGKey(0))
  if path.exists():
    loaded = serialization.from_bytes((params, weights), path.read_bytes())
    if jax.process_index() == 0:
      print(f"base model loaded from {path}")
    return loaded
  tx = optax.adamw(3e-3)
  state = tx.init((params, weights))

  @jax.jit
  def step(tree, state, x, y):
    loss, grads = jax.value_and_grad(lambda t: loss_fn(*t, x, y))(tree)
    updates, state = tx.update(grads, state, tree)
    return optax.apply_updates(tree, updates), state, loss

  device = NamedSharding(jax.make_mesh((1,), ("one",), devices=jax.local_devices()[:1]), P())
  tree, losses = (params, weights), []
  for i in range(steps):
    tree, state, loss = step(tree, state, *batch(prose, 100_000 + i, 16, device))
    losses.append(float(loss))
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(tree))
  if jax.process_index() == 0:
    print(f"base model: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}, written to {path}")
  return tree


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded arrays."""
  return sum(
    int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree)
  )


def digest(tree) -> str:
  """A hash of a tree's values, gathered from every process's devices."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(multihost_utils.process_allgather(tree, tiled=True)):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()[:16]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--base", default="qlora_base.msgpack", help="the float base model's file")
  parser.add_argument("--base-steps", type=int, default=200)
  parser.add_argument("--checkpoint-dir", help="save the adapters and optimizer state here")
  parser.add_argument("--checkpoint-every", type=int, default=50)
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  parser.add_argument("--plot", default="qlora_loss.png")
  parser.add_argument("--num-processes", type=int, default=1, help="jax.distributed processes")
  parser.add_argument("--process-id", type=int, default=0, help="this process's index")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  start = time.perf_counter()

  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  fsdp = NamedSharding(mesh, P("fsdp", None))  # a weight's first axis over every device
  say(
    f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices"
  )

  prose = text([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
  code = text(sorted((ROOT / "optax_paged8bit").glob("*.py")))
  train_code, held_out = code[: -code.size // 10], code[-code.size // 10 :]
  params, weights = pretrained_base(pathlib.Path(args.base), args.base_steps, prose)

  # The frozen base: NF4 linear layers, float32 embeddings, norms and head, all sharded.
  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def shard_frozen(path, x):
    return place(x, fsdp if x.ndim == 2 else NamedSharding(mesh, P()))

  frozen = jax.tree_util.tree_map_with_path(shard_frozen, params)
  base = {
    "blocks": [
      {name: tuple(place(a, fsdp) for a in nf4_quantize(np.asarray(w))) for name, w in b.items()}
      for b in weights["blocks"]
    ]
  }
  # The adapters: A sharded like its layer's first axis, B along its output axis.
  lora_sharding = lambda path, x: NamedSharding(
    mesh, P("fsdp", None) if jax.tree_util.keystr(path).endswith("['a']") else P(None, "fsdp")
  )
  adapters = init_adapters(jax.random.PRNGKey(1), args.rank)
  adapters = jax.tree_util.tree_map_with_path(
    lambda path, x: place(x, lora_sharding(path, x)), adapters
  )

  trainable = {"frozen": frozen, "lora": adapters}
  labels = {"frozen": jax.tree.map(lambda _: "frozen", frozen), "lora": "lora"}
  tx = optax.multi_transform(
    {
      "lora": op.paged_adamw8bit(args.lr, eps=1e-6, min_8bit_size=1024),
      "frozen": optax.set_to_zero(),
    },
    labels,
  )
  opt_state = tx.init(trainable)

  @jax.jit
  def train_step(trainable, opt_state, base, x, y):
    def loss(t):
      return loss_fn(t["frozen"], base, x, y, t["lora"])

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  @jax.jit
  def eval_loss(trainable, base, x, y):
    return loss_fn(trainable["frozen"], base, x, y, trainable["lora"])

  data_sharding = NamedSharding(mesh, P("fsdp", None))
  held_out_batches = [batch(held_out, 10_000 + i, args.batch_size, data_sharding) for i in range(4)]
  evaluate = lambda t: float(np.mean([eval_loss(t, base, *b) for b in held_out_batches]))

  manager, first = None, 0
  if args.checkpoint_dir:
    import orbax.checkpoint as ocp  # only to checkpoint: it takes seconds to import

    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    manager = ocp.CheckpointManager(os.path.abspath(args.checkpoint_dir), options=options)
    if args.resume and manager.latest_step() is not None:
      # The adapters and the optimizer state only: the base comes from --base.
      saved = op.restore_checkpoint(manager, {"lora": trainable["lora"], "opt_state": opt_state})
      trainable = {"frozen": frozen, "lora": saved["lora"]}
      opt_state, first = saved["opt_state"], manager.latest_step()
      say(f"resumed from the checkpoint of step {first}")

  before = evaluate(trainable)
  losses = []
  for step in range(first, args.steps):
    trainable, opt_state, loss = train_step(
      trainable, opt_state, base, *batch(train_code, step, args.batch_size, data_sharding)
    )
    losses.append(float(loss))
    if manager is not None and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps):
      tree = {"lora": trainable["lora"], "opt_state": opt_state}
      op.save_checkpoint(manager, tree, step=step + 1)
  after = evaluate(trainable)
  if manager is not None:
    manager.close()

  say(f"fine-tuning loss on held-out code: before {before:.3f}, after {after:.3f}")
  # Bytes per device of each part, against LoRA on a float32 base with optax.adamw.
  slots = {}
  for info in op.slot_info(opt_state):  # this process's devices
    slots[info["device"]] = slots.get(info["device"], 0) + info["bytes"]
  state_bytes = max(slots.values()) + per_device_bytes(opt_state)
  adamw_bytes = 2 * per_device_bytes(trainable["lora"])  # mu and nu, float32 like the adapters
  float_base = per_device_bytes(frozen) + sum(
    4 * w.size // jax.device_count() for w in jax.tree.leaves(weights)
  )
  rows = [
    ("base weights", per_device_bytes(frozen) + per_device_bytes(base), float_base),
    ("adapters", per_device_bytes(trainable["lora"]), per_device_bytes(trainable["lora"])),
    ("optimizer state", state_bytes, adamw_bytes),
  ]
  say("bytes per device       NF4 base + paged_adamw8bit   float32 base + optax.adamw")
  for name, ours, theirs in rows:
    say(f"{name:<22} {ours:>26,} {theirs:>28,}")
  say(f"adapters digest: {digest(trainable['lora'])}")
  say(f"{len(losses)} steps in {time.perf_counter() - start:.1f} s in all")

  op.release(opt_state)
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  if len(losses) >= 50 and not after < before:  # (a short run may not show it)
    raise SystemExit("the held-out loss did not go down")
  if jax.process_index() != 0 or not losses:
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
  ax.plot(np.arange(len(smooth)) + first + 10, smooth)
  ax.set(xlabel="step", ylabel="training loss (10-step mean)")
  ax.set_title(f"QLoRA: NF4 base on {jax.device_count()} devices, rank {args.rank}", fontsize=10)
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f"loss plot saved to {args.plot}")


if __name__ == "__main__":
  main()
