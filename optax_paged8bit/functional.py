"""adamw8bit: bitsandbytes' AdamW8bit, the same step as paged_adamw8bit with
its 8-bit state as ordinary arrays in the optax state (a pure function of the
state). Its state, Adam8bitState, is also what export_state returns for a
paged state: the checkpoint format."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from optax_paged8bit import _calls
from optax_paged8bit._contract import (
  build_layout,
  check_mask,
  check_state_layout,
  optax_spellings,
  validate,
)
from optax_paged8bit._layout import (
  Layout,
  MomentArray,
  initial_rings,
  moment_arrays,
  moments_flat,
  moments_trees,
  replicated,
  rings_operand,
)
from optax_paged8bit._transform import (
  NotParams,
  PagedGradientTransformation,
  is_params_placeholder,
  step_inputs,
  transformation,
)
from optax_paged8bit.quantization import DEFAULT_MIN_8BIT_SIZE, QMAPS


class Adam8bitState(NamedTuple):
  """The 8-bit state as ordinary arrays: adamw8bit's state, and what
  export_state returns for a paged state (the checkpoint format). The
  per-leaf fields are named as in bitsandbytes' state_dict; each is a tree
  shaped like the params."""

  count: jax.Array  # int32[], number of updates applied (bnb's "step")
  qmap1: jax.Array  # float32[256], signed dynamic map of state1
  qmap2: jax.Array  # float32[256], unsigned dynamic map of state2
  state1: Any  # per leaf: uint8 codes of the first moment, shaped like the
  # param (the float32 moment for a leaf with float32 moments)
  state2: Any  # per leaf: uint8 codes of the second moment (or float32)
  absmax1: Any  # per leaf: float32 block scales of state1 (None for a float32
  # leaf); shaped like the param with the last axis / 256 when it divides,
  # else flat (see _layout.moment_arrays)
  absmax2: Any  # per leaf: float32 block scales of state2
  gnorm_vec: jax.Array | None  # float32[num_leaves, 100] clipping ring, or None
  layout: Layout  # static per-leaf structure


def arrays_state(layout: Layout, count: Any, flat: list[Any], gnorm_vec: Any) -> Adam8bitState:
  """An Adam8bitState from the 4 arrays per leaf of the custom calls."""
  device = replicated(layout)
  return Adam8bitState(
    count=count,
    qmap1=jnp.asarray(QMAPS[0], device=device),
    qmap2=jnp.asarray(QMAPS[1], device=device),
    **moments_trees(layout, flat),
    gnorm_vec=gnorm_vec,
    layout=layout,
  )


def zero_moments(layout: Layout) -> list[jax.Array]:
  """The 4 arrays of each leaf of a fresh state, sharded like export's."""

  def zeros(a: MomentArray) -> jax.Array:
    if layout.mesh is None:
      return jnp.zeros(a.shape, a.local.dtype)
    return jnp.zeros(a.shape, a.local.dtype, device=NamedSharding(layout.mesh, a.spec))

  return [zeros(a) for a in moment_arrays(layout)]


def adamw8bit(
  lr: float | optax.ScalarOrSchedule | None = None,
  betas: tuple[float, float] | None = None,
  eps: float = 1e-8,
  weight_decay: float = 1e-2,
  amsgrad: bool = False,
  optim_bits: int = 32,
  args: Any = None,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
  percentile_clipping: int = 100,
  block_wise: bool = True,
  *,
  mask: Any = None,
  learning_rate: float | optax.ScalarOrSchedule | None = None,
  b1: float | None = None,
  b2: float | None = None,
) -> PagedGradientTransformation:
  """8-bit blockwise AdamW with its state as ordinary JAX arrays (bitsandbytes' AdamW8bit).

  The same contract, algorithm and custom call as :func:`paged_adamw8bit`,
  bit for bit; the codes and scales live in the optax state (an
  :class:`Adam8bitState`, the format `export_state` returns) instead of the
  registry. The update is a pure function, so it works where a paged state
  cannot: ``optax.MultiSteps``, ``jnp.where`` selection between states,
  re-running a step, ``jax.vmap`` over an ensemble (each member exactly as in
  a separate run). (``optax.apply_if_finite`` works with both: it runs the
  inner update in a ``lax.cond``.) The state arrays shard like
  the params (see `export_state`), ``optax.tree.map_params`` maps the codes
  as params, and orbax saves the state as it is.

  Args and Returns: as :func:`paged_adamw8bit`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_paged8bit import adamw8bit
    >>> tx = optax.MultiSteps(adamw8bit(2e-4), every_k_schedule=4)
  """
  who = "adamw8bit"
  lr, betas = optax_spellings(who, lr, betas, learning_rate, b1, b2)
  # Deliberately as paged_adamw8bit builds itself: the same public signature
  # (bitsandbytes'), one validate, an init and a step over another state type.
  config = validate(
    who,
    lr,
    betas,
    eps,
    weight_decay,
    amsgrad,
    optim_bits,
    args,
    min_8bit_size,
    percentile_clipping,
    block_wise,
  )

  def init_fn(params: optax.Params) -> Adam8bitState:
    if is_params_placeholder(params):
      # optax.tree.map_params: the codes are params-shaped, the scales are not.
      rings = jnp.zeros([0, 0]) if config.percentile_clipping != 100 else None
      maps = jnp.asarray(QMAPS[0])
      scales = NotParams()
      return Adam8bitState(
        jnp.zeros([], jnp.int32), maps, maps, params, params, scales, scales, rings, NotParams()
      )
    layout = build_layout(who, config, mask, params)
    return arrays_state(
      layout,
      jnp.zeros([], jnp.int32, device=replicated(layout)),
      zero_moments(layout),
      initial_rings(layout),
    )

  def step(updates, state, params, write_params):
    layout = check_state_layout(who, config, state, Adam8bitState, {"count": jnp.int32})
    inputs = step_inputs(
      who, config, layout, updates, params, state.count, lr, betas, eps, weight_decay
    )
    check_mask(who, mask, layout, inputs.params)
    count, rings, outs, new_moments = _calls.update_arrays(
      layout,
      state.count,
      config.structure_operand(),
      inputs.hyper,
      rings_operand(layout, state.gnorm_vec),
      inputs.grads,
      inputs.params,
      moments_flat(layout, state),
      write_params,
    )
    out_def = inputs.params_def if write_params else inputs.grads_def
    new_state = state._replace(
      count=count,
      gnorm_vec=rings if layout.clipping else None,
      **moments_trees(layout, new_moments, like=state),
    )
    return out_def.unflatten(outs), new_state

  return transformation(init_fn, step)
