"""paged_adamw8bit as an optax transformation: jit, chain, inject_hyperparams,
schedules, masking, partition, eval_shape, scan, pytrees, several optimizers,
stale states, accumulation, export/import."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import raises_at_runtime, settled_registry_bytes
from oracle import F32, Oracle
from test_oracle import assert_bit_equal

import optax_paged8bit as op


def tree(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "dense": {"w": jnp.asarray(rng.standard_normal((64, 80)) * 0.1, dtype)},
    "emb": jnp.asarray(rng.standard_normal((5000,)) * 0.1, dtype),
    "bias": jnp.asarray(rng.standard_normal((10,)) * 0.1, dtype),
  }


def grads_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.01, p.dtype), params)


def run(tx, params, steps, seed=100, jit=True):
  state = tx.init(params)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for t in range(steps):
    params, state = step(grads_like(params, seed + t), state, params)
  return params, state


def assert_trees_bit_equal(a, b, what="tree"):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for i, (x, y) in enumerate(zip(la, lb, strict=True)):
    assert_bit_equal(np.asarray(x), np.asarray(y), f"{what} leaf {i}")


def exported_moments(state):
  return jax.tree.leaves(op.export_state(state))


def test_positional_lr_and_defaults():
  tx = op.paged_adamw8bit(2e-4)
  params = tree()
  new, state = run(tx, params, 2)
  assert int(state.count) == 2
  assert state.layout.leaf_flags == (2, 3, 3)  # bias is float32 (10 < 4096)
  assert not np.array_equal(np.asarray(new["emb"]), np.asarray(params["emb"]))


def test_jit_donation_and_second_step_compiles_nothing():
  tx = op.paged_adamw8bit(1e-3)
  params = tree()
  state = tx.init(params)
  traces = []

  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jstep = jax.jit(step, donate_argnums=(0, 1))
  for t in range(3):
    params, state = jstep(params, state, grads_like(params, t))
  assert len(traces) == 1
  assert int(state.count) == 3


def test_steps_carry_no_jax_effect():
  # A JAX effect (ffi_call's has_side_effect) turns off jit's C++ dispatch
  # path: every call would go through Python, milliseconds per step on trees
  # of a few hundred leaves.
  tx = op.paged_adamw8bit(1e-3)
  params = tree()
  state = tx.init(params)
  grads = grads_like(params, 0)

  def optax_path(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for step in (optax_path, lambda p, s, g: tx.fused_update(g, s, p)):
    assert jax.make_jaxpr(step)(params, state, grads).effects == set()
  op.release(state)


def test_two_optimizers_same_structure_share_one_compiled_step():
  params = tree()
  tx1, tx2 = op.paged_adamw8bit(1e-3), op.paged_adamw8bit(1e-3)
  s1, s2 = tx1.init(params), tx2.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  assert int(s1.handle) == int(s2.handle)  # init is pure: both are fresh
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx1.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p1, s1 = step(params, s1, grads_like(params, 0))
  p2, s2 = step(params, s2, grads_like(params, 0))
  assert len(traces) == 1
  assert int(s1.handle) != int(s2.handle)  # each got its own slot
  assert_trees_bit_equal(p1, p2, "params")
  assert_trees_bit_equal(exported_moments(s1), exported_moments(s2), "states")


def test_chain_with_clip_equals_clipping_by_hand():
  params = tree()
  chained = optax.chain(optax.clip_by_global_norm(0.05), op.paged_adamw8bit(1e-3))
  p_chain, _ = run(chained, params, 4)
  plain = op.paged_adamw8bit(1e-3)
  clip = optax.clip_by_global_norm(0.05)
  state = plain.init(params)

  @jax.jit
  def by_hand(grads, state, p):
    g, _ = clip.update(grads, clip.init(p))
    u, state = plain.update(g, state, p)
    return optax.apply_updates(p, u), state

  p = params
  for t in range(4):
    p, state = by_hand(grads_like(p, 100 + t), state, p)
  assert_trees_bit_equal(p_chain, p, "params")


def test_inject_hyperparams_changes_lr_and_wd_without_recompiling():
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(5000) * 0.1, jnp.float32)}
  tx = optax.inject_hyperparams(op.paged_adamw8bit)(lr=1e-3, weight_decay=1e-2)
  state = tx.init(params)
  assert set(state.hyperparams) >= {"lr", "weight_decay", "min_8bit_size", "optim_bits"}
  oracle = Oracle(op.QMAP_SIGNED, op.QMAP_UNSIGNED, lr=1e-3, weight_decay=1e-2)
  oracle.init([np.asarray(params["w"])])
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  ref = [np.asarray(params["w"])]
  for t, (lr, wd) in enumerate([(1e-3, 1e-2), (5e-4, 0.0), (2e-3, 0.1)]):
    state.hyperparams["lr"] = jnp.asarray(lr, jnp.float32)
    state.hyperparams["weight_decay"] = jnp.asarray(wd, jnp.float32)
    oracle.lr, oracle.wd = F32(lr), F32(wd)
    grads = grads_like(params, t)
    current = [np.asarray(params["w"])]
    params, state = step(params, state, grads)
    ref = oracle.step([np.asarray(grads["w"])], current)
    want = current[0] + (ref[0] - current[0])  # what apply_updates computes
    assert_bit_equal(np.asarray(params["w"]), want, f"step {t}")
  assert len(traces) == 1
  assert state.inner_state.layout.min_8bit_size == 4096


def test_inject_hyperparams_jitted_init_names_every_static_argument_at_once():
  params = tree()
  tx = optax.inject_hyperparams(op.paged_adamw8bit)(lr=1e-3)
  wanted = r"static_args=\('min_8bit_size', 'percentile_clipping'\)"
  with pytest.raises(ValueError, match="min_8bit_size, percentile_clipping are traced at init"):
    jax.jit(tx.init)(params)
  with pytest.raises(ValueError, match=wanted):
    jax.jit(tx.init)(params)
  # What the message asks for is all it takes.
  static = ("min_8bit_size", "percentile_clipping")
  tx = optax.inject_hyperparams(op.paged_adamw8bit, static_args=static)(lr=1e-3)
  jitted = jax.jit(tx.init)(params)
  assert jitted.inner_state.layout == tx.init(params).inner_state.layout
  one = optax.inject_hyperparams(op.paged_adamw8bit, static_args="min_8bit_size")(lr=1e-3)
  with pytest.raises(ValueError, match=r"static_args=\('percentile_clipping',\)"):
    jax.jit(one.init)(params)


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
def test_optax_spellings_learning_rate_b1_b2(factory):
  params = tree()
  bnb, _ = run(factory(3e-3, (0.8, 0.99), 1e-8, 0.0), params, 3)
  for kwargs in (
    dict(learning_rate=3e-3, b1=0.8, b2=0.99, weight_decay=0.0),
    dict(learning_rate=3e-3, betas=(0.8, 0.99), weight_decay=0.0),
    dict(lr=3e-3, learning_rate=3e-3, betas=(0.8, 0.99), b1=0.8, weight_decay=0.0),
  ):
    got, _ = run(factory(**kwargs), params, 3)
    assert_trees_bit_equal(got, bnb, str(kwargs))
  # Neither spelling: bitsandbytes' defaults; one beta alone keeps the other's.
  default, _ = run(factory(), params, 2)
  assert_trees_bit_equal(run(factory(1e-3, (0.9, 0.999)), params, 2)[0], default, "defaults")
  only_b2, _ = run(factory(b2=0.99), params, 2)
  assert_trees_bit_equal(run(factory(betas=(0.9, 0.99)), params, 2)[0], only_b2, "b2 alone")
  name = factory.__name__
  for kwargs, message in (
    (dict(lr=1e-3, learning_rate=2e-3), "lr=0.001 and learning_rate=0.002 are two spellings"),
    (dict(lr=optax.constant_schedule(1e-3), learning_rate=1e-3), "lr=.* and learning_rate="),
    (dict(betas=(0.9, 0.99), b1=0.8), r"betas\[0\]=0.9 and b1=0.8 are two spellings"),
    (dict(betas=(0.9, 0.99), b2=0.999), r"betas\[1\]=0.99 and b2=0.999"),
    (dict(betas=(0.9,), b1=0.8), r"betas must be a pair"),
  ):
    with pytest.raises(ValueError, match=f"{name}: {message}"):
      factory(**kwargs)


def test_inject_hyperparams_learning_rate_and_b1_steer_the_step():
  """optax's names under inject_hyperparams: hyperparams['learning_rate'] and
  ['b1'] are there, and writing them (as a schedule tool does) steers the step
  exactly as that lr and beta1 given to the constructor."""
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(5000) * 0.1, jnp.float32)}
  tx = optax.inject_hyperparams(op.paged_adamw8bit)(learning_rate=1e-3, b1=0.9)
  state = tx.init(params)
  assert {"learning_rate", "b1"} <= set(state.hyperparams)
  assert "lr" not in state.hyperparams and "betas" not in state.hyperparams
  step = jax.jit(tx.update)
  ref_params = params
  ref_state = None
  for t, (lr, b1) in enumerate([(1e-3, 0.9), (4e-3, 0.9), (4e-3, 0.7)]):
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    state.hyperparams["b1"] = jnp.asarray(b1, jnp.float32)
    grads = grads_like(params, t)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    # The same step by an optimizer built with these values, over a copy of the state.
    ref_tx = op.paged_adamw8bit(lr, (b1, 0.999))
    ref_state = ref_tx.init(ref_params) if ref_state is None else ref_state
    ref_updates, ref_state = ref_tx.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    assert_trees_bit_equal(params, ref_params, f"step {t}")


def test_lr_schedule_matches_oracle_per_step():
  sched = optax.piecewise_constant_schedule(1e-3, {3: 0.5})
  params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(4500) * 0.1, jnp.float32)}
  tx = op.paged_adamw8bit(sched)
  oracle = Oracle(op.QMAP_SIGNED, op.QMAP_UNSIGNED)
  oracle.init([np.asarray(params["w"])])
  state = tx.init(params)
  for t in range(6):
    oracle.lr = F32(1e-3 if t < 3 else 5e-4)
    grads = grads_like(params, t)
    new, state = jax.jit(tx.fused_update)(grads, state, params)
    ref = oracle.step([np.asarray(grads["w"])], [np.asarray(params["w"])])
    assert_bit_equal(np.asarray(new["w"]), ref[0], f"step {t}")
    params = new


def test_mask_callable_and_prefix():
  params = tree()
  no_decay_bias = lambda p: {"dense": {"w": True}, "emb": True, "bias": False}
  s = op.paged_adamw8bit(1e-3, mask=no_decay_bias).init(params)
  assert s.layout.leaf_flags == (0, 3, 3)
  s = op.paged_adamw8bit(1e-3, mask={"dense": False, "emb": True, "bias": True}).init(params)
  assert s.layout.leaf_flags == (2, 1, 3)


def test_optax_masked_and_partition_two_handles():
  params = tree()
  labels = {"dense": {"w": "a"}, "emb": "b", "bias": "a"}
  tx = optax.partition(
    {"a": op.paged_adamw8bit(1e-3), "b": op.paged_adamw8bit(1e-3, weight_decay=0.0)}, labels
  )
  new, state = run(tx, params, 3)
  is_paged = lambda x: isinstance(x, op.PagedAdamW8bitState)
  paged = [s for s in jax.tree.leaves(state, is_leaf=is_paged) if is_paged(s)]
  assert len(paged) == 2 and int(paged[0].handle) != int(paged[1].handle)
  # Each group equals the same optimizer run on that group alone.
  alone_tx = op.paged_adamw8bit(1e-3, weight_decay=0.0)
  alone, alone_state = {"emb": params["emb"]}, alone_tx.init({"emb": params["emb"]})
  p = params
  for t in range(3):
    g = grads_like(p, 100 + t)
    u, alone_state = alone_tx.update({"emb": g["emb"]}, alone_state, alone)
    alone = optax.apply_updates(alone, u)
    p = {**p, "emb": alone["emb"]}
  assert_bit_equal(np.asarray(new["emb"]), np.asarray(alone["emb"]), "emb")
  masked = optax.masked(
    op.paged_adamw8bit(1e-3), {"dense": {"w": True}, "emb": False, "bias": True}
  )
  new_m, state_m = run(masked, params, 2)
  assert state_m.inner_state.layout.paths == ("['bias']", "['dense']['w']")
  assert not np.array_equal(np.asarray(new_m["bias"]), np.asarray(params["bias"]))


def test_eval_shape_init():
  tx = op.paged_adamw8bit(1e-3)
  shapes = jax.eval_shape(tx.init, tree())
  assert isinstance(shapes, op.PagedAdamW8bitState)
  assert shapes.count.shape == () and shapes.handle.dtype == jnp.uint32
  assert shapes.layout.shapes == ((10,), (64, 80), (5000,))


def test_scan_over_steps_equals_python_loop():
  params = tree()
  tx = op.paged_adamw8bit(1e-3, percentile_clipping=80)
  grads = [grads_like(params, 100 + t) for t in range(5)]
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)

  @jax.jit
  def train(params, state, stacked):
    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (params, state), stacked)[0]

  p_scan, s_scan = train(params, tx.init(params), stacked)
  p_loop, s_loop = run(tx, params, 5)
  assert_trees_bit_equal(p_scan, p_loop, "params")
  assert_trees_bit_equal(exported_moments(s_scan), exported_moments(s_loop), "state")


def test_nested_pytrees_with_tuples_and_none():
  rng = np.random.default_rng(3)
  params = {
    "layers": (
      {"w": jnp.asarray(rng.standard_normal((70, 70)), jnp.bfloat16), "b": None},
      [jnp.asarray(rng.standard_normal(300), jnp.float16), None],
    ),
    "head": None,
  }
  tx = op.paged_adamw8bit(1e-3, min_8bit_size=256)
  new, state = run(tx, params, 3)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert new["layers"][0]["b"] is None and new["head"] is None
  assert state.layout.paths == ("['layers'][0]['w']", "['layers'][1][0]")


def test_several_optimizers_alive_at_once_interleaved():
  pa, pb = tree(1), tree(2)
  txa, txb = op.paged_adamw8bit(1e-3), op.paged_adamw8bit(3e-4, weight_decay=0.0)
  sa, sb = txa.init(pa), txb.init(pb)
  for t in range(3):
    ua, sa = txa.update(grads_like(pa, 100 + t), sa, pa)
    ub, sb = txb.update(grads_like(pb, 100 + t), sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  ref_a, _ = run(op.paged_adamw8bit(1e-3), tree(1), 3, jit=False)
  ref_b, _ = run(op.paged_adamw8bit(3e-4, weight_decay=0.0), tree(2), 3, jit=False)
  assert_trees_bit_equal(pa, ref_a, "a")
  assert_trees_bit_equal(pb, ref_b, "b")


# -- stale states and accumulation ---------------------------------------------


def test_reusing_an_old_state_fails_and_keeps_the_slot_intact():
  tx = op.paged_adamw8bit(1e-3)
  params = tree()
  g = grads_like(params, 0)
  _, s1 = tx.update(g, tx.init(params), params)
  _, s2 = tx.update(g, s1, params)
  before = exported_moments(s2)
  with raises_at_runtime(r"stale optimizer state.*count 1.*accumulate_gradients"):
    jax.block_until_ready(tx.update(g, s1, params))
  assert_trees_bit_equal(exported_moments(s2), before, "state after the failed call")
  _, s3 = tx.update(g, s2, params)  # the current state still works
  assert int(s3.count) == 3


def test_a_fresh_state_is_a_value_and_can_be_used_twice():
  # init is pure: its state holds no moments yet, so two updates of it start
  # two independent states, exactly alike.
  tx = op.paged_adamw8bit(1e-3)
  params = tree()
  s0 = tx.init(params)
  g = grads_like(params, 0)
  u1, s1 = tx.update(g, s0, params)
  u2, s2 = tx.update(g, s0, params)
  assert int(s1.handle) != int(s2.handle)
  assert_trees_bit_equal(u1, u2, "updates")
  assert_trees_bit_equal(exported_moments(s1), exported_moments(s2), "states")


def test_optax_multisteps_is_refused_before_any_update():
  tx = optax.MultiSteps(op.paged_adamw8bit(1e-3), every_k_schedule=2)
  params = tree()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"optax.MultiSteps.*accumulate_gradients"):
    tx.update(grads_like(params, 0), state, params)


def test_apply_if_finite_skips_a_nan_step_and_gives_up_after_its_limit():
  # optax.apply_if_finite runs the inner update in a lax.cond, so a rejected
  # step never reaches the paged state: it steps on as if the step never came.
  params = tree()
  tx = optax.apply_if_finite(op.paged_adamw8bit(1e-3), max_consecutive_errors=1)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  state = tx.init(params)
  bad = grads_like(params, 101)
  bad["emb"] = bad["emb"].at[7].set(jnp.nan)  # an 8-bit leaf
  seen = []
  for g in (grads_like(params, 100), bad, grads_like(params, 102), bad, bad):
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    seen.append((int(state.notfinite_count), int(state.inner_state.count)))
  # Rejected: the first bad step; the second in a row exceeds the limit and
  # the inner update runs (its NaN element resets its moments, keeps its param).
  assert seen == [(0, 1), (1, 1), (0, 2), (1, 2), (2, 3)]
  ref_tx = op.paged_adamw8bit(1e-3)
  ref_step = jax.jit(ref_tx.update)
  ref_params, ref_state = tree(), ref_tx.init(tree())
  for g in (grads_like(ref_params, 100), grads_like(ref_params, 102), bad):
    u, ref_state = ref_step(g, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, u)
  assert_trees_bit_equal(params, ref_params, "params")
  assert_trees_bit_equal(exported_moments(state.inner_state), exported_moments(ref_state), "state")


def test_accumulate_gradients_matches_accumulating_by_hand():
  params = tree(dtype=jnp.bfloat16)
  k = 3
  tx = op.accumulate_gradients(op.paged_adamw8bit(1e-3), k)
  state = tx.init(params)
  step = jax.jit(tx.update)
  p = params
  micro = [grads_like(params, 200 + i) for i in range(2 * k)]
  for i, g in enumerate(micro):
    u, state = step(g, state, p)
    if (i + 1) % k:
      assert all(not np.any(np.asarray(x, np.float32)) for x in jax.tree.leaves(u))
    p = optax.apply_updates(p, u)
  ref_tx = op.paged_adamw8bit(1e-3)
  ref_state = ref_tx.init(params)
  q = params
  for j in range(2):
    group = micro[j * k : (j + 1) * k]
    mean = jax.tree.map(
      lambda *g: (sum(x.astype(jnp.float32) for x in g) / k).astype(g[0].dtype), *group
    )
    u, ref_state = ref_tx.update(mean, ref_state, q)
    q = optax.apply_updates(q, u)
  assert_trees_bit_equal(p, q, "params")
  assert int(state.inner_state.count) == 2


# -- export / import -------------------------------------------------------------


def test_export_import_resume_is_bit_identical():
  params = tree()
  kw = dict(percentile_clipping=90)
  full_params, full_state = run(op.paged_adamw8bit(1e-3, **kw), params, 8)
  tx = op.paged_adamw8bit(1e-3, **kw)
  half_params, half_state = run(tx, params, 4)
  saved = jax.tree.map(np.asarray, op.export_state(half_state))  # to host, like a checkpoint
  op.release(half_state)
  tx2 = op.paged_adamw8bit(1e-3, **kw)
  state = op.import_state(tx2.init(half_params), saved)
  assert int(state.count) == 4
  p = half_params
  for t in range(4, 8):
    u, state = jax.jit(tx2.update)(grads_like(p, 100 + t), state, p)
    p = optax.apply_updates(p, u)
  assert_trees_bit_equal(p, full_params, "params")
  assert_trees_bit_equal(exported_moments(state), exported_moments(full_state), "state")


def test_export_of_a_fresh_state_is_zeros_with_bnb_names():
  tx = op.paged_adamw8bit(1e-3)
  params = {"w": jnp.zeros((8, 512)), "v": jnp.zeros((300,))}
  exported = op.export_state(tx.init(params))
  assert exported.state1["w"].dtype == jnp.uint8 and exported.state1["w"].shape == (8, 512)
  assert exported.absmax1["w"].shape == (8, 2)  # last axis divided by 256
  assert exported.state1["v"].dtype == jnp.float32 and exported.absmax1["v"] is None
  moments = (exported.state1, exported.state2, exported.absmax1, exported.absmax2)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(moments))
  np.testing.assert_array_equal(np.asarray(exported.qmap1), op.QMAP_SIGNED)


def test_export_inside_chain_and_release():
  params = tree()
  tx = optax.chain(optax.clip(1.0), op.paged_adamw8bit(1e-3))
  _, state = run(tx, params, 2)
  exported = op.export_state(state)
  assert isinstance(exported[1], op.Adam8bitState)
  assert op.state_nbytes(state) > 0
  before = settled_registry_bytes()
  freed = op.release(state)
  assert freed == state[1].layout.state_nbytes() and op._ffi.total_bytes() == before - freed
  with raises_at_runtime("was released"):
    jax.block_until_ready(tx.update(grads_like(params, 0), state, params))
  assert op.release(state) == 0  # releasing twice is a no-op
