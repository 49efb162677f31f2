"""A plain orbax save of a tree that holds a live paged state must not succeed
silently: it would store the state's count and handle but not its moments,
and the loss would show only at resume. This module wraps the handler orbax
saves jax.Arrays with, so that such a save fails at once with an error that
names the fix (optax_paged8bit.save_checkpoint, or export_state first).

The save methods of orbax's checkpointers and CheckpointManager are wrapped
too, to check the tree they are given before orbax does anything: a refused
save leaves no temporary folder behind and no background work that would fail
at exit. The array handler's check stays for save paths that bypass them.

The wrapper is installed when orbax.checkpoint is imported (now, or later
through an import hook), so that importing optax_paged8bit does not import
orbax. A live paged state is recognised by its handle: a uint32 scalar whose
value on some device is a registry key with stored moments (a fresh state
holds none and saves correctly as it is).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax

from optax_paged8bit import _ffi, _import_hooks

_PACKAGE = "orbax.checkpoint"
_installed = False
_lock = threading.Lock()

MESSAGE = (
  "orbax was asked to save a live paged_adamw8bit state (its handle is at {where}). A plain "
  "orbax save of an opt_state stores only its count and handle, not the moments, so training "
  "could not resume from it. Save the tree with optax_paged8bit.save_checkpoint(path, tree) "
  "(or save_checkpoint(checkpoint_manager, tree, step=step)), or give orbax "
  "optax_paged8bit.export_state(tree); restore it with optax_paged8bit.restore_checkpoint."
)


def _live_handle(x: Any) -> bool:
  if not isinstance(x, jax.Array) or x.dtype != _ffi.HANDLE_DTYPE or x.shape != ():
    return False
  try:
    # The values first: reading them waits for the update that returns the
    # handle, which makes the slot of a state's first step. Listed before it
    # ran, that slot was missing and the save went through without the
    # moments (seen when a save directly followed an nnx step).
    values = _ffi.handle_values(x)
  except RuntimeError:  # deleted: orbax fails on it by itself
    return False
  with_slots = set(_ffi._ops.handles_with_slots())
  return any(_ffi.registry_key(v) in with_slots for v in values)


def _check(values: Any, infos: Any) -> None:
  for value, info in zip(values, infos, strict=False):
    if _live_handle(value):
      keypath = getattr(info, "keypath", None)
      where = jax.tree_util.keystr(tuple(keypath)) if keypath else getattr(info, "name", "?")
      raise ValueError(MESSAGE.format(where=where))


def _check_tree(tree: Any, depth: int = 0) -> None:
  """Raises for a live paged state anywhere in a save's arguments: a pytree,
  or orbax's argument objects around one (unregistered dataclasses such as
  ocp.args.StandardSave, and Composite mappings of them)."""
  if depth > 8:
    return
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in leaves:
    if isinstance(leaf, jax.Array):
      if _live_handle(leaf):
        raise ValueError(MESSAGE.format(where=jax.tree_util.keystr(path)))
    elif isinstance(leaf, Mapping):  # ocp.args.Composite
      for item in leaf.values():
        _check_tree(item, depth + 1)
    elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
      for field in dataclasses.fields(leaf):
        _check_tree(getattr(leaf, field.name, None), depth + 1)


def _checked_save(save: Any) -> Any:
  """A checkpointer's or CheckpointManager's save that checks its arguments first."""

  @functools.wraps(save)
  def checked(self, *args, **kwargs):
    for given in (*args, *kwargs.values()):
      _check_tree(given)
    return save(self, *args, **kwargs)

  checked._optax_paged8bit_guard = True
  return checked


def _guard_saves(module: Any) -> None:
  for name in ("Checkpointer", "AsyncCheckpointer", "StandardCheckpointer", "CheckpointManager"):
    cls = getattr(module, name, None)
    save = getattr(cls, "__dict__", {}).get("save")
    if callable(save) and not getattr(save, "_optax_paged8bit_guard", False):
      cls.save = _checked_save(save)


def _guarded(handler: Any) -> Any:
  """A copy of orbax's array handler whose serialize checks first."""
  if getattr(handler, "_optax_paged8bit_guard", False):
    return handler
  guarded = copy.copy(handler)
  serialize = handler.serialize
  if inspect.iscoroutinefunction(serialize):

    async def checked(values, infos, args=None):
      _check(values, infos)
      return await serialize(values, infos, args)

  else:

    def checked(values, infos, args=None):
      _check(values, infos)
      return serialize(values, infos, args)

  guarded.serialize = checked
  guarded._optax_paged8bit_guard = True
  return guarded


def _install_now() -> None:
  global _installed
  with _lock:
    if _installed:
      return
    _installed = True
  # Orbax versions differ; without this public API the resume-time error
  # (which names save_checkpoint) is what is left.
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # orbax logs each override as a warning
  try:
    with contextlib.suppress(Exception):
      _guard_saves(sys.modules[_PACKAGE])
    with contextlib.suppress(Exception):
      type_handlers = sys.modules[_PACKAGE].type_handlers
      handler = type_handlers.get_type_handler(jax.Array)
      type_handlers.register_type_handler(jax.Array, _guarded(handler), override=True)
  finally:
    absl.setLevel(level)


def install() -> None:
  _import_hooks.after_import(_PACKAGE, _install_now)
