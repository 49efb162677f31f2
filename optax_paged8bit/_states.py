"""Finding paged states in any pytree: a PagedAdamW8bitState as optax returns
it (alone, in a chain, a TrainState...), or the same state taken apart by a
framework that keeps only its arrays (`nnx.state(optimizer)`: a mapping with
`count`, `handle` and maybe `gnorm_vec`, each maybe wrapped in a Variable,
the static layout gone). The layout of such a state is found from its handle:
a fresh token carries the layout's key, a registry slot records it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from optax_paged8bit import _ffi
from optax_paged8bit._layout import HANDLE_DTYPE, Layout, layout_for_key
from optax_paged8bit.paged import PagedAdamW8bitState

_FIELDS = {"count", "handle", "gnorm_vec", "layout"}


def _only_leaf(x: Any) -> Any:
  """The one array of `x` (itself, or the array a wrapper such as an NNX
  Variable holds); None when `x` holds no single array."""
  leaves = jax.tree.leaves(x)
  return leaves[0] if len(leaves) == 1 else None


def _readable_handle(x: Any) -> bool:
  return (
    isinstance(x, jax.Array)
    and not isinstance(x, jax.core.Tracer)
    and x.dtype == HANDLE_DTYPE
    and x.shape == ()
  )


def _is_taken_apart(x: Any) -> bool:
  """A mapping that holds a paged state's arrays: `count` and `handle` (and
  at most `gnorm_vec`), its handle a uint32 scalar whose value this process
  knows as a paged state's (a fresh token of a known layout, or a registry
  key)."""
  if not isinstance(x, Mapping) or "count" not in x or "handle" not in x:
    return False
  if not set(x.keys()) <= _FIELDS:
    return False
  handle = _only_leaf(x["handle"])
  if not _readable_handle(handle):
    return False
  try:
    _layout_of_handle(handle)
  except (ValueError, RuntimeError):
    return False
  return True


def is_paged(x: Any) -> bool:
  return isinstance(x, PagedAdamW8bitState) or _is_taken_apart(x)


def _layout_of_handle(handle: jax.Array) -> Layout:
  keys = set()
  for value in _ffi.handle_values(handle):
    key = _ffi.registry_key(value)
    if key is None:
      keys.add(value & 0x7FFFFFFF)
    else:
      keys.update(info["layout_key"] for info in _ffi.slot_info(key))
  layouts = {layout_for_key(k) for k in keys}
  if len(layouts) != 1 or None in layouts:
    raise ValueError("the layout of this paged state is not known in this process")
  return layouts.pop()


def view(x: Any) -> PagedAdamW8bitState:
  """The paged state `x` holds, as a PagedAdamW8bitState."""
  if isinstance(x, PagedAdamW8bitState):
    return x
  handle = _only_leaf(x["handle"])
  rings = _only_leaf(x["gnorm_vec"]) if "gnorm_vec" in x else None
  return PagedAdamW8bitState(_only_leaf(x["count"]), handle, rings, _layout_of_handle(handle))


def rebuild(x: Any, state: PagedAdamW8bitState) -> Any:
  """`state` in the form of `x`: itself, or `x`'s mapping (and wrappers)
  with the new arrays."""
  if isinstance(x, PagedAdamW8bitState):
    return state

  def replace(path, leaf):
    return getattr(state, path[0].key)

  return jax.tree_util.tree_map_with_path(replace, x)


def map_paged(fn: Callable[[PagedAdamW8bitState], Any], tree: Any, *, keep_form: bool) -> Any:
  """`tree` with each paged state x replaced by fn(view(x)); with keep_form,
  fn returns a PagedAdamW8bitState that goes back into x's form."""

  def one(x):
    if not is_paged(x):
      return x
    out = fn(view(x))
    return rebuild(x, out) if keep_form else out

  return jax.tree.map(one, tree, is_leaf=is_paged)


def paged_states(tree: Any) -> list[PagedAdamW8bitState]:
  """Every paged state in `tree`, as PagedAdamW8bitStates."""
  return [view(x) for x in jax.tree.leaves(tree, is_leaf=is_paged) if is_paged(x)]


def registry_keys(state: PagedAdamW8bitState) -> list[int]:
  """The registry keys a concrete state holds (one per device; none while it
  is fresh)."""
  if isinstance(state.handle, jax.core.Tracer):
    raise ValueError(
      "optax_paged8bit: this function manages registry memory from the host and needs a "
      "concrete opt_state; call it outside jax.jit"
    )
  try:
    values = _ffi.handle_values(state.handle)
  except RuntimeError as e:
    raise ValueError(
      f"optax_paged8bit: cannot read this opt_state's handle ({e}). Its arrays were probably "
      "donated to a jitted step (donate_argnums); use the state that step returned."
    ) from None
  return sorted({k for k in map(_ffi.registry_key, values) if k is not None})


def wait_for(states: list[PagedAdamW8bitState]) -> None:
  """Waits for the calls that made these states (and any export or import in
  flight)."""
  jax.block_until_ready([s.count for s in states])
  jax.effects_barrier()


def host_int(x: Any) -> int:
  return int(np.asarray(x))
