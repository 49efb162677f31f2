"""The layout's sharding (_layout.py): sharded updates under jax.jit with
NamedSharding params, on 4 and 8 fake CPU devices (conftest.py asks XLA for 8)."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from conftest import TEST_PLATFORM, mesh_devices, settled_registry_bytes
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_oracle import assert_bit_equal

import optax_paged8bit as op
from optax_paged8bit import _calls


def mesh(shape, names):
  devices = mesh_devices(int(np.prod(shape)))
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), names)


def make(shapes, seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: (rng.standard_normal(s) * 0.1).astype(dtype) for k, s in shapes.items()}


def place(tree, m, specs):
  return {k: jax.device_put(v, NamedSharding(m, specs[k])) for k, v in tree.items()}


def run(tx, params, grads_list, fused):
  state = tx.init(params)
  if fused:
    step = jax.jit(tx.fused_update)
  else:

    @jax.jit
    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

  for grads in grads_list:
    params, state = step(grads, state, params)
  return params, state


def assert_same(a_params, a_state, b_params, b_state):
  for k in a_params:
    assert_bit_equal(np.asarray(b_params[k]), np.asarray(a_params[k]), f"params {k}")
  ea, eb = op.export_state(a_state), op.export_state(b_state)
  for i, (x, y) in enumerate(zip(jax.tree.leaves(ea), jax.tree.leaves(eb), strict=True)):
    assert_bit_equal(np.asarray(y), np.asarray(x), f"state leaf {i}")


ALIGNED = {
  "rows": ((1024, 512), P("x")),  # first axis, local (256, 512)
  "cols": ((512, 2048), P(None, "x")),  # last axis, local (512, 512) or (512, 256)
  "flat": ((8192,), P("x")),  # 1-D, local 2048
  "bias": ((300,), P()),  # replicated, float32 moments
  "emb": ((64, 80), P()),  # replicated, 8-bit
}
ALIGNED_SHAPES = {k: s for k, (s, _) in ALIGNED.items()}
ALIGNED_SPECS = {k: spec for k, (_, spec) in ALIGNED.items()}


def aligned_on(m, seed, grad_seeds):
  """ALIGNED params made from `seed` and one grads tree per grad seed, placed on mesh m."""
  params = place(make(ALIGNED_SHAPES, seed), m, ALIGNED_SPECS)
  return params, [place(make(ALIGNED_SHAPES, g), m, ALIGNED_SPECS) for g in grad_seeds]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_aligned_shards_bit_identical_to_one_device(devices, fused):
  m = mesh((devices,), ("x",))
  shapes, specs = ALIGNED_SHAPES, ALIGNED_SPECS
  params = make(shapes, 0)
  grads = [make(shapes, 10 + t) for t in range(3)]
  kw = dict(min_8bit_size=1000, weight_decay=1e-2)
  p1, s1 = run(op.paged_adamw8bit(1e-3, **kw), params, grads, fused)
  sharded_grads = [place(g, m, specs) for g in grads]
  p2, s2 = run(op.paged_adamw8bit(1e-3, **kw), place(params, m, specs), sharded_grads, fused)
  assert s2.layout.mesh == m
  # One registry slot per device of the mesh; on GPUs, in managed memory homed there.
  slots = op.slot_info(s2)
  assert sorted(i["device"] for i in slots) == sorted(d.id for d in m.devices.flat)
  assert {i["platform"] for i in slots} == {"cuda" if TEST_PLATFORM == "gpu" else "cpu"}
  if TEST_PLATFORM == "gpu":
    assert all(i["bytes_on_device"] > 0 and i["bytes_on_host"] == 0 for i in slots), slots
  for k in shapes:
    assert p2[k].sharding.spec == specs[k] or specs[k] == P()
  assert_same(p1, s1, p2, s2)
  op.release(s1)
  op.release(s2)


def test_two_dimensional_mesh_and_mixed_tree():
  m = mesh((2, 4), ("data", "model"))
  shapes = {"w": (1024, 2048), "v": (2048, 512), "u": (4096,), "b": (512,)}
  specs = {"w": P("data", "model"), "v": P("model", None), "u": P(("data", "model")), "b": P()}
  params = make(shapes, 1)
  grads = [make(shapes, 20 + t) for t in range(2)]
  p1, s1 = run(op.paged_adamw8bit(1e-3), params, grads, True)
  p2, s2 = run(
    op.paged_adamw8bit(1e-3), place(params, m, specs), [place(g, m, specs) for g in grads], True
  )
  assert_same(p1, s1, p2, s2)
  exported = op.export_state(s2)
  assert exported.absmax1["w"].shape == (1024, 8)
  assert exported.state1["w"].sharding.spec == P("data", "model")
  op.release(s1)
  op.release(s2)


def test_compiled_step_gathers_nothing():
  m = mesh((4,), ("x",))
  params, _ = aligned_on(m, 0, ())
  tx = op.paged_adamw8bit(1e-3, min_8bit_size=1000)
  state = tx.init(params)

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  text = jax.jit(step).lower(params, state, params).compile().as_text()
  assert "all-gather" not in text and "all-to-all" not in text
  assert "optax_paged8bit_update" in text


def test_misaligned_shards_update_each_shard_on_its_own():
  """Shard boundaries off the 256-element blocks: still correct, each device
  quantizes its own shard (results equal one optimizer per shard)."""
  m = mesh((4,), ("x",))
  params = make({"w": (1000, 300)}, 2)
  grads = make({"w": (1000, 300)}, 3)
  p2, s2 = run(
    op.paged_adamw8bit(1e-3),
    place(params, m, {"w": P("x")}),
    [place(grads, m, {"w": P("x")})],
    True,
  )
  for d in range(4):
    rows = slice(250 * d, 250 * (d + 1))
    pd, sd = run(
      op.paged_adamw8bit(1e-3), {"w": params["w"][rows]}, [{"w": grads["w"][rows]}], True
    )
    assert_bit_equal(np.asarray(p2["w"])[rows], np.asarray(pd["w"]), f"shard {d}")
    op.release(sd)
  op.release(s2)


def test_sharded_export_import_resume():
  m = mesh((4,), ("x",))
  params, grads = aligned_on(m, 4, [30 + t for t in range(4)])
  full_p, full_s = run(op.paged_adamw8bit(1e-3), params, grads, True)
  half_p, half_s = run(op.paged_adamw8bit(1e-3), params, grads[:2], True)
  saved = op.export_state(half_s)
  assert saved.state1["rows"].sharding.spec[0] == "x"
  op.release(half_s)
  tx = op.paged_adamw8bit(1e-3)
  state = op.import_state(tx.init(half_p), saved)
  step = jax.jit(tx.fused_update)
  p = half_p
  for g in grads[2:]:
    p, state = step(g, state, p)
  assert_same(full_p, full_s, p, state)
  op.release(full_s)
  op.release(state)


@pytest.mark.parametrize("sharded", [True, False], ids=["mesh", "one-device"])
def test_export_inside_jit_equals_the_eager_export(sharded):
  """Eagerly, export_state splits the call's two flat buffers on the host;
  traced inside jit, in the program. Both give the same arrays, placed alike."""
  m = mesh((4,), ("x",))
  params, grads = aligned_on(m, 6, [60, 61])
  if not sharded:
    params, grads = make(ALIGNED_SHAPES, 6), [make(ALIGNED_SHAPES, g) for g in (60, 61)]
  _, state = run(op.paged_adamw8bit(1e-3, min_8bit_size=1000), params, grads, True)
  eager = op.export_state(state)
  traced = jax.jit(op.export_state)(state)
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
    assert_bit_equal(np.asarray(y), np.asarray(x), "exported array")
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)
  op.release(state)


def growing_grads(shapes, n):
  """Grads whose norm grows step by step, so that percentile clipping scales
  them down from the second step on."""
  return [{k: v * (1 + 2 * t) for k, v in make(shapes, 40 + t).items()} for t in range(n)]


@pytest.mark.parametrize("transform", ["paged", "adamw8bit"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_percentile_clipping_with_aligned_shards_bit_identical_to_one_device(
  devices, fused, transform
):
  m = mesh((devices,), ("x",))
  shapes, specs = ALIGNED_SHAPES, ALIGNED_SPECS
  params, grads = make(shapes, 0), growing_grads(shapes, 4)
  make_tx = op.paged_adamw8bit if transform == "paged" else op.adamw8bit
  kw = dict(min_8bit_size=1000, weight_decay=1e-2, percentile_clipping=80)
  p1, s1 = run(make_tx(1e-3, **kw), params, grads, fused)
  sharded_grads = [place(g, m, specs) for g in grads]
  p2, s2 = run(make_tx(1e-3, **kw), place(params, m, specs), sharded_grads, fused)
  assert_same(p1, s1, p2, s2)
  assert_bit_equal(np.asarray(s2.gnorm_vec), np.asarray(s1.gnorm_vec), "clipping rings")
  if transform == "paged":
    op.release(s1)
    op.release(s2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
def test_adamw8bit_in_several_calls_with_sharded_clipping_equals_paged_in_one(fused, monkeypatch):
  # adamw8bit runs one custom call per ARRAYS_CALL_LEAVES leaves; with 1 each
  # leaf's call takes its own rows of the rings and its own gathered norms.
  monkeypatch.setattr(op._calls, "ARRAYS_CALL_LEAVES", 1)
  m = mesh((4,), ("x",))
  shapes, specs = ALIGNED_SHAPES, ALIGNED_SPECS
  params, grads = make(shapes, 0), growing_grads(shapes, 4)
  kw = dict(min_8bit_size=1000, weight_decay=1e-2, percentile_clipping=80)
  p1, s1 = run(op.paged_adamw8bit(1e-3, **kw), params, grads, fused)
  sharded_grads = [place(g, m, specs) for g in grads]
  p2, s2 = run(op.adamw8bit(1e-3, **kw), place(params, m, specs), sharded_grads, fused)
  assert_same(p1, s1, p2, s2)
  assert_bit_equal(np.asarray(s2.gnorm_vec), np.asarray(s1.gnorm_vec), "clipping rings")
  op.release(s1)


def test_percentile_clipping_on_a_two_dimensional_mesh_and_a_misaligned_leaf():
  m = mesh((2, 4), ("data", "model"))
  shapes = {"qkv": (512, 1024), "proj": (1024, 512), "odd": (40, 20), "b": (1024,)}
  specs = {"qkv": P(None, "model"), "proj": P(("data", "model")), "odd": P("model"), "b": P()}
  params, grads = make(shapes, 1), growing_grads(shapes, 3)
  kw = dict(min_8bit_size=500, percentile_clipping=60)
  p1, s1 = run(op.paged_adamw8bit(1e-3, **kw), params, grads, True)
  p2, s2 = run(
    op.paged_adamw8bit(1e-3, **kw),
    place(params, m, specs),
    [place(g, m, specs) for g in grads],
    True,
  )
  # Aligned leaves as on one device; "odd" (10 x 20 per device: blocks of its own) only close.
  for k in ("qkv", "proj", "b"):
    assert_bit_equal(np.asarray(p2[k]), np.asarray(p1[k]), f"params {k}")
  np.testing.assert_allclose(np.asarray(p2["odd"]), np.asarray(p1["odd"]), rtol=0, atol=1e-3)
  # Every leaf's norm is the whole leaf's: the rings (leaves in key order: b, odd, proj, qkv)
  # agree to float32 rounding, bit for bit where the blocks are a single device's.
  r1, r2 = np.asarray(s1.gnorm_vec), np.asarray(s2.gnorm_vec)
  np.testing.assert_allclose(r2, r1, rtol=1e-6)
  assert_bit_equal(r2[[0, 2, 3]], r1[[0, 2, 3]], "aligned rings")
  assert not np.array_equal(r1[1], np.full(100, r1[1, 0]))  # clipping saw growing norms
  op.release(s1)
  op.release(s2)


def test_no_zero_size_array_crosses_the_shard_map():
  # Shardy (JAX 0.11) segfaults compiling a manual computation with a
  # zero-size operand or result: the empty clipping ring, the scales of a
  # float32-moment leaf. They are made inside and outside it instead.
  m = mesh((2,), ("x",))
  params = place(make({"w": (1024, 512), "b": (300,)}, 0), m, {"w": P("x"), "b": P()})
  tx = op.paged_adamw8bit(1e-3)  # clipping off; "b" keeps float32 moments
  state = tx.init(params)

  def optax_path(grads, state, params):
    return tx.update(grads, state, params)

  texts = [
    jax.jit(fn).lower(params, state, params).as_text() for fn in (tx.fused_update, optax_path)
  ]
  texts.append(_calls.export_flat.lower(state.layout, state.handle, state.count).as_text())
  _, codes, floats = _calls.export_flat(state.layout, state.handle, state.count)
  texts.append(_calls.import_flat.lower(state.layout, state.count, codes, floats).as_text())
  for text in texts:
    signatures = re.findall(r"^\s*\} : \(([^)]*)\) -> \(([^)]*)\)", text, re.M)
    assert signatures, "no manual computation in the lowered step"
    for operands, results in signatures:
      assert not re.search(r"tensor<(\d+x)*0x", operands + results), (operands, results)
  op.release(state)


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_a_step_on_params_sharded_after_init_names_the_leaf_and_the_fix(factory, jitted):
  """init on params on one device, steps on params sharded over 4: the state's
  moments live on one device, so the step fails at once (it used to run as a
  replicated call with 4 slots, and export failed later)."""
  m = mesh((4,), ("x",))
  params = make({"w": (1024, 256), "b": (300,)}, 0)
  tx = factory(1e-3)
  state = tx.init(params)
  placed = place(params, m, {"w": P("x"), "b": P()})
  step = jax.jit(tx.fused_update) if jitted else tx.fused_update
  with pytest.raises(
    ValueError,
    match=r"param \['b'\] lies on a mesh of x=4, but this opt_state "
    r"was made by init for params on one device.*Call tx.init on the params",
  ):
    step(placed, state, placed)
  state = tx.init(placed)  # init on the sharded params: the step runs
  jax.block_until_ready(step(placed, state, placed))
  if factory is op.paged_adamw8bit:
    op.release(state)


def test_collect_frees_every_device_slot_of_a_dropped_sharded_state():
  m = mesh((4,), ("x",))
  params, grads = aligned_on(m, 5, [50 + t for t in range(2)])
  before = settled_registry_bytes()
  _, kept = run(op.paged_adamw8bit(1e-3), params, grads, True)
  _, dropped = run(op.paged_adamw8bit(1e-3), params, grads, True)
  nbytes = op._ffi.total_bytes() - before
  dropped_slots = op.slot_info(dropped)
  assert len(dropped_slots) == 4 and nbytes % 2 == 0
  assert len({s["handle"] for s in dropped_slots}) == 4  # each device its own handle
  del dropped
  # The four slots of the dropped state go, none of the kept one's (and maybe
  # garbage of other tests that a collection in between left behind).
  assert op.collect() >= nbytes // 2
  held = set(op._ffi._ops.handles_with_slots())
  assert not held & {s["handle"] for s in dropped_slots}
  assert len(op.slot_info(kept)) == 4
  op.release(kept)
  assert op._ffi.total_bytes() <= before
