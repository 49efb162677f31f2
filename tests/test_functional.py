"""adamw8bit: the same algorithm and kernel as paged_adamw8bit with the state
as arrays; functional, so optax.MultiSteps, apply_if_finite and jnp.where work."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mesh_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import BFLOAT16
from test_oracle import assert_bit_equal

import optax_paged8bit as op

SHAPES = {"a": (4097,), "b": (64, 512), "c": (3, 100), "d": (2, 2500)}


def tree(seed, dtype=np.float32, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray((rng.standard_normal(s) * 0.1).astype(dtype)) for k, s in shapes.items()}


def grads(seed, params):
  rng = np.random.default_rng(seed)
  return {
    k: jnp.asarray((rng.standard_normal(p.shape) * 0.01).astype(p.dtype)) for k, p in params.items()
  }


def assert_trees_equal(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
    assert_bit_equal(np.asarray(x), np.asarray(y), f"{what} {i}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize(
  "kw",
  [
    dict(percentile_clipping=80),
    dict(block_wise=False, weight_decay=0.0),
    dict(args={"optim_bits": 32}),
  ],
  ids=["clip", "whole", "f32"],
)
@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16, np.float16], ids=["f32", "bf16", "f16"])
def test_bit_identical_to_paged(dtype, kw, fused):
  paged, arrays = op.paged_adamw8bit(1e-3, **kw), op.adamw8bit(1e-3, **kw)
  p1 = p2 = tree(0, dtype)
  s1, s2 = paged.init(p1), arrays.init(p2)
  for t in range(4):
    g = grads(10 + t, p1)
    if fused:
      p1, s1 = jax.jit(paged.fused_update)(g, s1, p1)
      p2, s2 = jax.jit(arrays.fused_update)(g, s2, p2)
    else:
      u1, s1 = jax.jit(paged.update)(g, s1, p1)
      u2, s2 = jax.jit(arrays.update)(g, s2, p2)
      assert_trees_equal(u1, u2, "updates")
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert_trees_equal(p1, p2, "params")
  assert_trees_equal(op.export_state(s1), s2, "state")  # same pytree, same bits
  op.release(s1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
def test_many_leaves_in_several_calls_bit_identical_to_paged(fused, monkeypatch):
  # 40 leaves, 16 to a call: adamw8bit's update runs as 3 custom calls
  # (ARRAYS_CALL_LEAVES, 256 by default), the paged one as one; 8-bit and
  # float32 leaves, clipping, donated state.
  monkeypatch.setattr(op._calls, "ARRAYS_CALL_LEAVES", 16)
  shapes = {f"l{i:03d}": ((300 + 37 * i,) if i % 3 else (8, 64 + i)) for i in range(40)}
  kw = dict(min_8bit_size=1000, percentile_clipping=90)
  paged, arrays = op.paged_adamw8bit(1e-3, **kw), op.adamw8bit(1e-3, **kw)
  p1, p2 = tree(1, shapes=shapes), tree(1, shapes=shapes)  # each donated
  s1, s2 = paged.init(p1), arrays.init(p2)

  def step(tx):
    if fused:
      return jax.jit(tx.fused_update, donate_argnums=(1, 2))

    def optax_step(g, s, p):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return jax.jit(optax_step, donate_argnums=(1, 2))

  step1, step2 = step(paged), step(arrays)
  for t in range(3):
    g = grads(20 + t, p1)
    p1, s1 = step1(g, s1, p1)
    p2, s2 = step2(g, s2, p2)
  assert_trees_equal(p1, p2, "params")
  assert_trees_equal(op.export_state(s1), s2, "state")
  op.release(s1)


def test_state_is_the_export_format_and_imports_into_paged():
  params = tree(1)
  tx = op.adamw8bit(1e-3)
  state = tx.init(params)
  for t in range(2):
    params, state = tx.fused_update(grads(20 + t, params), state, params)
  paged = op.paged_adamw8bit(1e-3)
  pstate = op.import_state(paged.init(params), state)
  g = grads(30, params)
  pa, _ = tx.fused_update(g, state, params)
  pb, pstate = paged.fused_update(g, pstate, params)
  assert_trees_equal(pa, pb, "params")
  op.release(pstate)


def test_multisteps():
  k = 3
  params = tree(2)
  tx = optax.MultiSteps(op.adamw8bit(1e-3), every_k_schedule=k)
  mean_of = optax.MultiSteps(optax.scale(1.0), every_k_schedule=k)  # emits MultiSteps' means
  state, mstate = tx.init(params), mean_of.init(params)
  ref_tx = op.adamw8bit(1e-3)
  ref_state, ref_params = ref_tx.init(params), params
  step = jax.jit(tx.update)
  for i in range(2 * k):
    g = grads(40 + i, params)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    mean, mstate = mean_of.update(g, mstate)
    if (i + 1) % k == 0:
      ru, ref_state = ref_tx.update(mean, ref_state, ref_params)
      ref_params = optax.apply_updates(ref_params, ru)
  assert_trees_equal(params, ref_params, "params")
  assert int(state.inner_opt_state.count) == 2


def test_apply_if_finite_skips_a_nan_step():
  params = tree(3)
  tx = optax.apply_if_finite(op.adamw8bit(1e-3), max_consecutive_errors=3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u, state = step(grads(50, params), state, params)
  params = optax.apply_updates(params, u)
  before = jax.tree.map(np.asarray, state.inner_state)
  bad = grads(51, params)
  bad["a"] = bad["a"].at[0].set(jnp.nan)
  u, state = step(bad, state, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  assert_trees_equal(before, state.inner_state, "state after the skipped step")
  u, state = step(grads(52, params), state, params)
  params = optax.apply_updates(params, u)
  ref = op.adamw8bit(1e-3)
  rp = tree(3)
  rs = ref.init(rp)
  for seed in (50, 52):
    ru, rs = ref.update(grads(seed, rp), rs, rp)
    rp = optax.apply_updates(rp, ru)
  assert_trees_equal(params, rp, "params")


def test_where_selection_and_rerunning_a_step():
  params = tree(4)
  tx = op.adamw8bit(1e-3)
  s0 = tx.init(params)
  g = grads(60, params)
  _, s1 = tx.update(g, s0, params)
  _, s1_again = tx.update(g, s0, params)  # the old state is still valid
  assert_trees_equal(s1, s1_again, "re-run")
  chosen = jax.tree.map(lambda a, b: jnp.where(False, a, b), s1, s0)
  assert_trees_equal(chosen, s0, "selected")


def test_sharded_adamw8bit_matches_one_device():
  mesh = jax.sharding.Mesh(np.asarray(mesh_devices(4)), ("x",))
  shapes = {"w": (1024, 512), "u": (8192,), "b": (300,)}
  specs = {"w": P("x"), "u": P("x"), "b": P()}
  params = tree(5, shapes=shapes)
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  tx1, tx2 = op.adamw8bit(1e-3), op.adamw8bit(1e-3)
  s1, s2 = tx1.init(params), tx2.init(sharded)
  assert s2.state1["w"].sharding.spec[0] == "x"
  p1, p2 = params, sharded
  for t in range(3):
    g = grads(70 + t, params)
    p1, s1 = jax.jit(tx1.fused_update)(g, s1, p1)
    gs = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in g.items()}
    p2, s2 = jax.jit(tx2.fused_update)(gs, s2, p2)
  assert_trees_equal(p1, p2, "params")
  for name in ("state1", "state2", "absmax1", "absmax2"):
    assert_trees_equal(getattr(s1, name), getattr(s2, name), name)


def test_adamw8bit_errors_name_it():
  with pytest.raises(ValueError, match="adamw8bit: lr must be finite and >= 0"):
    op.adamw8bit(-1.0)
  tx = op.adamw8bit()
  with pytest.raises(TypeError, match="expected the opt_state returned by adamw8bit's init"):
    tx.update(grads(0, tree(0)), op.paged_adamw8bit().init(tree(0)), tree(0))


@pytest.mark.parametrize("make", [op.paged_adamw8bit, op.adamw8bit], ids=["paged", "arrays"])
def test_a_donated_fused_step_writes_small_params_in_place(make, monkeypatch):
  # A call of at most _calls.PARAM_ALIAS_ALL_LEAVES leaves aliases every
  # param to its result; a larger one only its large params, the small ones
  # written to new buffers that XLA copies into the donated ones. Either way
  # the step's results are the same.
  from optax_paged8bit import _calls

  # bfloat16, so that a param's copy is told apart from one of a small leaf's
  # float32 moments (adamw8bit's state arrays under STATE_ALIAS_MIN_ELEMENTS).
  params = {f"s{i}": jnp.full((7, 3), 0.1 * i, jnp.bfloat16) for i in range(5)}
  params["big"] = jnp.full((256, 256), 0.5, jnp.bfloat16)
  g = jax.tree.map(lambda p: p * 0.01 + 0.001, params)
  results = {}
  for cap, copies in ((512, 0), (6, 0), (5, 5)):
    monkeypatch.setattr(_calls, "PARAM_ALIAS_ALL_LEAVES", cap)
    tx = make(1e-2)
    step = jax.jit(tx.fused_update, donate_argnums=(1, 2))
    hlo = step.lower(g, tx.init(params), params).compile().as_text()
    assert hlo.count("bf16[7,3]{1,0} copy(") == copies, cap
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(3):
      p, s = step(g, s, p)
    results[cap] = p
    # Not donated, the params passed in come out unchanged (XLA copies them
    # before the call that writes its results over them).
    p = jax.tree.map(jnp.copy, params)
    new_p, _ = jax.jit(tx.fused_update)(g, tx.init(params), p)
    assert_trees_equal(p, params, "params passed in")
    assert_trees_equal(new_p, jax.jit(tx.fused_update)(g, tx.init(params), params)[0], "again")
  assert_trees_equal(results[6], results[5], "params")
