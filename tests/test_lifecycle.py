"""A paged state's life as JAX and Flax users live it: a sweep over one jitted
create_train_state, jax.vmap and eval_shape of init, an interrupted or failed
step, a schedule that returns a value a step cannot run with, injected
layout arguments changed after init, importing from the repository root."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import settled_registry_bytes
from flax.training import train_state
from test_oracle import assert_bit_equal

import optax_paged8bit as op

PARAMS = {"w": jnp.full((64, 512), 0.5), "b": jnp.zeros(10)}


def grads(i, params=PARAMS):
  return jax.tree.map(lambda p: jnp.full(p.shape, 0.01 * (i + 1), p.dtype), params)


def assert_trees_bit_equal(a, b, what):
  for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
    assert_bit_equal(np.asarray(x), np.asarray(y), f"{what} leaf {i}")


# -- fresh states, however init runs ------------------------------------------------


def test_a_sweep_over_one_jitted_create_train_state_just_works():
  def create_train_state(rng, lr):
    params = jax.tree.map(lambda p: p + jax.random.normal(rng, p.shape) * 0.01, PARAMS)
    return train_state.TrainState.create(
      apply_fn=None, params=params, tx=op.paged_adamw8bit(lr, weight_decay=0.0)
    )

  @jax.jit
  def train_step(state, i):
    g = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype) * (i + 1), state.params)
    return state.apply_gradients(grads=g)

  create = jax.jit(create_train_state, static_argnums=1)
  before = settled_registry_bytes()
  finals = []
  for run, lr in enumerate([1e-3, 1e-3, 2e-3]):
    state = create(jax.random.key(0), lr)
    for i in range(3):
      state = train_step(state, i)
    finals.append(state.params)
    if run == 1:
      op.release(state)  # releasing one run's state does not disturb the next
  assert_trees_bit_equal(finals[0], finals[1], "two runs of the same sweep point")
  assert not np.array_equal(np.asarray(finals[0]["w"]), np.asarray(finals[2]["w"]))
  del state
  assert settled_registry_bytes() == before


def test_states_of_vmapped_and_eval_shape_init_train_on_their_own():
  tx = op.paged_adamw8bit(1e-3)
  batched = jax.vmap(tx.init)(jax.tree.map(lambda p: jnp.stack([p, p]), PARAMS))
  members = [jax.tree.map(lambda x, i=i: x[i], batched) for i in range(2)]
  eager = tx.init(PARAMS)
  shapes = jax.eval_shape(tx.init, PARAMS)
  assert jax.tree.structure(shapes) == jax.tree.structure(eager)
  from_shapes = jax.tree.map(lambda s, x: jnp.asarray(x, s.dtype), shapes, eager)
  outs = []
  for state in (*members, eager, from_shapes):
    p = PARAMS
    for i in range(2):
      p, state = tx.fused_update(grads(i), state, p)
    outs.append((p, op.export_state(state)))
  handles = {int(s.handle) for s in (members[0], members[1])}
  assert len(handles) == 1  # the same fresh token: a value, not a slot
  for p, e in outs[1:]:
    assert_trees_bit_equal(p, outs[0][0], "params")
    assert_trees_bit_equal(e, outs[0][1], "states")
  op.release([o[1] for o in outs])


def test_collect_waits_for_the_steps_of_a_dropped_state():
  tx = op.paged_adamw8bit(1e-3)
  before = settled_registry_bytes()
  step = jax.jit(tx.fused_update)
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(30):  # dispatched, not awaited
    params, state = step(grads(i % 3), state, params)
  nbytes = state.layout.state_nbytes()
  del state, params  # dropped while its steps may still run
  assert op.collect() == nbytes
  assert op._ffi.total_bytes() == before


# -- vmap ---------------------------------------------------------------------------


def test_adamw8bit_under_vmap_equals_separate_runs():
  tx = op.adamw8bit(1e-3, min_8bit_size=100)
  members = [jax.tree.map(lambda p, k=k: p * (k + 1), PARAMS) for k in range(3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
  states = jax.vmap(tx.init)(stacked)
  step = jax.jit(jax.vmap(tx.fused_update))
  p = stacked
  for i in range(3):
    g = jax.tree.map(lambda x, i=i: x * (0.01 * (i + 1)), stacked)
    p, states = step(g, states, p)
  for k, member in enumerate(members):
    s, q = tx.init(member), member
    for i in range(3):
      q, s = tx.fused_update(jax.tree.map(lambda x, i=i: x * (0.01 * (i + 1)), member), s, q)
    assert_trees_bit_equal(jax.tree.map(lambda x, k=k: x[k], p), q, f"member {k} params")
    assert_trees_bit_equal(jax.tree.map(lambda x, k=k: x[k], states), s, f"member {k} state")


@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused_update"])
def test_paged_under_vmap_names_adamw8bit(fused):
  tx = op.paged_adamw8bit(1e-3)
  stacked = jax.tree.map(lambda p: jnp.stack([p, p]), PARAMS)
  states = jax.vmap(tx.init)(stacked)
  step = tx.fused_update if fused else tx.update
  with pytest.raises(ValueError, match=r"cannot run under jax.vmap.*optax_paged8bit.adamw8bit"):
    jax.vmap(step)(stacked, states, stacked)


# -- interrupted and failed steps ---------------------------------------------------


def test_an_interrupted_step_keeps_the_moments_and_the_state_last_held_exports_them():
  tx = op.paged_adamw8bit(1e-3)
  step = jax.jit(tx.fused_update)
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(3):
    params, state = step(grads(i), state, params)
  # Ctrl-C between dispatch and assignment: the step ran, its results never
  # reached Python (simulated by dropping them).
  dropped = step(grads(3), state, params)
  jax.block_until_ready(dropped)
  del dropped
  # The same step, as a run without interruption would have it.
  ref_tx = op.paged_adamw8bit(1e-3)
  p2, s2 = PARAMS, ref_tx.init(PARAMS)
  for i in range(4):
    p2, s2 = jax.jit(ref_tx.fused_update)(grads(i), s2, p2)
  with pytest.warns(op.InterruptedStepWarning, match=r"count is 3 but its moments are at step 4"):
    exported = op.export_state(state)
  assert int(exported.count) == 4
  assert_trees_bit_equal(exported, op.export_state(s2), "the moments as they are")
  # Going on in this process: import what was exported.
  resumed = op.import_state(tx.init(params), exported)
  _, after = tx.fused_update(grads(4), resumed, params)
  assert int(after.count) == 5
  # The stale error of the old object says how.
  with pytest.raises(ValueError, match=r"result never reached Python.*import_state"):
    tx.fused_update(grads(3), state, params)
  op.release((after, s2))


def test_a_failed_step_keeps_the_moments_and_save_checkpoint_stores_them(tmp_path):
  tx = op.paged_adamw8bit(1e-3)

  def fail(count):
    if int(count) == 3:
      raise RuntimeError("a failure later in the step")

  @jax.jit
  def step(params, state, g):
    params, state = tx.fused_update(g, state, params)
    jax.debug.callback(fail, state.count)
    return params, state

  params, state = PARAMS, tx.init(PARAMS)
  for i in range(2):
    params, state = step(params, state, grads(i))
  with pytest.raises(Exception, match="a failure later in the step"):
    jax.block_until_ready(step(params, state, grads(2)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    op.save_checkpoint(str(tmp_path / "ckpt"), {"params": params, "opt_state": state})
  assert any(issubclass(w.category, op.InterruptedStepWarning) for w in caught)
  restored = op.restore_checkpoint(
    str(tmp_path / "ckpt"), {"params": PARAMS, "opt_state": tx.init(PARAMS)}
  )
  assert int(restored["opt_state"].count) == 3
  assert_trees_bit_equal(restored["params"], params, "params")


# -- a schedule's value a step cannot run with, injected layout arguments -----------


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
@pytest.mark.parametrize("bad", [float("nan"), -1e-3, float("inf")], ids=["nan", "neg", "inf"])
def test_a_schedule_value_a_step_cannot_run_with(factory, bad):
  schedule = lambda count: jnp.where(count == 1, bad, 1e-3)
  tx = factory(schedule, min_8bit_size=100)
  params, state = tx.fused_update(grads(0), tx.init(PARAMS), PARAMS)  # count 0: lr 1e-3
  # Eager: the schedule's value is concrete, so the step raises, naming it.
  with pytest.raises(ValueError, match=r"lr schedule returned .* at count 1; it must be finite"):
    tx.fused_update(grads(1), state, params)
  # Jitted: the step is skipped (params and moments stay) and counted.
  before = op.export_state(state)
  new_params, new_state = jax.jit(tx.fused_update)(grads(1), state, params)
  assert int(new_state.count) == 2
  assert_trees_bit_equal(new_params, params, "params of the skipped step")
  after = op.export_state(new_state)
  for name in ("state1", "state2", "absmax1", "absmax2"):
    assert_trees_bit_equal(getattr(after, name), getattr(before, name), name)
  params, new_state = jax.jit(tx.fused_update)(grads(2), new_state, new_params)  # runs again
  assert not np.array_equal(np.asarray(params["w"]), np.asarray(new_params["w"]))


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
@pytest.mark.parametrize(
  ("name", "value", "match"),
  [
    (
      "min_8bit_size",
      16,
      "min_8bit_size is 16 in this update but the opt_state was built with 4096",
    ),
    ("percentile_clipping", 50, "percentile_clipping is 50 in this update .* built with 100"),
    ("optim_bits", 8, "optim_bits must be 32, got 8"),
  ],
)
def test_changing_an_injected_layout_argument_after_init_raises(factory, name, value, match):
  tx = optax.inject_hyperparams(factory)(lr=1e-3)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  _, state = step(grads(0), state, PARAMS)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  with pytest.raises(Exception, match=match):
    jax.block_until_ready(step(grads(1), state, PARAMS))
  with pytest.raises(ValueError, match=f"{name}"):  # eagerly, before anything runs
    tx.update(grads(1), state, PARAMS)


# -- the repository root ------------------------------------------------------------


def test_import_from_the_repository_root():
  """With the README's editable install the repository root imports the
  package; with a plain install the source folder shadows it there, and the
  error says what to do."""
  root = pathlib.Path(__file__).resolve().parent.parent
  editable = pathlib.Path(op.__file__).resolve().is_relative_to(root)
  done = subprocess.run(
    [sys.executable, "-c", "import optax_paged8bit as op; print(op.paged_adamw8bit.__name__)"],
    cwd=root,
    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  if editable:
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "paged_adamw8bit"
  else:
    assert done.returncode != 0
    assert "shadows the installed package" in done.stderr, done.stderr[-2000:]
    assert 'pip install -e ".[examples,test]"' in done.stderr, done.stderr[-2000:]
