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
from resume_common import SPECS, make, optimizer, train
from test_oracle import assert_bit_equal

import optax_paged8bit as op

TESTS = os.path.dirname(os.path.abspath(__file__))


def mesh_of(n):
  return jax.sharding.Mesh(np.asarray(mesh_devices(n)), ("x",))


def exported_leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(op.export_state(state))]


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
  for k in full_p:
    assert_bit_equal(np.asarray(p2[k]), np.asarray(full_p[k]), k)
  for a, b in zip(exported_leaves(s2), exported_leaves(full_s), strict=True):
    assert_bit_equal(a, b, "state")
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
      "from resume_common import SHAPES, SPECS, optimizer, train",
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
  for k in full_p:
    assert_bit_equal(np.asarray(p2[k]), np.asarray(full_p[k]), k)
  for a, b in zip(exported_leaves(s2), exported_leaves(full_s), strict=True):
    assert_bit_equal(a, b, "state")
  op.release((s, s2, full_s))
