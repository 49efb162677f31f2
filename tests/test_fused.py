"""The Flax guide's usage (docs/flax.md): NNX (optax path and fused step) and linen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import optax_paged8bit as op


def make_model(seed=0):
  return nnx.Sequential(
    nnx.Linear(64, 256, rngs=nnx.Rngs(seed)), nnx.relu, nnx.Linear(256, 10, rngs=nnx.Rngs(seed + 1))
  )


def data():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.standard_normal((32, 64)), jnp.float32), jnp.zeros((32, 10))


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def test_nnx_optimizer_and_fused_step_agree():
  x, y = data()
  model = make_model()
  optimizer = nnx.Optimizer(model, op.paged_adamw8bit(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  fused_model = make_model()
  tx = op.paged_adamw8bit(1e-3)
  opt_state = tx.init(nnx.state(fused_model, nnx.Param))

  @nnx.jit
  def fused_train_step(model, opt_state, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    params, opt_state = tx.fused_update(grads, opt_state, nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return loss, opt_state

  # One step: the optax path lands on the fused step's params, except where a
  # step crosses into a lower binade (UpdateFor in csrc/adam8bit.h): there it
  # is off by less than the spacing of the old param.
  train_step(model, optimizer, x, y)
  _, opt_state = fused_train_step(fused_model, opt_state, x, y)
  for a, b in zip(
    jax.tree.leaves(nnx.state(model, nnx.Param)),
    jax.tree.leaves(nnx.state(fused_model, nnx.Param)),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-8)
  losses, fused_losses = [], []
  for _ in range(5):
    losses.append(float(train_step(model, optimizer, x, y)))
    loss, opt_state = fused_train_step(fused_model, opt_state, x, y)
    fused_losses.append(float(loss))
  assert losses[-1] < losses[0] and fused_losses[-1] < fused_losses[0]
  op.release(opt_state)


def test_linen_train_state_style_loop():
  x, y = data()
  model = linen.Sequential([linen.Dense(256), linen.relu, linen.Dense(10)])
  params = model.init(jax.random.PRNGKey(0), x)
  tx = op.paged_adamw8bit(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(5):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  assert float(loss) < first
  op.release(opt_state)


def fused_and_plain_agree(fused_tree, plain_tree, reference_tree):
  """The fused form's params equal the plain fused step's bit for bit, and
  the optax path's within the spacing it rounds to."""
  for a, b, c in zip(
    jax.tree.leaves(fused_tree),
    jax.tree.leaves(reference_tree),
    jax.tree.leaves(plain_tree),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-7)


def test_fused_train_state_and_fused_chain():
  from flax.training import train_state

  x, y = data()
  model = linen.Sequential([linen.Dense(256), linen.relu, linen.Dense(10)])
  params = model.init(jax.random.PRNGKey(0), x)
  grad = jax.grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))

  def make_tx():
    return op.fused_chain(optax.clip_by_global_norm(0.1), op.paged_adamw8bit(1e-3))

  own = jax.tree.map(jnp.copy, params)  # donated below
  fused = op.FusedTrainState.create(apply_fn=model.apply, params=own, tx=make_tx())
  plain = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=make_tx())
  tx = make_tx()
  p_ref, s_ref = params, tx.init(params)
  # The grads come from one jitted function, so that every form gets the
  # same bits (XLA may fuse a gradient differently inside each step).
  grad = jax.jit(grad)
  step_fused = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
  step_plain = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  step_ref = jax.jit(tx.fused_update)
  for _ in range(3):
    fused = step_fused(fused, grad(fused.params))
    plain = step_plain(plain, grad(plain.params))
    p_ref, s_ref = step_ref(grad(p_ref), s_ref, p_ref)
  assert int(fused.step) == 3 and int(fused.opt_state[-1].count) == 3
  fused_and_plain_agree(fused.params, plain.params, p_ref)
  with pytest.raises(TypeError, match="has no fused step"):
    op.FusedTrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3)).apply_gradients(
      grads=params
    )
  with pytest.raises(TypeError, match="last transform must have a fused step"):
    op.fused_chain(op.paged_adamw8bit(), optax.clip(1.0))


def test_fused_nnx_optimizer_matches_the_fused_step():
  x, y = data()
  fused_model, plain_model, ref_model = make_model(), make_model(), make_model()
  fused = op.FusedOptimizer(fused_model, op.paged_adamw8bit(1e-3), wrt=nnx.Param)
  plain = nnx.Optimizer(plain_model, op.paged_adamw8bit(1e-3), wrt=nnx.Param)
  tx = op.paged_adamw8bit(1e-3)
  ref_state = tx.init(nnx.state(ref_model, nnx.Param))

  # The grads come from one jitted function (see test_fused_train_state...).
  grad = nnx.jit(nnx.grad(loss_fn))

  @nnx.jit
  def step(model, optimizer, grads):
    optimizer.update(model, grads)

  @nnx.jit
  def ref_step(model, opt_state, grads):
    params, opt_state = tx.fused_update(grads, opt_state, nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return opt_state

  for _ in range(3):
    step(fused_model, fused, grad(fused_model, x, y))
    step(plain_model, plain, grad(plain_model, x, y))
    ref_state = ref_step(ref_model, ref_state, grad(ref_model, x, y))
  assert int(fused.step[...]) == 3
  fused_and_plain_agree(
    nnx.state(fused_model, nnx.Param),
    nnx.state(plain_model, nnx.Param),
    nnx.state(ref_model, nnx.Param),
  )


@pytest.mark.parametrize("form", ["nnx.Optimizer", "FusedOptimizer"])
@pytest.mark.parametrize("kind", ["paged", "arrays"])
def test_nnx_split_merge_step_equals_the_nnx_jit_step(form, kind):
  # NNX's functional style: nnx.split once, a jax.jit step that merges,
  # updates and returns nnx.state; the optimizer's state travels taken apart
  # into NNX variables and comes back as the same state.
  x, y = data()
  cls = {"nnx.Optimizer": nnx.Optimizer, "FusedOptimizer": op.FusedOptimizer}[form]
  make_tx = {"paged": op.paged_adamw8bit, "arrays": op.adamw8bit}[kind]
  split_model, plain_model = make_model(), make_model()
  graphdef, state = nnx.split((split_model, cls(split_model, make_tx(1e-3), wrt=nnx.Param)))
  plain = cls(plain_model, make_tx(1e-3), wrt=nnx.Param)

  @jax.jit
  def split_step(state):
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, nnx.grad(loss_fn)(model, x, y))
    return nnx.state((model, optimizer))

  @nnx.jit
  def plain_step(model, optimizer):
    optimizer.update(model, nnx.grad(loss_fn)(model, x, y))

  for _ in range(3):
    state = split_step(state)
    plain_step(plain_model, plain)
  model, optimizer = nnx.merge(graphdef, state)
  assert int(optimizer.step[...]) == 3
  for a, b in zip(
    jax.tree.leaves(nnx.state(model, nnx.Param)),
    jax.tree.leaves(nnx.state(plain_model, nnx.Param)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  exported = op.export_state(nnx.state(optimizer))
  for a, b in zip(
    jax.tree.leaves(exported), jax.tree.leaves(op.export_state(nnx.state(plain))), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
