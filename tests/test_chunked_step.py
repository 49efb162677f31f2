"""A paged step of many leaves runs as several custom calls (_calls.update_chunks):
the same bits as one call, and the state changes only when the last call
commits, so a step cut short between its calls leaves the state as it was."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from oracle import BFLOAT16
from test_functional import assert_trees_equal, grads, tree

import optax_paged8bit as op
from optax_paged8bit import _calls

# 10 leaves: 8-bit and float32-moment ones (min_8bit_size), bfloat16 and float32.
SHAPES = {f"l{i}": ((300 + 97 * i,) if i % 3 else (4, 20 + i)) for i in range(10)}
KW = dict(min_8bit_size=256, percentile_clipping=90)


def params_tree(seed=0):
  p = tree(seed, shapes=SHAPES)
  return {k: v.astype(BFLOAT16) if i % 4 == 1 else v for i, (k, v) in enumerate(p.items())}


def split(monkeypatch, one_call=4, per_call=3):
  """Steps of more than `one_call` leaves in calls of at most `per_call`."""
  monkeypatch.setattr(_calls, "UPDATE_ONE_CALL_LEAVES", one_call)
  monkeypatch.setattr(_calls, "UPDATE_CALL_LEAVES", per_call)


def make_step(tx, fused, donate=True):
  if fused:
    return jax.jit(tx.fused_update, donate_argnums=(1, 2) if donate else ())

  def optax_step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(optax_step, donate_argnums=(1, 2) if donate else ())


def run(steps, fused, **kw):
  tx = op.paged_adamw8bit(1e-3, **{**KW, **kw})
  p = params_tree()
  s = tx.init(p)
  step = make_step(tx, fused)
  for t in range(steps):
    p, s = step(grads(30 + t, p), s, p)
  return p, s


def update_calls(tx, p, fused):
  s = tx.init(p)
  text = make_step(tx, fused, donate=False).lower(grads(0, p), s, p).as_text()
  return text.count("optax_paged8bit_update")


def test_update_chunks_split_only_large_trees_into_about_equal_calls():
  assert _calls.update_chunks(0) == [0]
  assert _calls.update_chunks(_calls.UPDATE_ONE_CALL_LEAVES) == [0]
  starts = _calls.update_chunks(10000)
  sizes = np.diff([*starts, 10000])
  assert len(starts) == -(-10000 // _calls.UPDATE_CALL_LEAVES)
  assert sizes.max() <= _calls.UPDATE_CALL_LEAVES
  # Each call aliases only its large params (see _calls.PARAM_ALIAS_ALL_LEAVES).
  assert sizes.min() > _calls.PARAM_ALIAS_ALL_LEAVES
  assert _calls.UPDATE_ONE_CALL_LEAVES // 2 > _calls.PARAM_ALIAS_ALL_LEAVES


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize(
  "kw",
  [{}, dict(block_wise=False), dict(percentile_clipping=100)],
  ids=["blockwise", "whole", "no_clipping"],
)
def test_a_step_in_several_calls_is_bit_identical_to_one_call(monkeypatch, fused, kw):
  p1, s1 = run(3, fused, **kw)
  split(monkeypatch)
  tx = op.paged_adamw8bit(1e-3, **{**KW, **kw})
  assert update_calls(tx, params_tree(), fused) == 4  # leaves 0-1, 2-4, 5-6, 7-9
  p2, s2 = run(3, fused, **kw)
  assert_trees_equal(p1, p2, "params")
  assert_trees_equal(op.export_state(s1), op.export_state(s2), "state")
  assert int(s2.count) == 3
  op.release(s1)
  op.release(s2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
def test_a_step_cut_short_between_its_calls_leaves_the_state_as_it_was(monkeypatch, fused):
  split(monkeypatch)
  tx = op.paged_adamw8bit(1e-3, **KW)
  p, s = run(2, fused)
  before = op.export_state(s)
  g = grads(99, p)

  # A program that keeps only the first leaf's result: XLA drops the calls
  # whose results are unused, so the step stops after its first call.
  def first_leaf_only(g, s, p):
    if fused:
      return tx.fused_update(g, s, p)[0]["l0"]
    return tx.update(g, s, p)[0]["l0"]

  cut = jax.jit(first_leaf_only)
  compiled = cut.lower(g, s, p).compile().as_text()
  assert compiled.count('custom_call_target="optax_paged8bit_update"') == 1
  first = jax.block_until_ready(cut(g, s, p))
  # The state is where it was: same moments, and it steps on as if the cut
  # step had never run, bit for bit.
  assert_trees_equal(op.export_state(s), before, "state after the cut step")
  full = jax.jit(tx.fused_update if fused else tx.update)
  result, s_next = full(g, s, p)
  assert_trees_equal(first, result["l0"], "the first leaf's result")
  p_next = result if fused else optax.apply_updates(p, result)
  p_ref, s_ref = run(2, fused)
  p_ref, s_ref = make_step(tx, fused)(grads(99, p_ref), s_ref, p_ref)
  assert_trees_equal(p_next, p_ref, "params")
  assert_trees_equal(op.export_state(s_next), op.export_state(s_ref), "state")
  op.release(s_next)
  op.release(s_ref)


def test_two_steps_of_one_state_in_one_program_commit_one_whole_step(monkeypatch):
  # Both steps read the state at count 2; whichever commits first wins, and
  # the other fails as stale at its next call. The moments are then one whole
  # step's, never a mix of the two.
  split(monkeypatch)
  tx = op.paged_adamw8bit(1e-3, **KW)
  g1, g2 = grads(7, params_tree()), grads(8, params_tree())
  refs = []
  for g in (g1, g2):
    p, s = run(2, True)
    _, s = jax.jit(tx.fused_update)(g, s, p)
    refs.append(op.export_state(s))
  p, s = run(2, True)

  @jax.jit
  def twice(s, p):
    return tx.fused_update(g1, s, p), tx.fused_update(g2, s, p)

  with pytest.raises(Exception, match="stale optimizer state"):
    jax.block_until_ready(twice(s, p))
  with pytest.warns(op.InterruptedStepWarning):  # s is one step behind its moments
    state = op.export_state(s)
  assert int(state.count) == 3
  leaves = jax.tree.leaves((state.state1, state.state2, state.absmax1, state.absmax2))
  matches = [
    all(
      np.array_equal(a, b)
      for a, b in zip(
        leaves, jax.tree.leaves((r.state1, r.state2, r.absmax1, r.absmax2)), strict=True
      )
    )
    for r in refs
  ]
  assert sum(matches) == 1, matches


def test_a_call_with_the_wrong_staged_moments_fails_and_names_them(monkeypatch):
  split(monkeypatch)
  tx = op.paged_adamw8bit(1e-3, **KW)
  p = params_tree()
  s = tx.init(p)
  monkeypatch.setattr(
    op._layout.Layout, "arena_bytes", lambda self, lo, hi: 256 * (hi - lo) + 1, raising=True
  )
  with pytest.raises(Exception, match=r"staged moments of leaves 0\.\.2 must be uint8"):
    jax.block_until_ready(jax.jit(lambda g, s, p: tx.fused_update(g, s, p))(grads(1, p), s, p))
  monkeypatch.undo()
  # Nothing changed: the fresh state steps as usual.
  _, s = jax.jit(tx.fused_update)(grads(1, p), s, p)
  assert int(s.count) == 1
  op.release(s)
