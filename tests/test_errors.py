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
  ("kwargs", "match"),
  [
    (dict(amsgrad=True), "amsgrad=True is not supported"),
    (dict(optim_bits=8), "optim_bits must be 32, got 8"),
    (dict(lr=-1e-3), r"lr must be >= 0, got -0.001"),
    (dict(lr=float("nan")), "lr must be >= 0, got nan"),
    (dict(eps=-1.0), "eps must be >= 0, got -1.0"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\), got -0.1"),
    (dict(betas=0.9), "betas must be a pair"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(percentile_clipping=0), r"percentile_clipping must be an integer in 1..100, got 0"),
    (dict(percentile_clipping=101), r"percentile_clipping must be an integer in 1..100, got 101"),
    (dict(percentile_clipping=50.5), "percentile_clipping must be an integer"),
    (dict(min_8bit_size=-1), r"min_8bit_size must be an integer >= 0, got -1"),
    (dict(block_wise="yes"), "block_wise must be a Python bool"),
    (dict(args={"max_unorm": 0.5}), r"args.max_unorm=0.5 is not supported"),
    (dict(args={"batch_size": 32}), "args.batch_size is not an option"),
    (dict(args={"optim_bits": 16}), "args.optim_bits must be 8 or 32, got 16"),
    (dict(args={"percentile_clipping": 0}), "percentile_clipping must be an integer in 1..100"),
  ],
)
def test_construction_errors_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    op.paged_adamw8bit(**kwargs)


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
    match="the grads have 1 leaves, but the params this state was initialised with have 2",
  ):
    tx.update({"w": jnp.ones((64, 80))}, state, PARAMS)


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
  with pytest.raises(ValueError, match="built by an optimizer with min_8bit_size=100"):
    op.paged_adamw8bit().update(GRADS, state, PARAMS)


def test_bad_mask():
  with pytest.raises(ValueError, match="mask must be a pytree of bools"):
    op.paged_adamw8bit(mask={"w": True, "x": True}).init(PARAMS)
  with pytest.raises(ValueError, match="mask leaves must be Python bools"):
    op.paged_adamw8bit(mask={"w": 1.0, "b": True}).init(PARAMS)


def test_unknown_and_foreign_handles():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  for unknown in (10**6, 2**31 + 5):  # the registry keys are int32: both are unknown
    with raises_at_runtime("was not created in this process"):
      jax.block_until_ready(tx.update(GRADS, state._replace(handle=jnp.uint32(unknown)), PARAMS))
  other = op.paged_adamw8bit().init({"w": jnp.zeros((64, 80)), "b": jnp.zeros((20,))})
  other_params = {"w": jnp.zeros((64, 80)), "b": jnp.zeros((20,))}
  _, other = op.paged_adamw8bit().update(
    {"w": jnp.ones((64, 80)), "b": jnp.ones(20)}, other, other_params
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


def test_restored_state_without_import():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with raises_at_runtime("must be loaded with optax_paged8bit.import_state"):
    jax.block_until_ready(tx.update(GRADS, state._replace(count=jnp.int32(5)), PARAMS))


def test_import_checks_what_it_loads():
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  exported = op.export_state(state)
  bad = exported._replace(
    moments={**exported.moments, "w": exported.moments["w"]._replace(state1=jnp.zeros(5))}
  )
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


def test_gpu_without_cuda_build_says_how_to_build(monkeypatch):
  monkeypatch.setattr(op._ffi, "BUILT_WITH_CUDA", False)
  with pytest.raises(RuntimeError, match="OPTAX_PAGED8BIT_CUDA=ON pip install"):
    op._ffi.check_backend("gpu")


def test_errors_leave_no_state_behind():
  before = settled_registry_bytes()
  tx = op.paged_adamw8bit()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError):
    tx.update({"w": jnp.ones((64, 80))}, state, PARAMS)
  assert op._ffi.total_bytes() == before
  np.testing.assert_array_equal(np.asarray(state.count), 0)
