"""Checkpoints with orbax: a run saved at step k and restored (in this process,
in a fresh process, onto another mesh) continues bit-identically."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import mesh_devices
from jax.sharding import NamedSharding
from resume_common import (
  SPECS,
  NnxModel,
  flax_train_state,
  make,
  optimizer,
  train,
  train_state_steps,
)
from test_oracle import assert_bit_equal

import optax_paged8bit as op

TESTS = os.path.dirname(os.path.abspath(__file__))


def mesh_of(n):
  return jax.sharding.Mesh(np.asarray(mesh_devices(n)), ("x",))


def exported_leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(op.export_state(state))]


def assert_same_run(params, state, full_params, full_state):
  """A resumed run's params and exported state equal the uninterrupted run's, bit for bit."""
  for k in full_params:
    assert_bit_equal(np.asarray(params[k]), np.asarray(full_params[k]), k)
  for a, b in zip(exported_leaves(state), exported_leaves(full_state), strict=True):
    assert_bit_equal(a, b, "state")


@pytest.mark.parametrize("kind", ["paged", "arrays"])
def test_save_restore_continues_bit_identically(tmp_path, kind):
  full_p, full_s = train(optimizer(kind), optimizer(kind).init(make(0)), make(0), 6, 0)
  tx = optimizer(kind)
  p, s = train(tx, tx.init(make(0)), make(0), 3, 0)
  op.save_checkpoint(str(tmp_path / "ckpt"), s)
  tx2 = optimizer(kind)
  s2 = op.restore_checkpoint(str(tmp_path / "ckpt"), tx2.init(p))
  assert int(s2.count) == 3
  p2, s2 = train(tx2, s2, p, 3, 3)
  assert_same_run(p2, s2, full_p, full_s)
  op.release((s, s2, full_s))


def run_fresh_process(tmp_path, body: str, devices: int) -> None:
  script = tmp_path / "resume.py"
  header = "\n".join(
    [
      "import sys",
      f"sys.path.insert(0, {TESTS!r})",
      "import jax, numpy as np",
      "from jax.sharding import NamedSharding",
      "import optax_paged8bit as op",
      "from resume_common import *",
      "",
    ]
  )
  script.write_text(header + textwrap.dedent(body))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  done = subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
  ("kind", "devices"), [("paged", 1), ("paged", 2), ("paged", 4), ("arrays", 2)]
)
def test_resume_in_a_fresh_process(tmp_path, kind, devices):
  mesh = mesh_of(devices) if devices > 1 else None
  full_p, full_s = train(
    optimizer(kind), optimizer(kind).init(make(0, mesh)), make(0, mesh), 6, 0, mesh
  )
  tx = optimizer(kind)
  p, s = train(tx, tx.init(make(0, mesh)), make(0, mesh), 3, 0, mesh)
  op.save_checkpoint(str(tmp_path / "ckpt"), s)
  np.savez(tmp_path / "params.npz", **{k: np.asarray(v) for k, v in p.items()})
  run_fresh_process(
    tmp_path,
    f"""
    mesh = jax.make_mesh(({devices},), ("x",)) if {devices} > 1 else None
    saved = np.load("params.npz")
    params = {{k: jax.numpy.asarray(saved[k]) for k in SHAPES}}
    if mesh is not None:
      params = {{k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}}
    tx = optimizer("{kind}")
    state = op.restore_checkpoint("ckpt", tx.init(params))
    params, state = train(tx, state, params, 3, 3, mesh)
    np.savez("final.npz", **{{k: np.asarray(v) for k, v in params.items()}})
    np.savez("state.npz", *[np.asarray(x) for x in jax.tree.leaves(op.export_state(state))])
    """,
    devices,
  )
  final = np.load(tmp_path / "final.npz")
  for k in full_p:
    assert_bit_equal(final[k], np.asarray(full_p[k]), k)
  state = np.load(tmp_path / "state.npz")
  for i, want in enumerate(exported_leaves(full_s)):
    assert_bit_equal(state[f"arr_{i}"], want, f"state {i}")
  op.release((s, full_s))


@pytest.mark.parametrize(("saved_on", "restored_on"), [(4, 2), (2, 1)])
def test_restore_onto_another_mesh(tmp_path, saved_on, restored_on):
  """Saved from one mesh, restored onto a smaller one (or one device): both cut
  the leaves on 256-element block boundaries, so the run continues exactly as
  on one device."""
  full_p, full_s = train(optimizer("paged"), optimizer("paged").init(make(0)), make(0), 6, 0)
  m_saved = mesh_of(saved_on)
  m2 = mesh_of(restored_on) if restored_on > 1 else None
  tx = optimizer("paged")
  p, s = train(tx, tx.init(make(0, m_saved)), make(0, m_saved), 3, 0, m_saved)
  op.save_checkpoint(str(tmp_path / "ckpt"), s)
  p2 = {k: np.asarray(v) for k, v in p.items()}
  if m2 is None:
    p2 = {k: jax.numpy.asarray(v) for k, v in p2.items()}
  else:
    p2 = {k: jax.device_put(v, NamedSharding(m2, SPECS[k])) for k, v in p2.items()}
  tx2 = optimizer("paged")
  s2 = op.restore_checkpoint(str(tmp_path / "ckpt"), tx2.init(p2))
  assert s2.layout.mesh == m2
  p2, s2 = train(tx2, s2, p2, 3, 3, m2)
  assert_same_run(p2, s2, full_p, full_s)
  op.release((s, s2, full_s))


# -- whole trees: a Flax TrainState, nnx.state(optimizer) -----------------------------


def train_state_leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(op.export_state(state))]


@pytest.mark.parametrize("kind", ["paged", "arrays"])
def test_train_state_resumes_in_a_fresh_process(tmp_path, kind):
  full = train_state_steps(flax_train_state(kind, make(0)), 6, 0)
  half = train_state_steps(flax_train_state(kind, make(0)), 3, 0)
  op.save_checkpoint(str(tmp_path / "ckpt"), half)
  run_fresh_process(
    tmp_path,
    f"""
    target = flax_train_state("{kind}", make(7))  # other params: all restored from the checkpoint
    state = op.restore_checkpoint("ckpt", target)
    assert int(state.step) == 3, state.step
    state = train_state_steps(state, 3, 3)
    np.savez("leaves.npz", *[np.asarray(x) for x in jax.tree.leaves(op.export_state(state))])
    """,
    1,
  )
  got = np.load(tmp_path / "leaves.npz")
  for i, want in enumerate(train_state_leaves(full)):
    assert_bit_equal(got[f"arr_{i}"], want, f"leaf {i}")
  op.release((full, half))


@pytest.mark.parametrize("kind", ["paged", "arrays"])
def test_nnx_optimizer_state_resumes_in_a_fresh_process(tmp_path, kind):
  full = NnxModel(kind)
  full.train(6, 0)
  half = NnxModel(kind)
  half.train(3, 0)
  op.save_checkpoint(str(tmp_path / "ckpt"), half.tree())
  run_fresh_process(
    tmp_path,
    f"""
    fresh = NnxModel("{kind}", seed=5)
    fresh.load(op.restore_checkpoint("ckpt", fresh.tree()))
    fresh.train(3, 3)
    np.savez("params.npz", *fresh.params())
    """,
    1,
  )
  got = np.load(tmp_path / "params.npz")
  for i, want in enumerate(full.params()):
    assert_bit_equal(got[f"arr_{i}"], want, f"param {i}")


def test_nnx_tree_restores_in_process_and_exports_like_the_optimizer_state():
  model = NnxModel("paged")
  model.train(2, 0)
  exported = op.export_state(model.tree())
  assert int(jax.tree.leaves(exported["optimizer"]["opt_state"].count)[0]) == 2
  other = NnxModel("paged", seed=9)
  other.load(op.import_state(other.tree(), exported))
  model.train(2, 2)
  other.train(2, 2)
  for a, b in zip(model.params(), other.params(), strict=True):
    assert_bit_equal(a, b, "params")


@pytest.mark.parametrize("what", ["train_state", "nnx"])
def test_a_plain_orbax_save_of_a_live_paged_state_fails_at_save_time(tmp_path, what):
  import orbax.checkpoint as ocp

  if what == "train_state":
    tree = train_state_steps(flax_train_state("paged", make(0)), 1, 0)
    where = r"\.opt_state\.handle"
  else:
    model = NnxModel("paged")
    model.train(1, 0)
    tree = model.tree()
    where = r"\['optimizer'\]\['opt_state'\]\['handle'\]"
  checkpointer = ocp.StandardCheckpointer()
  with pytest.raises(ValueError, match=f"live paged_adamw8bit state .*{where}.*save_checkpoint"):
    checkpointer.save(str(tmp_path / "plain"), tree)
  checkpointer.close()
  # A fresh state holds no moments yet: saving it plainly loses nothing.
  fresh = flax_train_state("paged", make(0))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "fresh"), fresh)


@pytest.mark.parametrize("first", ["optax_paged8bit", "orbax and flax"])
def test_the_orbax_guard_and_flax_serialization_whichever_is_imported_first(tmp_path, first):
  imports = {
    "optax_paged8bit": ["optax_paged8bit as op", "orbax.checkpoint as ocp"],
    "orbax and flax": ["orbax.checkpoint as ocp", "optax_paged8bit as op"],
  }[first]
  flax_line = "from flax import serialization"
  lines = [f"import {m}" for m in imports]
  lines.insert(0 if first == "orbax and flax" else 2, flax_line)
  body = textwrap.dedent(
    """
    import os, jax, jax.numpy as jnp, numpy as np
    tx = op.paged_adamw8bit(1e-3)
    params = {"w": jnp.ones((64, 80))}
    _, state = jax.jit(tx.fused_update)({"w": jnp.full((64, 80), 0.01)}, tx.init(params), params)
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath("plain"), {"opt_state": state})
    except ValueError as e:
      assert "live paged_adamw8bit state" in str(e), e
    else:
      raise SystemExit("a plain orbax save went through without the moments")
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    for a, b in zip(
      jax.tree.leaves(op.export_state(restored)), jax.tree.leaves(op.export_state(state))
    ):
      assert np.array_equal(a, b)
    """
  )
  script = tmp_path / "imports.py"
  script.write_text("\n".join(lines) + "\n" + body)
  done = subprocess.run(
    [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]


def test_a_refused_plain_orbax_save_leaves_no_folder_and_no_traceback_at_exit(tmp_path):
  # Each of orbax's save entry points, in a process of its own, so that what
  # orbax's background threads print at interpreter exit is seen too.
  body = textwrap.dedent(
    """
    import os, jax, jax.numpy as jnp
    import optax_paged8bit as op
    import orbax.checkpoint as ocp
    tx = op.paged_adamw8bit(1e-3)
    params = {"w": jnp.ones((64, 80))}
    _, state = jax.jit(tx.fused_update)(params, tx.init(params), params)
    tree = {"params": params, "opt_state": state}
    saves = {
      "standard": lambda: ocp.StandardCheckpointer().save(os.path.abspath("std"), tree),
      "pytree": lambda: ocp.PyTreeCheckpointer().save(os.path.abspath("pytree"), tree),
      "async": lambda: ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()).save(
        os.path.abspath("async"), args=ocp.args.StandardSave(tree)
      ),
      "manager": lambda: ocp.CheckpointManager(os.path.abspath("manager")).save(
        1, args=ocp.args.StandardSave(tree)
      ),
      "composite": lambda: ocp.CheckpointManager(os.path.abspath("composite")).save(
        1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree))
      ),
    }
    for name, save in saves.items():
      try:
        save()
      except ValueError as e:
        assert "['opt_state'].handle" in str(e) and "save_checkpoint" in str(e), (name, e)
      else:
        raise SystemExit(f"{name}: a plain orbax save of a live state went through")
    print("refused", len(saves))
    """
  )
  (tmp_path / "saves.py").write_text(body)
  done = subprocess.run(
    [sys.executable, "saves.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0 and "refused 5" in done.stdout, done.stderr[-3000:]
  assert "Traceback" not in done.stderr and "cannot schedule" not in done.stderr, done.stderr
  debris = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name != "saves.py"]
  # The managers' own root folders (made when they are built) and nothing in them.
  assert sorted(debris) == ["composite", "manager"], debris


def test_a_plain_orbax_save_while_the_first_step_is_in_flight_fails(tmp_path):
  # The first step makes the state's slot when its call runs. A save issued
  # while that call still waits behind other work must see the state as live
  # (the guard once listed the slots before reading the handle, and let such
  # a save through without the moments).
  import orbax.checkpoint as ocp

  tx = optimizer("paged")

  @jax.jit
  def slow_step(params, state, x):
    # About a second of CPU work before the update can run: 48 products in a
    # loop (12 unrolled ones took 17 s: XLA's CPU backend fused them with the
    # mean into one slow kernel).
    x = jax.lax.fori_loop(0, 48, lambda i, y: jax.numpy.tanh(y @ y), x)
    grads = jax.tree.map(lambda p: p * 0 + jax.numpy.mean(x) * 1e-3, params)
    return tx.fused_update(grads, state, params)

  x = jax.numpy.full((1024, 1024), 1e-3)
  jax.block_until_ready(slow_step.lower(make(0), tx.init(make(0)), x).compile())
  _, state = slow_step(make(0), tx.init(make(0)), x)  # returns before the call has run
  with (
    ocp.StandardCheckpointer() as checkpointer,
    pytest.raises(ValueError, match=r"live paged_adamw8bit state .*\.handle"),
  ):
    checkpointer.save(str(tmp_path / "plain"), {"opt_state": state})
  op.release(state)


def test_restoring_into_another_optimizer_names_the_place_and_the_conversion(tmp_path):
  import optax
  from flax.training import train_state

  op.save_checkpoint(
    str(tmp_path / "ckpt"), train_state_steps(flax_train_state("paged", make(0)), 1, 0)
  )
  adamw = train_state.TrainState.create(apply_fn=None, params=make(0), tx=optax.adamw(1e-3))
  with pytest.raises(ValueError, match=r"(?s)opt_state.*the same optimizers.*from_optax_adamw"):
    op.restore_checkpoint(str(tmp_path / "ckpt"), adamw)


def test_a_state_restored_without_its_moments_names_the_right_way_to_save(tmp_path):
  tx = optimizer("paged")
  _, state = train(tx, tx.init(make(0)), make(0), 2, 0)
  # What a plain save and restore in another process hands back: the count and
  # a handle this process never created.
  foreign = state._replace(handle=jax.numpy.uint32(3))
  with pytest.raises(Exception, match=r"not created in this process.*save_checkpoint"):
    jax.block_until_ready(jax.jit(tx.fused_update)(make(100), foreign, make(0)))
  with pytest.raises(ValueError, match=r"not created in this process.*save_checkpoint"):
    op.export_state(foreign)
  op.release(state)


def test_a_refused_export_is_refused_before_its_call_and_leaves_no_error_behind():
  """Exports of a stale, a released and a foreign state raise ValueError from
  the host check, before any call is issued: a failed export call (it has side
  effects) would leave JAX's runtime token in error on a GPU, and every later
  jax.effects_barrier() (release, page_out, collect) would raise it again."""
  tx = optimizer("paged")
  params, state = train(tx, tx.init(make(0)), make(0), 1, 0)
  params, newer = train(tx, state, params, 2, 1)  # `state` is now two steps behind
  gone = tx.init(make(0))
  _, gone = train(tx, gone, make(0), 1, 0)
  op.release(gone)
  refused = [
    (state, r"stale optimizer state.*export the opt_state returned by the latest"),
    (gone, r"released"),
    (newer._replace(handle=jax.numpy.uint32(3)), r"not created in this process"),
  ]
  for bad, match in refused:
    with pytest.raises(ValueError, match=match):
      op.export_state(bad)
    jax.effects_barrier()  # nothing left in error
  exported = op.export_state(newer)
  assert int(exported.count) == 3
  op.release(newer)
  jax.effects_barrier()


def test_checkpoint_manager_loop_keeps_the_last_k_and_resumes_from_the_latest(tmp_path):
  import orbax.checkpoint as ocp

  every, keep = 2, 2
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every)
  state = flax_train_state("paged", make(0))
  with ocp.CheckpointManager(str(tmp_path / "ckpts"), options=options) as manager:
    for step in range(1, 8):
      state = train_state_steps(state, 1, step - 1)
      op.save_checkpoint(manager, state, step=step)
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 6]
  full = train_state_steps(state, 2, 7)
  with ocp.CheckpointManager(str(tmp_path / "ckpts"), options=options) as manager:
    resumed = op.restore_checkpoint(manager, flax_train_state("paged", make(3)))
  assert int(resumed.step) == 6
  resumed = train_state_steps(resumed, 3, 6)
  for a, b in zip(train_state_leaves(resumed), train_state_leaves(full), strict=True):
    assert_bit_equal(a, b, "resumed at the latest checkpoint")
  with pytest.raises(ValueError, match="needs step="):
    op.save_checkpoint(manager, state)


# -- flax.serialization (to_bytes / from_bytes, msgpack) ----------------------------


@pytest.mark.parametrize(
  ("saved", "restored"),
  [("paged", "paged"), ("arrays", "arrays"), ("arrays", "paged"), ("paged", "arrays")],
)
def test_flax_to_bytes_of_a_train_state_restores_bit_identically(saved, restored):
  from flax import serialization

  full = train_state_steps(flax_train_state(restored, make(0)), 6, 0)
  half = train_state_steps(flax_train_state(saved, make(0)), 3, 0)
  data = serialization.to_bytes(half)
  op.release(half)  # the bytes hold the moments: nothing of the saved state is needed
  state = serialization.from_bytes(flax_train_state(restored, make(7)), data)
  assert int(state.step) == 3
  assert type(state.opt_state) is type(full.opt_state)
  state = train_state_steps(state, 3, 3)
  for i, (a, b) in enumerate(zip(train_state_leaves(state), train_state_leaves(full), strict=True)):
    assert_bit_equal(a, b, f"leaf {i}")
  op.release((state, full))


def test_flax_state_dict_of_a_chain_with_clipping_round_trips():
  import optax
  from flax import serialization

  def tx():
    return optax.chain(
      optax.clip_by_global_norm(1.0),
      op.paged_adamw8bit(1e-3, min_8bit_size=1000, percentile_clipping=90),
    )

  t = tx()
  full_p, full_s = train(t, t.init(make(0)), make(0), 6, 0, fused=False)
  p, s = train(t, t.init(make(0)), make(0), 3, 0, fused=False)
  saved = serialization.msgpack_restore(
    serialization.msgpack_serialize(serialization.to_state_dict({"params": p, "opt_state": s}))
  )
  assert set(saved["opt_state"]["1"]) == {
    "count",
    "qmap1",
    "qmap2",
    "state1",
    "state2",
    "absmax1",
    "absmax2",
    "gnorm_vec",
  }
  op.release(s)
  t2 = tx()
  tree = serialization.from_state_dict({"params": make(5), "opt_state": t2.init(make(5))}, saved)
  p2, s2 = train(t2, tree["opt_state"], tree["params"], 3, 3, fused=False)
  assert_same_run(p2, s2, full_p, full_s)
  op.release((s2, full_s))


@pytest.mark.parametrize("how", ["save_checkpoint", "flax.serialization"])
def test_a_checkpoint_in_the_middle_of_gradient_accumulation_resumes_exactly(tmp_path, how):
  from flax import serialization

  def tx():
    return op.accumulate_gradients(op.paged_adamw8bit(1e-3, min_8bit_size=1000), 4)

  t = tx()
  full_p, full_s = train(t, t.init(make(0)), make(0), 12, 0, fused=False)
  p, s = train(t, t.init(make(0)), make(0), 6, 0, fused=False)  # 1 step, then 2 of 4 summed
  if how == "save_checkpoint":
    op.save_checkpoint(str(tmp_path / "ckpt"), {"params": p, "opt_state": s})
  else:
    data = serialization.to_bytes({"params": p, "opt_state": s})
  op.release(s)
  t2 = tx()
  target = {"params": make(3), "opt_state": t2.init(make(3))}
  if how == "save_checkpoint":
    tree = op.restore_checkpoint(str(tmp_path / "ckpt"), target)
  else:
    tree = serialization.from_bytes(target, data)
  p2, s2 = train(t2, tree["opt_state"], tree["params"], 6, 6, fused=False)
  assert_same_run(p2, s2, full_p, full_s)
  op.release((s2, full_s))


def test_flax_from_state_dict_checks_like_an_import():
  from flax import serialization

  tx, state, _ = exported_after()
  saved = serialization.to_state_dict(state)
  op.release(state)
  with pytest.raises(ValueError, match=r"needs the state dict of an exported 8-bit state"):
    serialization.from_state_dict(tx.init(make(0)), {"count": 2, "handle": 7})
  bad = {**saved, "absmax1": {**saved["absmax1"], "w": -np.asarray(saved["absmax1"]["w"]) - 1}}
  with pytest.raises(ValueError, match=r"\['w'\]: absmax1 has \d+ values that are not finite"):
    serialization.from_state_dict(tx.init(make(0)), bad)
  other = op.paged_adamw8bit(1e-3, min_8bit_size=1000)
  wide = {**make(0), "u": jax.numpy.zeros((9000,))}
  with pytest.raises(ValueError, match=r"leaf \['u'\]: state1 must be uint8\[9000\]"):
    serialization.from_state_dict(other.init(wide), saved)


# -- corruption and imports: checked, not trusted --------------------------------------


def test_flipped_bytes_in_any_file_restore_exactly_or_fail_clearly(tmp_path):
  tx = optimizer("paged")
  params, state = train(tx, tx.init(make(0)), make(0), 3, 0)
  op.save_checkpoint(str(tmp_path / "ckpt"), {"params": params, "opt_state": state})
  files = sorted(p for p in (tmp_path / "ckpt").rglob("*") if p.is_file() and p.stat().st_size)
  assert files
  want = [
    np.asarray(x) for x in jax.tree.leaves(op.export_state({"params": params, "opt_state": state}))
  ]
  outcomes = {"exact": 0, "refused": 0}
  rng = np.random.default_rng(0)
  for path in files:
    original = path.read_bytes()
    for _ in range(3):
      data = bytearray(original)
      for i in rng.choice(len(data), size=min(2, len(data)), replace=False):
        data[i] ^= 0xFF
      path.write_bytes(bytes(data))
      try:
        restored = op.restore_checkpoint(
          str(tmp_path / "ckpt"), {"params": make(0), "opt_state": tx.init(make(0))}
        )
      except (ValueError, FileNotFoundError) as e:
        assert "restore_checkpoint" in str(e) or "import_state" in str(e), e
        outcomes["refused"] += 1
      else:
        got = [np.asarray(x) for x in jax.tree.leaves(op.export_state(restored))]
        for a, b in zip(got, want, strict=True):
          assert_bit_equal(a, b, f"restored silently after flipping bytes of {path.name}")
        outcomes["exact"] += 1
        op.release(restored)
    path.write_bytes(original)
  assert outcomes["refused"] > 0
  op.release(state)


def test_a_flipped_code_fails_with_the_leaf_path(tmp_path):
  import orbax.checkpoint as ocp

  tx = optimizer("paged")
  _, state = train(tx, tx.init(make(0)), make(0), 2, 0)
  op.save_checkpoint(str(tmp_path / "ckpt"), state)
  # Rewrite one array the way a bit flip in its data would change it.
  with ocp.StandardCheckpointer() as checkpointer:
    payload = checkpointer.restore(str(tmp_path / "ckpt"))
  codes = np.asarray(payload["tree"]["state1"]["w"]).copy()
  codes[3, 7] ^= 0x10
  payload["tree"]["state1"]["w"] = codes
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "edited"), payload)
  with pytest.raises(ValueError, match=r"data of \.state1\['w'\] .* do not match the checksum"):
    op.restore_checkpoint(str(tmp_path / "edited"), tx.init(make(0)))
  op.release(state)


def test_a_checkpoint_with_one_checksum_per_leaf_still_restores(tmp_path):
  """Checkpoints written before the checksums became one array (one uint32
  scalar per leaf) restore, checked as before."""
  import orbax.checkpoint as ocp

  from optax_paged8bit import checkpoint

  tx = optimizer("paged")
  p, state = train(tx, tx.init(make(0)), make(0), 3, 0)
  exported = op.export_state(state)
  sums = jax.tree.map(lambda x: np.asarray(checkpoint._checksum(x), np.uint32), exported)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "old"), {"tree": exported, "checksums": sums})
  restored = op.restore_checkpoint(str(tmp_path / "old"), tx.init(p))
  for a, b in zip(exported_leaves(restored), exported_leaves(state), strict=True):
    assert_bit_equal(a, b, "state")
  sums = jax.tree.map(lambda x: x, sums)
  sums.state2["w"] = np.asarray(sums.state2["w"] ^ np.uint32(1), np.uint32)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "edited"), {"tree": exported, "checksums": sums})
  with pytest.raises(ValueError, match=r"data of \.state2\['w'\] .* do not match the checksum"):
    op.restore_checkpoint(str(tmp_path / "edited"), tx.init(p))
  op.release((state, restored))


def exported_after(steps=2):
  tx = optimizer("paged")
  _, state = train(tx, tx.init(make(0)), make(0), steps, 0)
  return tx, state, op.export_state(state)


@pytest.mark.parametrize(
  ("edit", "match"),
  [
    (
      lambda e: e._replace(absmax1={**e.absmax1, "w": -e.absmax1["w"] - 1}),
      r"\['w'\]: absmax1 has \d+ values that are not finite, >= 0 and at most",
    ),
    (
      lambda e: e._replace(absmax2={**e.absmax2, "u": e.absmax2["u"].at[2].set(np.nan)}),
      r"\['u'\]: absmax2 has 1 values that are not finite",
    ),
    (
      lambda e: e._replace(state2={**e.state2, "b": e.state2["b"].at[0].set(-1.0)}),
      r"\['b'\]: state2 has 1 values that are not finite and >= 0",
    ),
    (
      lambda e: e._replace(state1={**e.state1, "b": e.state1["b"].at[0].set(np.inf)}),
      r"\['b'\]: state1 has 1 values that are not finite",
    ),
    (lambda e: e._replace(count=jax.numpy.int32(-1)), r"count must be in 0..2147483646, got -1"),
    (
      lambda e: e._replace(count=jax.numpy.int32(2**31 - 1)),
      r"count must be in 0..2147483646, got 2147483647",
    ),
    (
      lambda e: e._replace(count=jax.numpy.float32(5.5)),
      r"count must be an integer, got float32 5.5",
    ),
    (lambda e: e._replace(qmap1=e.qmap1[:10]), r"qmap1 and qmap2 must be float32\[256\]"),
  ],
  ids=["neg-scale", "nan-scale", "neg-v", "inf-m", "neg-count", "max-count", "float-count", "qmap"],
)
def test_import_checks_values_and_names_the_leaf(edit, match):
  tx, state, exported = exported_after()
  with pytest.raises(ValueError, match=match):
    op.import_state(tx.init(make(0)), edit(exported))
  op.release(state)


def test_an_import_never_lets_an_older_state_object_step():
  tx, state, exported = exported_after(2)
  _, older = train(tx, tx.init(make(0)), make(0), 2, 0)  # count 2 ...
  _, newer = train(tx, older, make(0), 1, 2)  # ... advanced to 3: `older` is stale now
  imported = op.import_state(newer, exported)  # count 2 again, in a new slot
  assert int(imported.handle) not in (int(older.handle), int(newer.handle))
  with pytest.raises(Exception, match="stale optimizer state"):
    jax.block_until_ready(jax.jit(tx.fused_update)(make(102), older, make(0)))
  p, _ = jax.jit(tx.fused_update)(make(102), imported, make(0))  # the import steps on its own
  p_ref, _ = jax.jit(tx.fused_update)(make(102), state, make(0))
  assert_bit_equal(np.asarray(p["w"]), np.asarray(p_ref["w"]), "imported")


@pytest.mark.parametrize(
  ("edit", "match"),
  [
    (
      lambda e: e._replace(absmax1={**e.absmax1, "w": e.absmax1["w"].at[0].set(3e38)}),
      r"\['w'\]: absmax1 has 2 values that are not finite, >= 0 and at most 7.56e\+22",
    ),
    (
      lambda e: e._replace(state1={**e.state1, "b": e.state1["b"].at[0].set(-1e30)}),
      r"\['b'\]: state1 has 1 values that are not finite and at most 7.56e\+22 in magnitude",
    ),
    (
      lambda e: e._replace(gnorm_vec=e.gnorm_vec.at[1, 3].set(np.nan)),
      r"leaf \['u'\]: its clipping ring \(gnorm_vec\) holds 1 values that are not finite and >= 0",
    ),
    (
      lambda e: e._replace(gnorm_vec=e.gnorm_vec.at[0, 0].set(-1.0)),
      r"leaf \['b'\]: its clipping ring \(gnorm_vec\) holds 1 values",
    ),
    (
      lambda e: e._replace(gnorm_vec=e.gnorm_vec.at[2, 9].set(np.inf)),
      r"leaf \['w'\]: its clipping ring \(gnorm_vec\) holds 1 values",
    ),
    (lambda e: e._replace(layout=None), r"the exported state's layout is None, not the Layout"),
    (
      lambda e: e._replace(state1=list(e.state1.values())),
      r"state1 does not have the params' tree structure",
    ),
    (
      lambda e: e._replace(state1={**e.state1, "w": {"nested": e.state1["w"]}}),
      r"leaf \['w'\]: state1 must be uint8\[1024, 512\], got a dict",
    ),
    (
      lambda e: e._replace(state2={**e.state2, "w": np.asarray(e.state2["w"]).tolist()}),
      r"leaf \['w'\]: state2 must be uint8\[1024, 512\], got a list",
    ),
  ],
  ids=[
    "huge-scale",
    "huge-m",
    "nan-ring",
    "neg-ring",
    "inf-ring",
    "no-layout",
    "list",
    "nested",
    "list-codes",
  ],
)
def test_an_import_refuses_what_no_step_produces_and_containers_that_are_no_arrays(edit, match):
  tx = op.paged_adamw8bit(1e-3, min_8bit_size=1000, percentile_clipping=5)
  _, state = train(tx, tx.init(make(0)), make(0), 2, 0)
  exported = op.export_state(state)
  with pytest.raises(ValueError, match=match):
    op.import_state(tx.init(make(0)), edit(exported))
  op.release(state)


def test_a_ring_of_zeros_imports_a_run_of_zero_grads_can_make_it():
  tx = op.paged_adamw8bit(1e-3, min_8bit_size=1000, percentile_clipping=5)
  _, state = train(tx, tx.init(make(0)), make(0), 2, 0)
  exported = op.export_state(state)
  imported = op.import_state(tx.init(make(0)), exported._replace(gnorm_vec=0 * exported.gnorm_vec))
  op.release((state, imported))


def test_save_refuses_what_restore_would_refuse_naming_the_leaf(tmp_path):
  tx = op.adamw8bit(1e-3, min_8bit_size=1000)
  params, state = train(tx, tx.init(make(0)), make(0), 2, 0)
  edited = state._replace(absmax1={**state.absmax1, "u": state.absmax1["u"].at[0].set(np.inf)})
  with pytest.raises(ValueError, match=r"save_checkpoint: leaf \['u'\]: absmax1 has 1 values"):
    op.save_checkpoint(str(tmp_path / "c"), {"params": params, "opt_state": edited})
  with pytest.raises(
    ValueError, match=r"leaf \['tokens'\] is the Python int 2361183241434822606848"
  ):
    op.save_checkpoint(str(tmp_path / "c"), {"opt_state": state, "tokens": 2**71})
  assert not (tmp_path / "c").exists()


# -- every state the library produces saves and restores ---------------------------

# A tree with every kind of leaf: 8-bit, float32 moments, empty, 0-d, and None
# (a frozen or absent submodule).
EVERY_KIND = {"w": (64, 512), "frozen": None, "empty": (0,), "scalar": (), "small": (10,)}


def every_kind_params(seed):
  rng = np.random.default_rng(seed)
  return {
    k: None if s is None else jax.numpy.asarray((rng.standard_normal(s) * 0.1).astype(np.float32))
    for k, s in EVERY_KIND.items()
  }


def spiky_grads(t):
  """Grads with finite spikes at step 1 that overflow their second moments."""
  g = every_kind_params(200 + t)
  if t == 1:
    g["w"] = g["w"].at[3, 7].set(1e25).at[9, 1].set(-3.4e38)
    g["small"] = g["small"].at[2].set(2e19)
    g["scalar"] = jax.numpy.float32(-6e20)
  return g


@pytest.mark.parametrize("via", ["save_checkpoint", "flax.serialization"])
@pytest.mark.parametrize("kind", ["paged", "arrays"])
def test_every_state_saves_and_restores_bit_identically(tmp_path, kind, via):
  from flax import serialization

  factory = {"paged": op.paged_adamw8bit, "arrays": op.adamw8bit}[kind]
  tx = factory(1e-3, percentile_clipping=5)
  step = jax.jit(tx.fused_update)
  params, state = every_kind_params(0), tx.init(every_kind_params(0))
  for t in range(3):
    params, state = step(spiky_grads(t), state, params)
  extra = {"tokens": 5_000_000_000, "ema": np.float64(0.1) + 2e-17, "seen": np.arange(3) + 2**40}
  tree = {"params": params, "opt_state": state, **extra}
  target = {"params": every_kind_params(9), "opt_state": tx.init(every_kind_params(9)), **extra}
  if via == "save_checkpoint":
    op.save_checkpoint(str(tmp_path / "c"), tree)
    restored = op.restore_checkpoint(str(tmp_path / "c"), target)
  else:
    restored = serialization.from_bytes(target, serialization.to_bytes(tree))
  assert restored["tokens"] == 5_000_000_000 and restored["ema"] == extra["ema"]
  a = (params, state)
  b = (restored["params"], restored["opt_state"])
  for t in range(3, 5):
    a = step(spiky_grads(t), a[1], a[0])
    b = step(spiky_grads(t), b[1], b[0])
  for x, y in zip(
    jax.tree.leaves(op.export_state(a)), jax.tree.leaves(op.export_state(b)), strict=True
  ):
    assert_bit_equal(np.asarray(x), np.asarray(y), "resumed")
  if kind == "paged":
    op.release((a, b, tree))


def test_checksums_cover_every_bit_of_64_bit_leaves(tmp_path):
  """float64 and int64 leaves (x64 on), numpy's 64-bit values and Python
  ints: a flipped low bit, or a value that differs only above bit 31, is a
  different checksum."""
  from optax_paged8bit import checkpoint

  with jax.enable_x64(True):
    for a, b in [
      (np.float64(0.2), np.float64(0.2000000000000001)),
      (np.int64(5), np.int64(5 + 2**32)),
      (5, 5 + 2**32),
      (jax.numpy.asarray(0.2), jax.numpy.asarray(0.2000000000000001)),
      (jax.numpy.asarray([5], jax.numpy.int64), jax.numpy.asarray([5 + 2**32], jax.numpy.int64)),
    ]:
      assert int(checkpoint._checksum(a)) != int(checkpoint._checksum(b)), (a, b)
    # The device and the host give the same checksum for the same bytes.
    for x in (np.linspace(0, 1, 9), np.arange(7, dtype=np.int64) * 2**40):
      assert int(checkpoint._checksum(x)) == int(checkpoint._checksum(jax.numpy.asarray(x)))
    tx = op.paged_adamw8bit(1e-3)
    params = {"w": jax.numpy.ones((64, 512), jax.numpy.float32)}
    p, state = tx.fused_update(params, tx.init(params), params)
    tree = {"params": p, "opt_state": state, "ema": jax.numpy.asarray(0.2, jax.numpy.float64)}
    op.save_checkpoint(str(tmp_path / "c"), tree)
    edited = {**tree, "ema": jax.numpy.asarray(0.2000000000000001, jax.numpy.float64)}
    target = {**edited, "opt_state": tx.init(params)}
    restored = op.restore_checkpoint(str(tmp_path / "c"), target)
    assert float(restored["ema"]) == 0.2  # as written, every bit
    op.release((state, restored))
