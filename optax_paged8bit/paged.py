"""paged_adamw8bit: bitsandbytes' PagedAdamW8bit as an optax transformation,
its 8-bit moments in the extension's registry (CUDA managed memory on a GPU).

The optax state holds the step count, the registry handle, the
percentile-clipping ring and the static layout. `init` is pure: the handle is
a fresh token that means "no moments yet", so a jitted, vmapped or eval_shape
init gives a state that trains on its own, like an eager one. The first
update allocates the slot and returns the registry handle as an output of the
custom call, next to the count; from then on each state object is single-use
(the moments advance in place), and a stale one fails with a readable error.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_paged8bit import _calls, _collector, _ffi
from optax_paged8bit._contract import (
  build_layout,
  check_mask,
  check_state_layout,
  optax_spellings,
  validate,
)
from optax_paged8bit._layout import (
  HANDLE_DTYPE,
  Layout,
  initial_rings,
  replicated,
  rings_operand,
)
from optax_paged8bit._transform import (
  NotParams,
  PagedGradientTransformation,
  inside_optax_multisteps,
  is_params_placeholder,
  step_inputs,
  transformation,
)
from optax_paged8bit.quantization import DEFAULT_MIN_8BIT_SIZE


class PagedAdamW8bitState(NamedTuple):
  """State of `paged_adamw8bit`; the moments themselves are in the registry."""

  count: jax.Array  # int32[], number of updates applied; also orders the calls
  handle: jax.Array  # uint32[]: init's fresh token, then the registry key of the
  # state's slots (with sharded params each device's buffer holds its own key)
  gnorm_vec: jax.Array | None  # float32[num_leaves, 100]: squared grad norms of
  # the last 100 steps per leaf (percentile clipping); None when clipping is off
  layout: Layout  # static per-leaf structure


def fresh_state(layout: Layout) -> PagedAdamW8bitState:
  """A state with no moments yet (what init returns)."""
  device = replicated(layout)
  return PagedAdamW8bitState(
    count=jnp.zeros([], jnp.int32, device=device),
    handle=jnp.full([], layout.fresh_token, HANDLE_DTYPE, device=device),
    gnorm_vec=initial_rings(layout),
    layout=layout,
  )


def paged_adamw8bit(
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
  r"""AdamW with 8-bit blockwise moments in paged memory (bitsandbytes' PagedAdamW8bit).

  Per leaf and step, with :math:`t` the 1-based step and :math:`q_1, q_2` the
  dynamic maps, the dequantized moments are updated as

  .. math::
    m &= \beta_1\, q_1[c_1] a_1 + (1 - \beta_1)\, g \\
    v &= \beta_2\, q_2[c_2] a_2 + (1 - \beta_2)\, g^2 \\
    p &\leftarrow p - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
       \frac{m}{\sqrt{v} + \epsilon \sqrt{1-\beta_2^t}},
    \quad p \leftarrow (1 - \eta\lambda)\, p

  then requantized to codes :math:`c_1, c_2` with one float32 scale
  :math:`a = \max|\cdot|` per block of 256 elements. Weight decay comes after
  the step (bitsandbytes' order). Leaves with fewer than `min_8bit_size`
  elements keep float32 moments. A non-finite gradient element leaves its
  param unchanged and resets its moments, on every leaf.

  Args:
    lr: learning rate (default 1e-3), a float or an optax schedule of the
      step count. A traced value a step cannot run with (a schedule's NaN or
      negative lr) skips the step: params and moments stay, the count
      advances.
    betas: (beta1, beta2) (default (0.9, 0.999)), each in [0, 1).
    eps: added to the bias-corrected denominator, finite and >= 0.
    weight_decay: decoupled weight decay, finite and >= 0, with lr *
      weight_decay <= 1.
    amsgrad: must be False (kept for bitsandbytes' signature).
    optim_bits: must be 32 (kept for bitsandbytes' signature; the state is
      8-bit regardless; pass ``args={'optim_bits': 32}`` for float32 moments).
    args: None, or a mapping/object whose ``optim_bits`` (8 or 32),
      ``min_8bit_size``, ``percentile_clipping`` and ``block_wise`` override
      the keywords, as bitsandbytes' ``args`` does.
    min_8bit_size: leaves with fewer elements keep float32 moments.
    percentile_clipping: 1..100; below 100, each leaf's gradient is scaled
      down to this percentile of its last 100 gradient norms.
    block_wise: one scale per 256 elements (True) or one per leaf (False).
    mask: optax-style pytree of bools (or callable of the params) that marks
      the leaves that get weight decay.
    learning_rate: optax's spelling of `lr`, as a keyword. Under
      ``optax.inject_hyperparams`` the state's ``hyperparams`` then holds
      ``'learning_rate'``, which schedule tools read and write.
    b1: optax's spelling of ``betas[0]``, as a keyword.
    b2: optax's spelling of ``betas[1]``, as a keyword. Both spellings of
      one argument may be given only with the same value (else ValueError).

  Returns:
    A :class:`PagedGradientTransformation` (an optax
    ``GradientTransformationExtraArgs`` with ``fused_update``). Its
    ``update`` needs ``params`` and returns updates that
    ``optax.apply_updates`` turns into exactly the new params. ``init`` is
    pure (eager, jitted, vmapped or under ``eval_shape``, every state trains
    on its own). Each state that an update returned can be updated once (the
    moments advance in place); use :func:`accumulate_gradients` instead of
    ``optax.MultiSteps``, and :func:`adamw8bit` under ``jax.vmap``. The
    moments' memory is freed by :func:`release`, or by the collector once no
    live ``jax.Array`` holds the state's handle (:func:`collect`). Save
    states with :func:`save_checkpoint` or :func:`export_state`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_paged8bit import paged_adamw8bit
    >>> params = {"w": jnp.ones((64, 128))}
    >>> tx = paged_adamw8bit(2e-4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022.
    Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019.
  """
  who = "paged_adamw8bit"
  lr, betas = optax_spellings(who, lr, betas, learning_rate, b1, b2)
  # adamw8bit (functional.py) builds itself the same way, over its own state.
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

  def init_fn(params: optax.Params) -> PagedAdamW8bitState:
    if is_params_placeholder(params):
      # optax.tree.map_params: no part of the state is params-shaped.
      rings = jnp.zeros([0, 0]) if config.percentile_clipping != 100 else None
      return PagedAdamW8bitState(
        jnp.zeros([], jnp.int32), jnp.zeros([], HANDLE_DTYPE), rings, NotParams()
      )
    layout = build_layout(who, config, mask, params)
    _collector.ensure_started()
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
      # An eager init frees the states that are gone (it dispatches nothing
      # while it looks, so it can see every state being stepped).
      _collector.look_now()
    return fresh_state(layout)

  def step(updates, state, params, write_params):
    layout = check_state_layout(
      who, config, state, PagedAdamW8bitState, {"count": jnp.int32, "handle": HANDLE_DTYPE}
    )
    _collector.ensure_started()
    if inside_optax_multisteps():
      raise ValueError(
        "paged_adamw8bit cannot run inside optax.MultiSteps: MultiSteps runs the inner update on "
        "every micro-step and keeps or discards its new state afterwards, but a paged state is "
        "advanced in place, so it would be corrupted. Accumulate with "
        "optax_paged8bit.accumulate_gradients(tx, every_k_steps), or use adamw8bit."
      )
    inputs = step_inputs(
      who, config, layout, updates, params, state.count, lr, betas, eps, weight_decay
    )
    check_mask(who, mask, layout, inputs.params)
    concrete = all(
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
      for x in (state.handle, state.count)
    )
    if concrete and layout.mesh is None:
      _ffi.check_call("update", state.handle, state.count, layout)  # eager: fail before the call
    handle, count, rings, outs = _calls.update(
      layout,
      state.handle,
      state.count,
      config.structure_operand(),
      inputs.hyper,
      rings_operand(layout, state.gnorm_vec),
      inputs.grads,
      inputs.params,
      write_params,
    )
    out_def = inputs.params_def if write_params else inputs.grads_def
    new_state = PagedAdamW8bitState(count, handle, rings if layout.clipping else None, layout)
    return out_def.unflatten(outs), new_state

  return transformation(init_fn, step)
