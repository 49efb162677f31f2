"""The fused step (new params written by the kernel: 16 bytes of memory
traffic per float32 param instead of 28) in the forms Flax users already
write: `fused_chain` (optax.chain whose fused_update runs the chain's
gradient transformations, then the optimizer's fused step), and, with Flax
installed, `FusedTrainState` (a linen TrainState whose apply_gradients takes
the fused step) and `FusedOptimizer` (an nnx.Optimizer whose update does)."""

from __future__ import annotations

from typing import Any

import optax

from optax_paged8bit._transform import PagedGradientTransformation


def fused_chain(*transforms: optax.GradientTransformation) -> PagedGradientTransformation:
  """``optax.chain(*transforms)`` with a fused step.

  The last transform must have a fused step (``paged_adamw8bit`` or
  ``adamw8bit``); the others (clipping, scaling of gradients) run as in the
  chain. ``update`` is exactly the chain's; ``fused_update(grads, state,
  params)`` returns (new params, new state) with the same results.

  Example:
    >>> import optax, optax_paged8bit as op
    >>> tx = op.fused_chain(optax.clip_by_global_norm(1.0), op.paged_adamw8bit(2e-4))
  """
  if not transforms or not hasattr(transforms[-1], "fused_update"):
    raise TypeError(
      "fused_chain: the last transform must have a fused step (paged_adamw8bit or adamw8bit)"
    )
  chain = optax.chain(*transforms)
  *before, last = transforms

  def fused_update(grads, state, params, **extra_args):
    new_states = []
    for tx, s in zip(before, state[:-1], strict=True):
      grads, s = tx.update(grads, s, params, **extra_args)
      new_states.append(s)
    new_params, s = last.fused_update(grads, state[-1], params, **extra_args)
    return new_params, (*new_states, s)

  return PagedGradientTransformation(chain.init, chain.update, fused_update)


def _fused_step_of(tx: Any):
  fused = getattr(tx, "fused_update", None)
  if fused is None:
    raise TypeError(
      "this optimizer has no fused step: give it paged_adamw8bit or adamw8bit, or "
      "optax_paged8bit.fused_chain(..., paged_adamw8bit(...)) for a chain"
    )
  return fused


def _train_state_class():
  from flax.training import train_state

  class FusedTrainState(train_state.TrainState):
    """A Flax linen TrainState whose ``apply_gradients`` takes the fused step.

    ``tx`` must have a fused step (``paged_adamw8bit``, ``adamw8bit`` or a
    ``fused_chain``). The result equals ``TrainState.apply_gradients``'s
    but for the optax path's rounding of ``p + (p_new - p)`` (README,
    Numerics): it is exactly the algorithm's params. Donate the state to the
    jitted step, so that the params are updated in place.
    """

    def apply_gradients(self, *, grads, **kwargs):
      fused = _fused_step_of(self.tx)
      overwrite = train_state.OVERWRITE_WITH_GRADIENT
      if overwrite in grads:
        new_inner, new_opt_state = fused(grads["params"], self.opt_state, self.params["params"])
        new_params = {"params": new_inner, overwrite: grads[overwrite]}
      else:
        new_params, new_opt_state = fused(grads, self.opt_state, self.params)
      return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)

  return FusedTrainState


def _optimizer_class():
  from flax import nnx

  class FusedOptimizer(nnx.Optimizer):
    """A Flax ``nnx.Optimizer`` whose ``update`` takes the fused step.

    Built like ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; ``tx`` must have a
    fused step (``paged_adamw8bit``, ``adamw8bit`` or a ``fused_chain``).
    ``update(model, grads)`` writes the new params into the model; it returns
    nothing (there are no updates to return).
    """

    def update(self, model, grads, /, **kwargs):
      fused = _fused_step_of(self.tx)
      param_arrays = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
      grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
      opt_state_arrays = nnx.as_pure(self.opt_state)
      new_params, new_opt_state = fused(
        grad_arrays, opt_state_arrays, param_arrays, **nnx.as_pure(kwargs)
      )
      nnx.update(model, new_params)
      nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
      self.step[...] += 1

  return FusedOptimizer


_LAZY = {"FusedTrainState": _train_state_class, "FusedOptimizer": _optimizer_class}
_made: dict[str, type] = {}


def __getattr__(name: str) -> type:
  """FusedTrainState and FusedOptimizer, made on first use (Flax is an
  optional dependency)."""
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  if name not in _made:
    _made[name] = _LAZY[name]()
    _made[name].__module__ = __name__
    _made[name].__qualname__ = name
  return _made[name]
