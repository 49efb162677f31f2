"""Gradient accumulation that is safe for paged states."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AccumulateGradientsState(NamedTuple):
  """State of `accumulate_gradients`."""

  mini_step: jax.Array  # int32[], micro-steps since the last update (0..k-1)
  grad_sum: Any  # float32 sums of the micro-step grads, shaped like the params
  inner_state: Any  # the wrapped optimizer's state


def accumulate_gradients(
  optimizer: optax.GradientTransformation, every_k_steps: int
) -> optax.GradientTransformation:
  """Averages grads over `every_k_steps` micro-steps, then updates once.

  A replacement for ``optax.MultiSteps`` that paged states can use: the inner
  update runs inside ``lax.cond`` only on the k-th micro-step (MultiSteps runs
  it on every micro-step and throws the result away, which a state advanced in
  place cannot survive). Micro-steps return zero updates and leave the inner
  state untouched. The grads are summed in float32 and their mean is cast back
  to each grad's dtype before the inner update.

  Args:
    optimizer: the transformation to wrap, e.g. ``paged_adamw8bit(2e-4)``.
    every_k_steps: micro-steps per update, >= 1.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if isinstance(every_k_steps, bool) or not isinstance(every_k_steps, int) or every_k_steps < 1:
    raise ValueError(
      f"accumulate_gradients: every_k_steps must be an int >= 1, got {every_k_steps!r}"
    )
  k = every_k_steps

  def init_fn(params: optax.Params) -> AccumulateGradientsState:
    return AccumulateGradientsState(
      mini_step=jnp.zeros([], jnp.int32),
      grad_sum=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
      inner_state=optimizer.init(params),
    )

  def update_fn(
    updates: optax.Updates, state: AccumulateGradientsState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, AccumulateGradientsState]:
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), state.grad_sum, updates)
    emit = state.mini_step == k - 1
    mean = jax.tree.map(lambda s, g: (s / k).astype(g.dtype), grad_sum, updates)
    out_types, _ = jax.eval_shape(optimizer.update, mean, state.inner_state, params)

    def apply(operands):
      mean, inner_state, params = operands
      return optimizer.update(mean, inner_state, params)

    def skip(operands):
      _, inner_state, _ = operands
      zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), out_types)
      return zeros, inner_state

    new_updates, inner_state = jax.lax.cond(emit, apply, skip, (mean, state.inner_state, params))
    return new_updates, AccumulateGradientsState(
      mini_step=jnp.where(emit, 0, state.mini_step + 1).astype(jnp.int32),
      grad_sum=jax.tree.map(lambda s: jnp.where(emit, jnp.zeros_like(s), s), grad_sum),
      inner_state=inner_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
