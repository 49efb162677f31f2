"""Params, grads and a training loop shared by test_checkpoint.py and the
fresh processes it starts (which import this file)."""

from __future__ import annotations

import jax
import numpy as np
import optax
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


def train(tx, state, params, steps, first, mesh=None, fused=True):
  """Steps first .. first + steps - 1, each with its own grads: tx's fused
  step, or (not fused) its update, then optax.apply_updates."""

  def optax_path(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(tx.fused_update if fused else optax_path)
  for t in range(first, first + steps):
    params, state = step(make(100 + t, mesh), state, params)
  return params, state


def optimizer(kind):
  return {"paged": op.paged_adamw8bit, "arrays": op.adamw8bit}[kind](1e-3, min_8bit_size=1000)


def flax_train_state(kind, params):
  """A linen-style TrainState of `params` with the optimizer of `kind`."""
  from flax.training import train_state

  return train_state.TrainState.create(apply_fn=None, params=params, tx=optimizer(kind))


def train_state_steps(state, steps, first):
  """TrainState.apply_gradients steps first .. first + steps - 1."""
  step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  for t in range(first, first + steps):
    state = step(state, make(100 + t))
  return state


class NnxModel:
  """A two-layer NNX model and its nnx.Optimizer, trained on fixed data."""

  def __init__(self, kind, seed=0):
    from flax import nnx

    self.nnx = nnx
    self.model = nnx.Sequential(
      nnx.Linear(64, 256, rngs=nnx.Rngs(seed)), nnx.relu, nnx.Linear(256, 10, rngs=nnx.Rngs(seed))
    )
    self.optimizer = nnx.Optimizer(self.model, optimizer(kind), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
      loss, grads = nnx.value_and_grad(lambda m: ((m(x) - 1.0) ** 2).mean())(model)
      optimizer.update(model, grads)
      return loss

    self._step = step

  def train(self, steps, first):
    for t in range(first, first + steps):
      x = np.random.default_rng(t).standard_normal((16, 64)).astype(np.float32)
      self._step(self.model, self.optimizer, x)

  def tree(self):
    return {"model": self.nnx.state(self.model), "optimizer": self.nnx.state(self.optimizer)}

  def load(self, tree):
    self.nnx.update(self.model, tree["model"])
    self.nnx.update(self.optimizer, tree["optimizer"])

  def params(self):
    return [np.asarray(x) for x in jax.tree.leaves(self.nnx.state(self.model, self.nnx.Param))]
