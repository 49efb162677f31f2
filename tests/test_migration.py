"""From optax.adamw to the 8-bit optimizers and back: the round trip loses at
most the quantization error, and training continues."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mesh_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_paged8bit as op
from optax_paged8bit import quantization as q


def trained_adamw(params, steps=5):
  tx = optax.adamw(1e-3)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.01, p.dtype), params
    )
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def params_tree():
  rng = np.random.default_rng(1)
  return {
    "w": jnp.asarray(rng.standard_normal((512, 768)) * 0.1, jnp.float32),
    "v": jnp.asarray(rng.standard_normal(5000) * 0.1, jnp.float32),
    "b": jnp.asarray(rng.standard_normal(100) * 0.1, jnp.float32),
  }


def quantization_bound(x, qmap, block_wise=True):
  """The widest gap between neighbouring map entries, times the block's scale:
  rounding to the nearest code loses at most half of it, the sign fix (one
  step toward the moment's sign) at most all of it."""
  gap = np.max(np.diff(qmap)) * (1 + 1e-6)
  flat = np.asarray(x, np.float32).reshape(-1)
  if not block_wise:
    return gap * np.max(np.abs(flat)) + 1e-30
  blocks = -(-flat.size // 256)
  padded = np.pad(flat, (0, blocks * 256 - flat.size)).reshape(blocks, 256)
  return np.repeat(gap * np.max(np.abs(padded), axis=1), 256)[: flat.size].reshape(x.shape) + 1e-30


@pytest.mark.parametrize("kind", ["paged", "arrays"])
@pytest.mark.parametrize("block_wise", [True, False])
def test_round_trip_within_quantization_error(kind, block_wise):
  params, adamw_state = trained_adamw(params_tree())
  make = op.paged_adamw8bit if kind == "paged" else op.adamw8bit
  tx = make(1e-3, block_wise=block_wise)
  state = op.from_optax_adamw(adamw_state, tx.init(params))
  assert int(state.count) == 5
  back = op.to_optax_adamw(state)
  adam = adamw_state[0]
  for name in ("w", "v"):
    pairs = (
      (back.mu[name], adam.mu[name], q.QMAP_SIGNED),
      (back.nu[name], adam.nu[name], q.QMAP_UNSIGNED),
    )
    for got, want, qmap in pairs:
      err = np.abs(np.asarray(got) - np.asarray(want))
      assert np.all(err <= quantization_bound(want, qmap, block_wise)), name
      assert err.max() > 0  # quantized, not copied
  np.testing.assert_array_equal(np.asarray(back.mu["b"]), np.asarray(adam.mu["b"]))  # float32 leaf
  # Training continues from the converted state.
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(state.count) == 6
  if kind == "paged":
    op.release(state)


def test_to_optax_adamw_plugs_into_optax():
  params, adamw_state = trained_adamw(params_tree())
  tx = op.adamw8bit(1e-3)
  state = op.from_optax_adamw(adamw_state, tx.init(params))
  adamw = optax.adamw(1e-3)
  restored = (op.to_optax_adamw(state), *adamw.init(params)[1:])
  updates, _ = adamw.update(jax.tree.map(jnp.ones_like, params), restored, params)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


def test_sharded_migration_matches_one_device():
  mesh = jax.sharding.Mesh(np.asarray(mesh_devices(4)), ("x",))
  params, adamw_state = trained_adamw(params_tree())
  specs = {"w": P("x"), "v": P(), "b": P()}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  one = op.from_optax_adamw(adamw_state, op.adamw8bit(1e-3).init(params))
  many = op.from_optax_adamw(adamw_state, op.adamw8bit(1e-3).init(sharded))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert many.state1["w"].sharding.spec[0] == "x"


def test_migration_errors():
  params, adamw_state = trained_adamw(params_tree(), steps=1)
  with pytest.raises(ValueError, match=r"expected an optax\.adamw state"):
    op.from_optax_adamw(optax.sgd(1e-3).init(params), op.adamw8bit().init(params))
  with pytest.raises(TypeError, match="must come from paged_adamw8bit or adamw8bit"):
    op.from_optax_adamw(adamw_state, adamw_state)
