"""Every error path of the contract, matched by its message."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import raises_at_runtime, settled_registry_bytes

import optax_paged8bit as op

PARAMS = {"w": jnp.zeros((64, 80)), "b": jnp.zeros((10,))}
GRADS = {"w": jnp.ones((64, 80)), "b": jnp.ones((10,))}


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    (dict(amsgrad=True), ValueError, "amsgrad=True is not supported"),
    (dict(optim_bits=8), ValueError, "optim_bits must be 32, got 8"),
    (dict(lr=-1e-3), ValueError, r"lr must be finite and >= 0, got -0.001"),
    (dict(lr=float("nan")), ValueError, "lr must be finite and >= 0, got nan"),
    (dict(lr=float("inf")), ValueError, "lr must be finite and >= 0, got inf"),
    (dict(lr="abc"), TypeError, r"lr must be a float or an optax schedule .*, got 'abc'"),
    (dict(learning_rate="x"), TypeError, r"learning_rate must be a float or an optax schedule"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate must be finite and >= 0, got -1.0"),
    (dict(b1=1.0), ValueError, r"b1 must be in \[0, 1\), got 1.0"),
    (dict(b2="x"), TypeError, "b2 must be a real number, got 'x'"),
    (dict(lr=[1e-3]), TypeError, r"lr must be a real number, got \[0.001\]"),
    (dict(eps=-1.0), ValueError, "eps must be finite and >= 0, got -1.0"),
    (dict(eps=float("inf")), ValueError, "eps must be finite and >= 0, got inf"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
    (dict(betas=(0.9, "x")), TypeError, r"betas\[1\] must be a real number, got 'x'"),
    (dict(betas=0.9), ValueError, "betas must be a pair"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be finite and >= 0, got -0.1"),
    (dict(weight_decay=float("nan")), ValueError, "weight_decay must be finite and >= 0, got nan"),
    (
      dict(lr=1e-3, weight_decay=1e6),
      ValueError,
      r"weight_decay=1000000.0 with lr=0.001 gives the decay factor .* -999.*at most 1",
    ),
    (dict(percentile_clipping=0), ValueError, r"percentile_clipping must be an integer in 1..100"),
    (
      dict(percentile_clipping=101),
      ValueError,
      r"percentile_clipping must be an integer in 1..100",
    ),
    (dict(percentile_clipping=50.5), ValueError, "percentile_clipping must be an integer"),
    (dict(percentile_clipping="90"), TypeError, "percentile_clipping must be a real number"),
    (dict(min_8bit_size=-1), ValueError, r"min_8bit_size must be an integer in 0..2147483647"),
    (dict(block_wise="yes"), TypeError, "block_wise must be a real number"),
    (dict(block_wise=1), ValueError, "block_wise must be a Python bool"),
    (dict(args={"max_unorm": 0.5}), ValueError, r"args.max_unorm=0.5 is not supported"),
    (dict(args={"batch_size": 32}), ValueError, "args.batch_size is not an option"),
    (dict(args={"optim_bits": 16}), ValueError, "args.optim_bits must be 8 or 32, got 16"),
    (
      dict(args={"percentile_clipping": 0}),
      ValueError,
      "percentile_clipping must be an integer in 1..100",
    ),
  ],
)
@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
def test_construction_errors_name_the_argument(factory, kwargs, error, match):
  with pytest.raises(error, match=f"{factory.__name__}: {match}"):
    factory(**kwargs)


def test_args_object_overrides_keywords():
  args = types.SimpleNamespace(
    optim_bits=8, min_8bit_size=100, percentile_clipping=5, block_wise=False, max_unorm=0.0
  )
  state = op.paged_adamw8bit(1e-3, args=args).init(PARAMS)
  assert state.layout.min_8bit_size == 100 and state.layout.percentile_clipping == 5
  assert state.layout.leaf_flags == (2, 3) and not state.layout.block_wise
  with pytest.raises(TypeError, match="args must be None, a mapping or an object"):
    op.paged_adamw8bit(args=3)


def test_int_params_name_the_leaf():
  with pytest.raises(TypeError, match=r"param \['layer'\]\['idx'\] has dtype int32"):
    op.paged_adamw8bit().init({"layer": {"idx": jnp.zeros(5, jnp.int32), "w": jnp.zeros(5)}})


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
def test_python_float_params_fail_at_init_naming_the_leaf(factory):
  with pytest.raises(TypeError, match=r"param \['scale'\] is a float, not an array"):
    factory().init({"scale": 1.0, "w": jnp.zeros(5)})


def test_grad_dtype_must_equal_param_dtype():
  params = {"w": jnp.zeros((64, 80), jnp.bfloat16)}
  tx = op.paged_adamw8bit()
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"grad \['w'\] has dtype float32 but its param has bfloat16"):
    tx.update({"w": jnp.ones((64, 80), jnp.float32)}, state, params)


def test_param_dtype_must_match_the_state():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  p16 = jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS)
  with pytest.raises(TypeError, match=r"param \['b'\] has dtype float16, but the state"):
    tx.update(jax.tree.map(lambda x: x.astype(jnp.float16), GRADS), state, p16)


def test_wrong_shapes_name_the_leaf():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"leaf \['w'\]: param shape \(64, 80\) and grad shape"):
    tx.update({"w": jnp.ones((80, 64)), "b": jnp.ones(10)}, state, PARAMS)


def test_wrong_tree_structure():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with pytest.raises(
    ValueError,
    match=r"grads do not have the tree structure .* \(1 leaves against 2\): the grads have a "
    r"leaf at \['w'\] where the params have \['b'\]",
  ):
    tx.update({"w": jnp.ones((64, 80))}, state, PARAMS)


TWO = {"a": jnp.zeros((64, 80)), "b": jnp.zeros((64, 80))}


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused_update"])
def test_grads_keyed_differently_are_refused_and_the_state_stays_usable(factory, fused):
  # Same leaf count, shapes and dtypes; only the keys differ: param 'a' would
  # receive the gradient of 'b'.
  tx = factory(1e-3)
  state = tx.init(TWO)
  grads = {"b": jnp.ones((64, 80)), "x": jnp.ones((64, 80))}
  step = tx.fused_update if fused else tx.update
  with pytest.raises(
    ValueError, match=r"the grads have a leaf at \['b'\] where the params have \['a'\]"
  ):
    step(grads, state, TWO)
  with pytest.raises(ValueError, match=r"the params have a leaf at \['x'\] where the params have"):
    step({"a": jnp.ones((64, 80)), "b": jnp.ones((64, 80))}, state, {"a": TWO["a"], "x": TWO["b"]})
  with pytest.raises(ValueError, match=r"the grads have an extra leaf at \['c'\]"):
    step({**TWO, "c": jnp.ones(3)}, state, TWO)
  _, state = step(jax.tree.map(jnp.ones_like, TWO), state, TWO)  # still usable
  assert int(state.count) == 1


def test_grads_as_plain_arrays_of_nnx_variables_are_accepted():
  from flax import nnx

  params = nnx.State({"a": nnx.Param(jnp.zeros((64, 80))), "b": nnx.Param(jnp.zeros(10))})
  tx = op.paged_adamw8bit(1e-3)
  state = tx.init(params)
  grads = {"a": jnp.ones((64, 80)), "b": jnp.ones(10)}
  _, state = tx.update(grads, state, params)
  assert int(state.count) == 1
  with pytest.raises(
    ValueError, match=r"the grads have a leaf at \['c'\] where the params have \['b'\]"
  ):
    tx.update({"a": jnp.ones((64, 80)), "c": jnp.ones(10)}, state, params)


def test_update_without_params():
  tx = op.paged_adamw8bit()
  with pytest.raises(ValueError, match=r"update needs the params"):
    tx.update(GRADS, tx.init(PARAMS))


def test_state_of_another_transformation():
  tx = op.paged_adamw8bit()
  with pytest.raises(TypeError, match="expected the opt_state returned by paged_adamw8bit"):
    tx.update(GRADS, optax.adam(1e-3).init(PARAMS), PARAMS)


def test_state_of_an_optimizer_with_another_layout():
  state = op.paged_adamw8bit(min_8bit_size=100).init(PARAMS)
  with pytest.raises(ValueError, match="opt_state was built with min_8bit_size=100, this update"):
    op.paged_adamw8bit().update(GRADS, state, PARAMS)


@pytest.mark.parametrize("factory", [op.paged_adamw8bit, op.adamw8bit])
@pytest.mark.parametrize("fused", [False, True], ids=["update", "fused_update"])
def test_a_step_with_another_mask_than_the_states_names_the_leaf(factory, fused):
  state = factory(mask={"w": True, "b": True}).init(PARAMS)
  other = factory(mask=lambda p: {"w": True, "b": False})
  step = other.fused_update if fused else other.update
  with pytest.raises(ValueError, match=r"leaf \['b'\] has weight decay on in this opt_state"):
    step(GRADS, state, PARAMS)
  same = factory(mask=lambda p: jax.tree.map(lambda _: True, p))  # the same mask, as a callable
  step = same.fused_update if fused else same.update
  jax.block_until_ready(step(GRADS, state, PARAMS))


def test_bad_mask():
  with pytest.raises(ValueError, match="mask must be a pytree of bools"):
    op.paged_adamw8bit(mask={"w": True, "x": True}).init(PARAMS)
  with pytest.raises(ValueError, match="mask leaves must be Python bools"):
    op.paged_adamw8bit(mask={"w": 1.0, "b": True}).init(PARAMS)


def test_unknown_and_foreign_handles():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  # Below 2**28 no process hands out a handle; this one restored a checkpoint
  # that held only count and handle.
  with raises_at_runtime(r"was not created in this process.*save_checkpoint"):
    jax.block_until_ready(
      tx.update(GRADS, state._replace(handle=jnp.uint32(10**6), count=jnp.int32(3)), PARAMS)
    )
  # A fresh token of another layout (another optimizer's init).
  with raises_at_runtime("made by init for other params"):
    jax.block_until_ready(tx.update(GRADS, state._replace(handle=jnp.uint32(2**31 + 5)), PARAMS))
  other_params = {"w": jnp.zeros((64, 80)), "b": jnp.zeros((20,))}
  other_tx = op.paged_adamw8bit()
  _, other = other_tx.update(
    {"w": jnp.ones((64, 80)), "b": jnp.ones(20)}, other_tx.init(other_params), other_params
  )
  # The same layout type but another optimizer's slot: caught by the registry.
  forged = state._replace(handle=other.handle, count=other.count)
  with raises_at_runtime("belongs to an optimizer over different parameters"):
    jax.block_until_ready(tx.update(GRADS, forged, PARAMS))


def test_state_scalars_of_the_wrong_type():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with pytest.raises(TypeError, match=r"handle must be a scalar of dtype uint32, got int32\[\]"):
    tx.update(GRADS, state._replace(handle=jnp.int32(1)), PARAMS)
  with pytest.raises(TypeError, match=r"count must be a scalar of dtype int32, got int32\[2\]"):
    tx.update(GRADS, state._replace(count=jnp.zeros(2, jnp.int32)), PARAMS)
  arrays = op.adamw8bit()
  with pytest.raises(TypeError, match=r"count must be a scalar of dtype int32, got float32\[\]"):
    arrays.update(GRADS, arrays.init(PARAMS)._replace(count=jnp.float32(0)), PARAMS)


def test_fresh_handle_with_a_count_names_the_right_way_to_save():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with raises_at_runtime(r"no stored moments .* count is 5.*save_checkpoint"):
    jax.block_until_ready(tx.update(GRADS, state._replace(count=jnp.int32(5)), PARAMS))


def test_import_checks_what_it_loads():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  exported = op.export_state(state)
  bad = exported._replace(state1={**exported.state1, "w": jnp.zeros(5)})
  with pytest.raises(ValueError, match=r"leaf \['w'\]: state1 must be uint8\[64, 80\]"):
    op.import_state(state, bad)
  other = op.export_state(op.paged_adamw8bit(block_wise=False).init(PARAMS))
  with pytest.raises(ValueError, match="saved state has block_wise=False"):
    op.import_state(state, other)
  with pytest.raises(TypeError, match="expected an Adam8bitState"):
    op.import_state(state, state)


def test_host_functions_need_concrete_states():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"call it outside jax\.jit"):
    jax.jit(op.release)(state)


def test_accumulate_gradients_checks_k():
  with pytest.raises(ValueError, match="every_k_steps must be an int >= 1, got 0"):
    op.accumulate_gradients(op.paged_adamw8bit(), 0)


def test_a_gpu_without_nvrtc_says_what_to_install(monkeypatch):
  monkeypatch.setenv("OPTAX_PAGED8BIT_NVRTC", "/nonexistent/libnvrtc.so.13")
  op._ffi._nvrtc_problem.cache_clear()
  try:
    with pytest.raises(RuntimeError, match=r"NVRTC, which it could not load.*jax\[cuda13\]"):
      op._ffi.check_backend("gpu")
    op._ffi.check_backend("cpu")  # the CPU backend needs none
  finally:
    monkeypatch.delenv("OPTAX_PAGED8BIT_NVRTC")
    op._ffi._nvrtc_problem.cache_clear()


def test_errors_leave_no_state_behind():
  before = settled_registry_bytes()
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError):
    tx.update({"w": jnp.ones((64, 80))}, state, PARAMS)
  assert op._ffi.total_bytes() == before
  np.testing.assert_array_equal(np.asarray(state.count), 0)
