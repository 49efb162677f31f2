"""flax.serialization (`to_bytes`, `from_bytes`, `to_state_dict`,
`from_state_dict`, msgpack) of the optimizer states.

flax serializes every NamedTuple field by field. A paged state's fields are
its count and handle, not its moments (they are in the registry), and both
states carry a static `Layout` that msgpack cannot store. This module wraps
flax's NamedTuple handler for the two state types:
- a paged state's state dict is its export (`export_state`: count, maps,
  codes, scales, clipping ring), and restoring it loads them into a new
  registry slot through `import_state`, checked as an import is;
- an adamw8bit state's state dict is its arrays; restoring takes the layout
  from the target and checks the arrays as `import_state` does.
Both give the same state dict, the checkpoint format: a TrainState's
`to_bytes` restores bit for bit with `from_bytes` into a fresh one of
either optimizer. Every other NamedTuple goes to flax's own handler.

Installed when flax.serialization is imported (now, or later through an
import hook). flax keeps its NamedTuple handler in private names; on a flax
without them nothing is wrapped and msgpack fails on the `Layout`, as
before, and nothing is saved without its moments.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from optax_paged8bit import _import_hooks
from optax_paged8bit.checkpoint import abstract_export, export_state, import_state
from optax_paged8bit.functional import Adam8bitState
from optax_paged8bit.paged import PagedAdamW8bitState

_PACKAGE = "flax.serialization"
_FIELDS = tuple(name for name in Adam8bitState._fields if name != "layout")
_lock = threading.Lock()


def _state_dict(serialization: Any, state: Adam8bitState) -> dict[str, Any]:
  return {name: serialization.to_state_dict(getattr(state, name)) for name in _FIELDS}


def _restored(serialization: Any, target: Any, state_dict: Any) -> Any:
  """`target` (a paged or adamw8bit state) with the state dict's moments."""
  keys = set(state_dict) if isinstance(state_dict, dict) else None
  if keys != set(_FIELDS):
    got = sorted(keys) if keys is not None else type(state_dict).__name__
    raise ValueError(
      f"from_state_dict: the optimizer state at {serialization.current_path()} needs the state "
      f"dict of an exported 8-bit state (keys {sorted(_FIELDS)}), got {got}"
    )
  form = abstract_export(target)
  arrays = {
    name: serialization.from_state_dict(getattr(form, name), state_dict[name], name=name)
    for name in _FIELDS
  }
  return import_state(target, Adam8bitState(**arrays, layout=target.layout))


def _install_now() -> None:
  serialization = sys.modules[_PACKAGE]
  registry = getattr(serialization, "_STATE_DICT_REGISTRY", None)
  named_tuple = getattr(serialization, "_NamedTuple", None)
  with _lock:
    if not isinstance(registry, dict) or named_tuple not in registry:
      return
    to_dict, from_dict = registry[named_tuple]
    if getattr(to_dict, "_optax_paged8bit", False):
      return

    def to_state_dict(x: Any) -> Any:
      if isinstance(x, PagedAdamW8bitState):
        return _state_dict(serialization, export_state(x))
      if isinstance(x, Adam8bitState):
        return _state_dict(serialization, x)
      return to_dict(x)

    def from_state_dict(target: Any, state_dict: Any) -> Any:
      if isinstance(target, (PagedAdamW8bitState, Adam8bitState)):
        return _restored(serialization, target, state_dict)
      return from_dict(target, state_dict)

    to_state_dict._optax_paged8bit = True
    serialization.register_serialization_state(
      named_tuple, to_state_dict, from_state_dict, override=True
    )


def install() -> None:
  _import_hooks.after_import(_PACKAGE, _install_now)
