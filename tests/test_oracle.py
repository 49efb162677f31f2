"""The custom call against the NumPy oracle of SPEC 3: codes and scales equal,
params bit-equal, over 20+ steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracle import BFLOAT16, Oracle

import optax_paged8bit as op

SHAPES = {
  "a_vec4097": (4097,),
  "b_vec100000": (100000,),
  "c_mat512": (512, 512),
  "d_mat2048x128": (2048, 128),
  "e_small": (3, 100),
}
SMALL_SHAPES = {"a_vec4097": (4097,), "b_mat": (40, 300), "c_small": (3, 100)}
DTYPES = {"float32": np.float32, "bfloat16": BFLOAT16, "float16": np.float16}
STEPS = 21
NONFINITE_STEPS = (5, 12)


def make_tree(shapes, dtype, seed):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * 0.1).astype(dtype) for k, s in shapes.items()}


# Per-block grad magnitudes that reach every branch of the quantizer: zero
# blocks (zero scales), subnormal and tiny scales, ordinary ones, and second
# moments that overflow to infinity.
EXTREME_MAGNITUDES = np.array([0.0, 1e-40, 1e-30, 1e-20, 1e-3, 1.0, 1e15, 1e25], np.float32)


def extreme(g: np.ndarray, rng) -> np.ndarray:
  """Scales each 256-element block of g by EXTREME_MAGNITUDES in turn, and puts
  an outlier 1e30 times its block's size into every fourth block."""
  flat = g.reshape(-1)
  for b in range(-(-flat.size // 256)):
    block = flat[256 * b : 256 * (b + 1)]
    block *= EXTREME_MAGNITUDES[b % len(EXTREME_MAGNITUDES)]
    if b % 4 == 3:
      block[rng.integers(block.size)] *= np.float32(1e30)
  return g


# Finite grads whose square (times 1 - b2) overflows float32, from just past
# the edge up to float32's largest: SPEC 3.2/3.3's guard resets the element.
SPIKES = np.array([1e19, 3e19, 1e20, 6e20, 1e25, 1e30, 3.4e38], np.float32)
SPIKE_STEPS = (4, 9)
SPIKED = {}  # leaf -> the flat indices of its spikes


def spike(g: np.ndarray, k: str) -> np.ndarray:
  """Puts SPIKES (alternating in sign) at fixed elements of g."""
  flat = g.reshape(-1)
  idx = np.arange(len(SPIKES)) * (flat.size // len(SPIKES))
  flat[idx] = SPIKES * np.where(np.arange(len(SPIKES)) % 2, -1, 1).astype(np.float32)
  SPIKED[k] = idx
  return g


def grads_for(shapes, dtype, rng, step, magnitudes=False, spikes=False):
  grads = {}
  for k, s in shapes.items():
    g = rng.standard_normal(s).astype(np.float32) * np.float32(0.01)
    if magnitudes:
      with np.errstate(over="ignore"):
        g = extreme(g, rng)
    if spikes and step in SPIKE_STEPS:
      g = spike(g, k)
    if step in NONFINITE_STEPS:
      flat = g.reshape(-1)
      idx = rng.choice(flat.size, size=min(7, flat.size), replace=False)
      flat[idx[0::3]] = np.nan
      flat[idx[1::3]] = np.inf
      flat[idx[2::3]] = -np.inf
    grads[k] = g.astype(dtype)
  return grads


def bits(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_bit_equal(got, want, what):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, what
  nan = np.isnan(got.astype(np.float32)) & np.isnan(want.astype(np.float32))
  bad = (bits(got) != bits(want)) & ~nan
  if bad.any():
    i = np.flatnonzero(bad)[:5]
    raise AssertionError(
      f"{what}: {bad.sum()} of {bad.size} differ, e.g. at {i}: got {got.reshape(-1)[i]} "
      f"want {want.reshape(-1)[i]}"
    )


def exported_leaves(exported, name):
  """One field of an exported state, leaf by leaf (None for a float32 leaf's scales)."""
  return exported.layout.treedef.flatten_up_to(getattr(exported, name))


def compare_state(exported, oracle, step):
  fields = {
    name: exported_leaves(exported, name) for name in ("state1", "state2", "absmax1", "absmax2")
  }
  for k, ref in enumerate(oracle.leaves):
    where = f"step {step} leaf {k}"
    names = ("state1", "state2", "absmax1", "absmax2") if ref["is_8bit"] else ("state1", "state2")
    for name in names:
      got = np.asarray(fields[name][k]).reshape(-1)
      assert_bit_equal(got, ref[name], f"{where} {name}")
  if oracle.percentile < 100:
    rings = np.stack([leaf["ring"] for leaf in oracle.leaves])
    assert_bit_equal(np.asarray(exported.gnorm_vec), rings, f"step {step} gnorm_vec")


def run_against_oracle(
  shapes, dtype, *, fused=True, seed=0, magnitudes=False, spikes=False, after_step=None, **kwargs
):
  lr, wd = kwargs.pop("lr", 1e-3), kwargs.pop("weight_decay", 1e-2)
  tx = op.paged_adamw8bit(lr, weight_decay=wd, **kwargs)  # mask, args go to tx only
  bits_ = 32 if (kwargs.get("args") or {}).get("optim_bits") == 32 else 8
  kwargs.pop("args", None)
  mask = kwargs.pop("mask", None)
  oracle = Oracle(
    op.QMAP_SIGNED,
    op.QMAP_UNSIGNED,
    lr=lr,
    weight_decay=wd,
    optim_bits=bits_,
    decay_mask=None if mask is None else jax.tree.leaves(mask),
    **kwargs,
  )
  params = make_tree(shapes, dtype, seed)
  oracle.init(jax.tree.leaves(params))
  ref_params = jax.tree.leaves(params)
  state = tx.init(params)
  params = jax.tree.map(jnp.asarray, params)

  @jax.jit
  def fused_step(grads, state, params):
    return tx.fused_update(grads, state, params)

  @jax.jit
  def optax_step(grads, state, params):
    return tx.update(grads, state, params)

  rng = np.random.default_rng(seed + 1)
  for t in range(1, STEPS + 1):
    grads = grads_for(shapes, dtype, rng, t, magnitudes, spikes)
    if fused:
      # The fused step is the algorithm itself: params bit-equal, no re-sync.
      params, state = fused_step(grads, state, params)
      ref_params = oracle.step(jax.tree.leaves(grads), ref_params)
      for k, (got, want) in enumerate(zip(jax.tree.leaves(params), ref_params, strict=True)):
        assert_bit_equal(got, want, f"step {t} leaf {k} params")
    else:
      # The optax path returns u = T(p_new - p) exactly; apply_updates then
      # adds it (the oracle steps from the same params).
      current = [np.asarray(p) for p in jax.tree.leaves(params)]
      updates, state = optax_step(grads, state, params)
      ref_new = oracle.step(jax.tree.leaves(grads), current)
      for k, (u, p, want) in enumerate(
        zip(jax.tree.leaves(updates), current, ref_new, strict=True)
      ):
        want_u = (want.astype(np.float32) - p.astype(np.float32)).astype(p.dtype)
        assert_bit_equal(u, want_u, f"step {t} leaf {k} updates")
      params = optax.apply_updates(params, updates)
    if t % 7 == 0 or t == STEPS or (spikes and t in SPIKE_STEPS):
      compare_state(op.export_state(state), oracle, t)
    if after_step is not None:
      after_step(t, params, state)
  op.release(state)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_full_shapes_wd_clipping_nonfinite(dtype):
  run_against_oracle(SHAPES, DTYPES[dtype], percentile_clipping=90)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_shapes_no_wd_no_clipping(dtype):
  run_against_oracle(SHAPES, DTYPES[dtype], weight_decay=0.0, percentile_clipping=100, seed=3)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_not_block_wise(dtype):
  run_against_oracle(SMALL_SHAPES, DTYPES[dtype], block_wise=False, percentile_clipping=95)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_optax_path_updates(dtype):
  run_against_oracle(SMALL_SHAPES, DTYPES[dtype], fused=False, percentile_clipping=50, seed=5)


def test_optax_path_full_shapes():
  run_against_oracle(SHAPES, np.float32, fused=False, seed=6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float32_states_via_args(dtype):
  run_against_oracle(SMALL_SHAPES, DTYPES[dtype], args={"optim_bits": 32}, seed=7)


def test_min_8bit_size_zero_and_decay_mask():
  shapes = {"a": (5,), "b": (300,), "c": (4097,)}
  mask = {"a": True, "b": False, "c": False}
  run_against_oracle(shapes, np.float32, min_8bit_size=0, mask=mask, seed=9)


@pytest.mark.parametrize("block_wise", [True, False], ids=["blocks", "whole"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
def test_extreme_magnitudes(fused, block_wise):
  # Subnormals are kept (XLA flushes them on its CPU threads; the update turns
  # that off), and a NaN moment does not enter a block's max.
  shapes = {"a": (64, 256), "b": (40, 300), "c": (3, 100)}
  run_against_oracle(
    shapes, np.float32, fused=fused, magnitudes=True, seed=11, block_wise=block_wise
  )


@pytest.mark.parametrize("kind", ["8bit", "float32", "clipped", "whole"])
def test_finite_spikes_reset_their_elements_which_then_train_on(kind):
  """A finite grad of 1e19 to 3.4e38 overflows its element's second moment:
  the element's moments reset and its param stays (bit-equal to the oracle),
  the state stays finite (so that it can be saved and restored), and the
  element takes Adam steps again from the next step."""
  kwargs = {
    "8bit": {},
    "float32": {"args": {"optim_bits": 32}},
    "clipped": {"percentile_clipping": 5},
    "whole": {"block_wise": False},
  }[kind]
  shapes = {"a": (8, 1024), "b": (3, 700)}
  seen = {}

  def after_step(t, params, state):
    exported = op.export_state(state)
    for name in ("state1", "state2", "absmax1", "absmax2", "gnorm_vec"):
      for x in jax.tree.leaves(getattr(exported, name)):
        assert np.isfinite(np.asarray(x, np.float32)).all(), f"step {t} {name}"
    flat = {k: np.asarray(p).reshape(-1) for k, p in params.items()}
    if t == SPIKE_STEPS[-1] + 1 or t == STEPS:
      seen[t] = {k: flat[k][SPIKED[k]].copy() for k in shapes}

  run_against_oracle(
    shapes,
    np.float32,
    spikes=True,
    after_step=after_step,
    seed=13,
    **{"percentile_clipping": 100, **kwargs},
  )
  for k in shapes:  # the spiked elements move again after the spikes
    assert (seen[SPIKE_STEPS[-1] + 1][k] != seen[STEPS][k]).all(), k
