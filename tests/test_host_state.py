"""State in host RAM on a GPU: a step streams it through a device window in
chunks (copies in and out on streams of their own, the kernel between them)
and must give exactly what a step of the same state resident on the GPU
gives. Marked `gpu`; skipped without a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_gpu import DTYPES, GPU, SHAPES, inputs
from test_oracle import assert_bit_equal

import optax_paged8bit as op
from optax_paged8bit import _ffi

pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU"),
]

MIB = 1 << 20


@pytest.fixture
def small_window():
  """A window of three 1 MiB buffers: SHAPES' (1024, 1024) leaf (2 MiB of
  codes) is split over chunks, and chunks reuse buffers within a step."""
  before = _ffi._ops.stream_window()
  _ffi._ops.set_stream_window(MIB, 3)
  yield
  _ffi._ops.set_stream_window(*before)


@pytest.fixture
def budget():
  """Sets the device budget for the test; no budget afterwards."""
  yield op.set_device_memory_budget
  op.set_device_memory_budget(None)


@pytest.fixture(params=["pinned", "managed"])
def host_kind(request):
  """Each kind of host RAM (set_host_memory_kind) for the test."""
  before = op.set_host_memory_kind(request.param)
  yield request.param
  op.set_host_memory_kind(before)


def slot(state):
  (info,) = [s for s in op.slot_info(state) if s["platform"] == "cuda"]
  return info


def run(tx, params, grads, fused=True, before_step=None, on_step=None):
  """Steps on the GPU (state donated, as training loops do); the outputs
  and the exported state, as NumPy arrays."""
  with jax.default_device(GPU):
    params = jax.device_put(params, GPU)
    state = tx.init(params)
    if fused:
      step = jax.jit(tx.fused_update, donate_argnums=(1, 2))
    else:

      def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      step = jax.jit(step, donate_argnums=(1, 2))
    outs = []
    for t, g in enumerate(grads):
      if before_step is not None:
        before_step(t, state)
      params, state = step(jax.device_put(g, GPU), state, params)
      if on_step is not None:
        on_step(t, state)
      outs.append(jax.tree.map(np.asarray, params))
    exported = jax.tree.map(np.asarray, op.export_state(state))
  return outs, exported, state


def assert_same(a, b):
  (outs_a, state_a), (outs_b, state_b) = a, b
  for t, (x, y) in enumerate(zip(outs_a, outs_b, strict=True)):
    for k in x:
      assert_bit_equal(y[k], x[k], f"step {t} leaf {k}")
  for i, (x, y) in enumerate(zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True)):
    assert_bit_equal(y, x, f"state leaf {i}")


CASES = {
  "clipping": dict(weight_decay=1e-2, percentile_clipping=90),
  "no_clipping": dict(weight_decay=0.0),
  "float32_moments": dict(weight_decay=1e-2, args={"optim_bits": 32}),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_state_in_host_ram_steps_bit_identical_to_a_resident_one(
  dtype, case, fused, small_window, budget, host_kind
):
  """SHAPES has partial blocks, a float32-moment leaf and 8-bit leaves; the
  grads have non-finite values at one step and finite spikes at another.
  Pinned host memory is copied by the copy engines, managed by kernels."""
  params, grads = inputs(DTYPES[dtype])
  kwargs = {"lr": 1e-3, **CASES[case]}
  resident = run(op.paged_adamw8bit(**kwargs), params, grads, fused)
  assert slot(resident[2])["bytes_on_host"] == 0
  assert slot(resident[2])["bytes_pinned"] == 0
  budget(0)
  host = run(op.paged_adamw8bit(**kwargs), params, grads, fused)
  info = slot(host[2])
  assert info["bytes_on_device"] == 0 and info["bytes_on_host"] == info["bytes"]
  assert info["bytes_pinned"] == (info["bytes"] if host_kind == "pinned" else 0)
  assert info["streamed_steps"] == len(grads)
  assert info["streamed_bytes"] >= info["bytes"] - 4 * 256 * len(SHAPES)
  assert_same(resident[:2], host[:2])
  op.release(resident[2])
  op.release(host[2])


def test_streaming_off_reads_over_the_bus_and_agrees(budget, host_kind):
  params, grads = inputs(np.float32)
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  budget(0)
  streamed = run(tx(), params, grads)
  before = _ffi._ops.stream_window()
  _ffi._ops.set_stream_window(0, 0)
  try:
    over_the_bus = run(tx(), params, grads)
  finally:
    _ffi._ops.set_stream_window(*before)
  assert slot(streamed[2])["streamed_steps"] == len(grads)
  assert slot(over_the_bus[2])["streamed_steps"] == 0
  assert_same(streamed[:2], over_the_bus[:2])
  op.release(streamed[2])
  op.release(over_the_bus[2])


def test_page_out_mid_run_with_no_room_to_come_back_streams_the_rest(small_window, budget):
  """A state that starts on the GPU, is paged out after step 2 while the
  budget leaves it no room: the later steps stream it from host RAM."""
  params, grads = inputs(np.float32)
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  resident = run(tx(), params, grads)

  def page_out_after_two(t, state):
    if t == 2:
      budget(0)
      assert op.page_out(state) == state.layout.state_nbytes()

  moved = run(tx(), params, grads, before_step=page_out_after_two)
  info = slot(moved[2])
  assert info["bytes_on_host"] == info["bytes"] and info["streamed_steps"] == len(grads) - 2
  assert_same(resident[:2], moved[:2])
  op.release(resident[2])
  op.release(moved[2])


def test_page_out_mid_run_with_room_comes_back_and_agrees(small_window):
  params, grads = inputs(np.float32)
  tx = lambda: op.paged_adamw8bit(1e-3)
  resident = run(tx(), params, grads)
  moved = run(tx(), params, grads, before_step=lambda t, s: t == 2 and op.page_out(s))
  info = slot(moved[2])
  assert info["bytes_on_host"] == 0 and info["streamed_steps"] == 0
  assert_same(resident[:2], moved[:2])
  op.release(resident[2])
  op.release(moved[2])


def big_tree(seed=0):
  """16 leaves of 1M float32 params (a 2 MiB + 16 KiB state each) and a small
  one: about 32 MiB of state."""
  rng = np.random.default_rng(seed)
  tree = {
    f"w{i:02d}": (rng.standard_normal((1024, 1024)) * 0.1).astype(np.float32) for i in range(16)
  }
  tree["b"] = (rng.standard_normal(300) * 0.1).astype(np.float32)
  grads = [
    {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in tree.items()}
    for _ in range(3)
  ]
  return tree, grads


def test_a_budget_of_half_the_state_puts_half_on_each_side(budget):
  params, grads = big_tree()
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  resident = run(tx(), params, grads)
  total = resident[2].layout.state_nbytes()
  # What the resident run placed, plus half of this state.
  budget(_ffi._ops.managed_device_bytes(GPU.id) + total // 2)
  half = run(tx(), params, grads)
  info = slot(half[2])
  # The device part ends on a 2 MiB unit.
  assert total // 2 - (2 * MIB) < info["bytes_on_device"] <= total // 2, info
  assert info["streamed_steps"] == len(grads)
  assert 0 < info["streamed_bytes"] < 0.6 * total, info
  assert op.residency(half[2])["bytes_on_host"] == info["bytes_on_host"]
  assert_same(resident[:2], half[:2])
  # The memory says the same: the probe finds the host half over the bus.
  found = op.measure_residency(half[2])
  # (one timed load per 2 MiB: a chunk or two may read as the other side)
  assert abs(found["bytes_on_host"] - info["bytes_on_host"]) <= 0.2 * total, (found, info)
  op.release(resident[2])
  op.release(half[2])


def test_a_step_of_several_calls_streams_each_and_agrees(small_window, budget, monkeypatch):
  """The step split into calls of 6 leaves: the first calls stage their
  moments in XLA buffers, the last commits them."""
  monkeypatch.setattr(op._calls, "UPDATE_ONE_CALL_LEAVES", 6)
  monkeypatch.setattr(op._calls, "UPDATE_CALL_LEAVES", 6)
  params, grads = big_tree()
  assert len(op._calls.update_chunks(len(params))) == 3
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  resident = run(tx(), params, grads)
  budget(0)
  host = run(tx(), params, grads)
  assert slot(host[2])["streamed_steps"] == len(grads)  # steps, not calls
  assert_same(resident[:2], host[:2])
  op.release(resident[2])
  op.release(host[2])


def test_export_right_after_a_streamed_step_waits_for_its_write_back(budget):
  """Each export is issued while the step's write-back may still run; each
  must see the step's moments (the exports differ step to step and match
  the resident run's)."""
  params, grads = big_tree()
  tx = lambda: op.paged_adamw8bit(1e-3)
  exports = {"resident": [], "host": []}

  def export_each(name):
    return lambda t, s: exports[name].append(jax.tree.map(np.asarray, op.export_state(s)))

  resident = run(tx(), params, grads, on_step=export_each("resident"))
  budget(0)
  host = run(tx(), params, grads, on_step=export_each("host"))
  for a, b in zip(exports["resident"], exports["host"], strict=True):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      assert_bit_equal(y, x, "exported state")
  op.release(resident[2])
  op.release(host[2])


def test_the_first_streamed_step_after_an_import_reads_the_imported_moments(budget):
  """import_state writes the moments on XLA's stream; the next step's copies
  in (on a stream of their own, enqueued at once) must start after it, or
  they read the fresh state's zeros."""
  params, grads = big_tree()
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  resident = run(tx(), params, grads)
  exported = {}

  def keep(t, s):
    if t == 0:
      # NumPy copies: an import takes the arrays it is given into the new
      # state, which each step below donates.
      exported["state"] = jax.tree.map(np.asarray, op.export_state(s))

  budget(0)
  with jax.default_device(GPU):
    first = run(tx(), params, grads[:1], on_step=keep)
    t = tx()
    step = jax.jit(t.fused_update, donate_argnums=(1, 2))
    for _ in range(3):  # each time: a fresh import, a step enqueued behind it at once
      p = jax.device_put(resident[0][0], GPU)
      state = op.import_state(t.init(p), exported["state"])
      out, state = step(jax.device_put(grads[1], GPU), state, p)
      assert slot(state)["streamed_steps"] == 1
      for k, v in out.items():
        assert_bit_equal(np.asarray(v), resident[0][1][k], f"leaf {k} after import")
      op.release(state)
  op.release((resident[2], first[2]))


def test_a_pinned_state_stays_pinned_and_on_the_host_through_paging_and_a_new_kind(budget):
  """A state in pinned host memory never moves: page_out and page_in move
  no bytes, the probe finds it all on the host, and a later
  set_host_memory_kind("managed") leaves it pinned; it trains on exactly as a
  resident state does."""
  params, grads = big_tree()
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  resident = run(tx(), params, grads)
  budget(0)
  moved = []
  found = []

  def page_around(t, state):
    if t == 1:
      before = op.set_host_memory_kind("managed")
      moved.append((op.page_out(state), op.page_in(state)))
      found.append(op.measure_residency(state))
      op.set_host_memory_kind(before)

  host = run(tx(), params, grads, on_step=page_around)
  info = slot(host[2])
  assert info["bytes_pinned"] == info["bytes"] == info["bytes_on_host"], info
  assert moved == [(0, 0)]
  total = info["bytes"]
  # (one timed load per 2 MiB: a chunk may read as the other side)
  assert found[0]["bytes_on_host"] >= total - 4 * MIB, found
  assert info["streamed_steps"] == len(grads)
  assert_same(resident[:2], host[:2])
  op.release(resident[2])
  op.release(host[2])


def test_a_host_that_refuses_to_lock_memory_gets_a_managed_state_that_agrees(budget):
  """When cuMemAllocHost fails (a host short of lockable RAM), a state with
  no room on its GPU is placed in managed memory homed on the host instead,
  and trains bit-identically to a resident one."""
  params, grads = inputs(DTYPES["float32"])
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=90)
  resident = run(tx(), params, grads)
  assert op.host_memory_kind() == "pinned"
  budget(0)
  _ffi._ops.refuse_pinned_host(True)
  try:
    host = run(tx(), params, grads)
  finally:
    _ffi._ops.refuse_pinned_host(False)
  info = slot(host[2])
  assert info["bytes_pinned"] == 0 and info["bytes_on_host"] == info["bytes"], info
  assert info["streamed_steps"] == len(grads)
  assert_same(resident[:2], host[:2])
  op.release(resident[2])
  op.release(host[2])


def test_a_streamed_state_survives_release_and_collection_with_copies_in_flight(budget):
  """Freeing a state whose write-back may still run waits for it (no
  crash, no write into freed memory), and the next state is exact."""
  params, grads = big_tree()
  budget(0)
  for _ in range(3):
    _, _, state = run(op.paged_adamw8bit(1e-3), params, grads[:1])
    op.release(state)
  ref = run(op.paged_adamw8bit(1e-3), params, grads)
  again = run(op.paged_adamw8bit(1e-3), params, grads)
  assert_same(ref[:2], again[:2])
  op.release(ref[2])
  op.release(again[2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_jnp_tree_in_host_ram_trains_like_one_on_the_gpu(dtype, budget):
  """The default window (chunks of 32 MiB): about 50 MB of moments in
  leaves that straddle chunks, float32 or bfloat16 params."""
  key = jax.random.PRNGKey(0)
  dt = jnp.dtype(dtype)
  shapes = [(4096, 4096), (3000, 2049), (4096, 4096), (777,), (5, 5)]
  params = {
    f"p{i}": np.asarray(jax.random.normal(jax.random.fold_in(key, i), s, dt) * 0.1)
    for i, s in enumerate(shapes)
  }
  grads = [
    {
      k: np.asarray(jax.random.normal(jax.random.fold_in(key, 100 + t), v.shape, dt) * 0.01)
      for k, v in params.items()
    }
    for t in range(3)
  ]
  tx = lambda: op.paged_adamw8bit(1e-3, percentile_clipping=95)
  resident = run(tx(), params, grads)
  budget(0)
  host = run(tx(), params, grads)
  assert slot(host[2])["streamed_steps"] == 3
  assert_same(resident[:2], host[:2])
  op.release(resident[2])
  op.release(host[2])


def test_a_flax_train_state_in_host_ram_saves_restores_and_trains_like_a_resident_one(
  small_window, budget, tmp_path
):
  """As a Flax user writes it: a jitted create_train_state (called twice),
  FusedTrainState steps jitted and donated, a save_checkpoint in the middle
  of the run while the last write-back may still be copying, a restore into
  a fresh state and the rest of the run. With the state in host RAM and
  streamed, every param equals the run with the state on the GPU."""
  from flax import linen

  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 512)), jnp.float32)
  y = jnp.zeros((64, 10))
  model = linen.Sequential([linen.Dense(1024), linen.relu, linen.Dense(1024), linen.Dense(10)])
  tx = op.paged_adamw8bit(1e-3, percentile_clipping=95)
  create = jax.jit(
    lambda key: op.FusedTrainState.create(apply_fn=model.apply, params=model.init(key, x), tx=tx)
  )
  grad = jax.jit(jax.grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2)))
  step = jax.jit(lambda s: s.apply_gradients(grads=grad(s.params)), donate_argnums=0)

  def train(where):
    with jax.default_device(GPU):
      create(jax.random.PRNGKey(1))  # a first state, dropped: the second trains
      state = create(jax.random.PRNGKey(0))
      for _ in range(3):
        state = step(state)
      op.save_checkpoint(tmp_path / where, state)
      for _ in range(2):  # steps the restored run will replay
        state = step(state)
      unbroken = jax.tree.map(np.asarray, state.params)
      op.release(state)
      state = op.restore_checkpoint(tmp_path / where, create(jax.random.PRNGKey(0)))
      for _ in range(2):
        state = step(state)
      return unbroken, state

  resident, resident_state = train("resident")
  budget(0)
  host, host_state = train("host")
  assert slot(host_state.opt_state)["bytes_on_host"] == slot(host_state.opt_state)["bytes"]
  assert slot(host_state.opt_state)["streamed_steps"] == 2
  for a, b, c, d in zip(
    jax.tree.leaves(resident),
    jax.tree.leaves(host),
    jax.tree.leaves(resident_state.params),
    jax.tree.leaves(host_state.params),
    strict=True,
  ):
    assert_bit_equal(b, a, "unbroken run, host against resident")
    assert_bit_equal(np.asarray(c), a, "restored run against unbroken (resident)")
    assert_bit_equal(np.asarray(d), a, "restored run against unbroken (host)")
  op.release((resident_state, host_state))


def test_an_nnx_optimizer_in_host_ram_saves_async_with_a_checkpoint_manager_and_resumes(
  small_window, budget, tmp_path
):
  """As an NNX user writes it: nnx.Optimizer steps under nnx.jit, saved by an
  orbax CheckpointManager that writes asynchronously while training goes on,
  then restored into a fresh model and optimizer. With the state in host RAM
  (1.5M params: each moment's codes straddle the 1 MiB chunks), every param
  equals the run with the state on the GPU, unbroken and resumed."""
  import orbax.checkpoint as ocp
  from flax import nnx

  def build(seed):
    rngs = nnx.Rngs(seed)
    model = nnx.Sequential(
      nnx.Linear(256, 2048, rngs=rngs), nnx.relu, nnx.Linear(2048, 512, rngs=rngs),
      nnx.Linear(512, 10, rngs=rngs),
    )  # fmt: skip
    return model, nnx.Optimizer(model, op.paged_adamw8bit(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: ((m(x) - 1.0) ** 2).mean())(model)
    optimizer.update(model, grads)

  def batch(t):
    return jnp.asarray(np.random.default_rng(t).standard_normal((32, 256)), jnp.float32)

  def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

  def train(where):
    with jax.default_device(GPU):
      model, optimizer = build(0)
      for t in range(3):
        step(model, optimizer, batch(t))
      with ocp.CheckpointManager(str(tmp_path / where)) as manager:
        tree = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        assert op.save_checkpoint(manager, tree, step=3)
        for t in range(3, 5):  # while orbax writes
          step(model, optimizer, batch(t))
        manager.wait_until_finished()
      unbroken = params(model)
      op.release(nnx.state(optimizer))
      model, optimizer = build(5)
      with ocp.CheckpointManager(str(tmp_path / where)) as manager:
        fresh = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        tree = op.restore_checkpoint(manager, fresh)
      nnx.update(model, tree["model"])
      nnx.update(optimizer, tree["optimizer"])
      for t in range(3, 5):
        step(model, optimizer, batch(t))
      return unbroken, params(model), optimizer

  resident = train("resident")
  budget(0)
  host = train("host")
  info = slot(nnx.state(host[2]))
  assert info["bytes_on_host"] == info["bytes"] and info["streamed_steps"] == 2
  for a, b, c, d in zip(*resident[:2], *host[:2], strict=True):
    assert_bit_equal(c, a, "unbroken run, host against resident")
    assert_bit_equal(b, a, "resumed run against unbroken (resident)")
    assert_bit_equal(d, a, "resumed run against unbroken (host)")
  op.release((nnx.state(resident[2]), nnx.state(host[2])))


def test_an_interrupted_streamed_step_keeps_its_moments_for_export(small_window, budget):
  """Ctrl-C between a streamed step's dispatch and its assignment: the step
  runs on, its results never reach Python. Exporting the state last held
  (at once, with the step's copies maybe still in flight) gives the moments
  the step wrote back, as a resident run of one more step has them, and the
  run goes on from them after import_state."""
  params, grads = inputs(np.float32, seed=21)
  grads = grads[:3]

  def interrupted():
    with jax.default_device(GPU):
      tx = op.paged_adamw8bit(1e-3)
      p = jax.device_put(params, GPU)
      state = tx.init(p)
      step = jax.jit(tx.fused_update)
      p, state = step(jax.device_put(grads[0], GPU), state, p)
      dropped = step(jax.device_put(grads[1], GPU), state, p)
      del dropped  # not waited for: the write-back may still be copying
      with pytest.warns(op.InterruptedStepWarning):
        exported = op.export_state(state)
      exported = jax.tree.map(np.asarray, exported)
      resumed = op.import_state(tx.init(p), exported)
      return exported, resumed, state

  resident = run(op.paged_adamw8bit(1e-3), params, grads[:2])
  budget(0)
  exported, resumed, held = interrupted()
  assert slot(held)["streamed_steps"] == 2
  assert int(exported.count) == 2
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(resident[1]), strict=True):
    assert_bit_equal(a, b, "the moments the interrupted step wrote back")
  op.release((held, resident[2]))
  resumed_run = run(op.paged_adamw8bit(1e-3), params, grads)  # three steps, host RAM
  with jax.default_device(GPU):
    tx = op.paged_adamw8bit(1e-3)
    p = jax.device_put(jax.tree.map(jnp.asarray, resumed_run[0][1]), GPU)
    p, resumed = jax.jit(tx.fused_update)(jax.device_put(grads[2], GPU), resumed, p)
  for k, want in resumed_run[0][2].items():
    assert_bit_equal(np.asarray(p[k]), want, f"step 3 after import, leaf {k}")
  op.release((resumed, resumed_run[2]))
