"""Params, grads and a training loop shared by test_checkpoint.py and the
fresh processes it starts (which import this file)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged8bit as op

SHAPES = {"w": (1024, 512), "u": (8192,), "b": (300,)}
SPECS = {"w": P("x"), "u": P("x"), "b": P()}


def make(seed, mesh=None):
  rng = np.random.default_rng(seed)
  tree = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in SHAPES.items()}
  if mesh is None:
    return {k: jax.numpy.asarray(v) for k, v in tree.items()}
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}


def train(tx, state, params, steps, first, mesh=None):
  """Steps first .. first + steps - 1, each with its own grads."""
  step = jax.jit(tx.fused_update)
  for t in range(first, first + steps):
    params, state = step(make(100 + t, mesh), state, params)
  return params, state


def optimizer(kind):
  return {"paged": op.paged_adamw8bit, "arrays": op.adamw8bit}[kind](1e-3, min_8bit_size=1000)
