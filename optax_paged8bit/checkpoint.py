"""Checkpoints: a paged state exported as ordinary arrays (the adamw8bit
state) and imported back, and orbax saves of whole trees (a TrainState, an
`nnx.state(optimizer)`, any pytree that holds paged states) with a checksum
per leaf that the restore verifies. Imports check the values they load
(finite non-negative scales, an in-range integral count), and an import
always makes a new registry slot, so no older state object can step on
moments that are not its own."""

from __future__ import annotations

import contextlib
import os
import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from optax_paged8bit import _calls, _collector, _ffi
from optax_paged8bit._layout import (
  MOMENT_FIELDS,
  RING_SIZE,
  Layout,
  in_calls,
  moment_arrays,
  moments_flat,
  moments_trees,
  replicated,
)
from optax_paged8bit._states import is_paged, map_paged, rebuild, view
from optax_paged8bit.functional import Adam8bitState, arrays_state
from optax_paged8bit.paged import PagedAdamW8bitState
from optax_paged8bit.quantization import QMAP_SIGNED, QMAP_UNSIGNED

MAX_COUNT = 2**31 - 2  # the next update writes count + 1 into an int32


class InterruptedStepWarning(UserWarning):
  """The moments of an exported state are one step ahead of its count: an
  update ran, but its result never reached Python."""


def _is_exported(x: Any) -> bool:
  return isinstance(x, Adam8bitState)


def _is_state(x: Any) -> bool:
  return is_paged(x) or _is_exported(x)


# -- export ---------------------------------------------------------------------


def _export_one(state: PagedAdamW8bitState) -> Adam8bitState:
  layout = state.layout
  if any(isinstance(x, jax.core.Tracer) for x in (state.handle, state.count)):
    step, flat = _calls.export_split(layout, state.handle, state.count)
  else:
    # Fail before the call: a failed export (a call with side effects) would
    # leave JAX's runtime token in error, raised again by every later
    # jax.effects_barrier() (release, page_out, ...).
    _ffi.check_call("export", state.handle, state.count, layout)
    step, codes, floats = _calls.export_flat(layout, state.handle, state.count)
    flat = _calls.export_arrays(layout, codes, floats)
  if not isinstance(step, jax.core.Tracer):
    ahead = int(step) - int(state.count)
    if ahead:
      warnings.warn(
        f"export_state: this opt_state's count is {int(state.count)} but its moments are at "
        f"step {int(step)}: an update ran and its result never reached Python (Ctrl-C, or a "
        "later operation of the same jitted step failed). The export holds the moments as they "
        f"are, with count {int(step)}: one step ahead of the params of the interrupted step's "
        "input. To go on training in this process: opt_state = "
        "optax_paged8bit.import_state(tx.init(params), exported).",
        InterruptedStepWarning,
        stacklevel=3,
      )
  return arrays_state(layout, step, list(flat), state.gnorm_vec)


def export_state(tree: Any) -> Any:
  """The 8-bit state of every paged_adamw8bit state in `tree`, as arrays.

  Args:
    tree: any pytree that holds paged_adamw8bit states: an opt_state (alone,
      or inside optax.chain, masked, partition, inject_hyperparams, ...), a
      Flax TrainState, an ``nnx.state(optimizer)``, a dict of params and
      states.

  Returns:
    `tree` with each paged state replaced by an `Adam8bitState` (codes,
    scales, count, maps and clipping ring as ordinary jax.Arrays, sharded
    like the params) and everything else as it was: the checkpoint format,
    for orbax or any pytree serializer. After an interrupted step (its result
    never reached Python) the state last held exports its moments as they
    are, with their true count, and an `InterruptedStepWarning`.
  """
  return map_paged(_export_one, tree, keep_form=False)


# -- import ---------------------------------------------------------------------


# The largest |first moment| a step can produce from finite grads: the guard
# of SPEC 3.2/3.3 resets an element whose second moment (1 - b2) * g * g
# overflows, and 1 - b2 >= 2**-24 for any float32 b2 < 1, so a moment that
# survives has |g| <= sqrt(FLT_MAX * 2**24), and m is an average of such g
# (rounded: a thousandth of margin).
MAX_FIRST_MOMENT = float(np.sqrt(np.float64(np.finfo(np.float32).max) * 2.0**24)) * 1.001


def _values(x: Any) -> list[np.ndarray]:
  """The values of `x` this process holds (its shards of a jax.Array)."""
  if isinstance(x, jax.Array):
    return [np.asarray(s.data) for s in x.addressable_shards]
  return [np.asarray(x)]


def _bad_values(who: str, name: str, path: str, x: Any, ok, rule: str) -> None:
  """Raises naming the leaf when some element of `x` breaks `rule`."""
  for part in _values(x):
    with np.errstate(invalid="ignore"):
      bad = ~ok(part)
    if bad.any():
      where = np.flatnonzero(bad.reshape(-1))
      raise ValueError(
        f"{who}: leaf {path}: {name} has {where.size} values that are not {rule}, e.g. "
        f"{part.reshape(-1)[where[0]]!r}; no step produces such a state (it is corrupt or was "
        "edited)"
      )


def _finite_at_least_zero(a: np.ndarray) -> np.ndarray:
  return np.isfinite(a) & (a >= 0)


def _first_moment(a: np.ndarray) -> np.ndarray:
  return np.isfinite(a) & (np.abs(a) <= MAX_FIRST_MOMENT)


def _checked_count(who: str, count: Any) -> jax.Array:
  array = np.asarray(count)
  if array.shape != ():
    raise ValueError(f"{who}: count must be a scalar, got shape {array.shape}")
  value = array.item()
  if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and float(value).is_integer()):
    raise ValueError(f"{who}: count must be an integer, got {array.dtype.name} {value!r}")
  if not 0 <= value <= MAX_COUNT:
    raise ValueError(f"{who}: count must be in 0..{MAX_COUNT}, got {value!r}")
  return jnp.asarray(int(value), jnp.int32)


def _describe(x: Any) -> str:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return f"{x.dtype}{list(x.shape)}"
  return "None" if x is None else f"a {type(x).__name__}"


def _checked_arrays(
  layout: Layout, exported: Any, who: str = "import_state"
) -> tuple[list[Any], jax.Array]:
  """The 4 arrays of each leaf and the count of `exported`, checked for the
  layout: types, shapes, dtypes and values (what no step produces is
  refused: non-finite or negative scales and second moments, first moments
  beyond MAX_FIRST_MOMENT, a clipping ring that is not finite and >= 0)."""
  if not _is_exported(exported):
    raise TypeError(
      f"{who}: expected an Adam8bitState (from export_state), got {type(exported).__name__}"
    )
  theirs = exported.layout
  if not isinstance(theirs, Layout):
    raise ValueError(
      f"{who}: the exported state's layout is {_describe(theirs)}, not the Layout that "
      "export_state (or the optimizer's init) gives it; pass export_state's result, or rebuild "
      "the state with the target's layout (target.layout)"
    )
  for name in ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise"):
    if getattr(layout, name) != getattr(theirs, name):
      raise ValueError(
        f"{who}: the saved state has {name}={getattr(theirs, name)!r}, this optimizer "
        f"has {name}={getattr(layout, name)!r}"
      )
  if theirs.treedef != layout.treedef:
    raise ValueError(
      f"{who}: the saved state was made for params of another tree structure:\n"
      f"  saved: {theirs.treedef}\n  this:  {layout.treedef}"
    )
  qmaps = (exported.qmap1, exported.qmap2)
  if any(not hasattr(q, "shape") or tuple(np.shape(q)) != (256,) for q in qmaps):
    raise ValueError(f"{who}: qmap1 and qmap2 must be float32[256]")
  if not (
    np.array_equal(np.asarray(exported.qmap1), QMAP_SIGNED)
    and np.array_equal(np.asarray(exported.qmap2), QMAP_UNSIGNED)
  ):
    raise ValueError(f"{who}: the saved qmap1/qmap2 differ from this version's maps")
  wanted = moment_arrays(layout)
  columns = []
  for name in MOMENT_FIELDS:
    try:
      columns.append(layout.treedef.flatten_up_to(getattr(exported, name)))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{who}: {name} does not have the params' tree structure: {e}") from None
  for i, path in enumerate(layout.paths):
    for k, name in enumerate(MOMENT_FIELDS):
      array, want = columns[k][i], wanted[4 * i + k]
      if array is None and not layout.is_8bit(i) and k >= 2:
        continue  # a float32 leaf has no scales
      if (
        not isinstance(array, (jax.Array, np.ndarray))
        or tuple(array.shape) != want.shape
        or array.dtype != want.local.dtype
      ):
        raise ValueError(
          f"{who}: leaf {path}: {name} must be {want.local.dtype}{list(want.shape)}, got "
          f"{_describe(array)}"
        )
      if layout.is_8bit(i) and k == 2:
        rule = f"finite, >= 0 and at most {MAX_FIRST_MOMENT:.3g}"
        _bad_values(who, name, path, array, lambda a: _first_moment(a) & (a >= 0), rule)
      elif layout.is_8bit(i) and k == 3:
        _bad_values(who, name, path, array, _finite_at_least_zero, "finite and >= 0")
      elif not layout.is_8bit(i) and k == 0:
        rule = f"finite and at most {MAX_FIRST_MOMENT:.3g} in magnitude"
        _bad_values(who, name, path, array, _first_moment, rule)
      elif not layout.is_8bit(i) and k == 1:
        _bad_values(who, name, path, array, _finite_at_least_zero, "finite and >= 0")
  if layout.clipping:
    want_rings = (layout.num_leaves, RING_SIZE)
    rings = exported.gnorm_vec
    if (
      not isinstance(rings, (jax.Array, np.ndarray))
      or tuple(rings.shape) != want_rings
      or rings.dtype != jnp.float32
    ):
      raise ValueError(
        f"{who}: gnorm_vec must be float32{list(want_rings)}, got {_describe(rings)}"
      )
    for part in _values(rings):
      with np.errstate(invalid="ignore"):
        bad = ~_finite_at_least_zero(part)
      if bad.any():
        leaf = layout.paths[int(np.argwhere(bad)[0][0])]
        raise ValueError(
          f"{who}: leaf {leaf}: its clipping ring (gnorm_vec) holds {int(bad.sum())} values that "
          "are not finite and >= 0 (squared grad norms); no step produces such a state (it is "
          "corrupt or was edited)"
        )
  return moments_flat(layout, exported), _checked_count(who, exported.count)


def _import_one(target: PagedAdamW8bitState, exported: Any) -> PagedAdamW8bitState:
  layout = target.layout
  arrays, count = _checked_arrays(layout, exported)
  codes, floats = _calls.import_arrays(layout, [arrays[k] for k in in_calls(layout)], target.count)
  handle, count = _calls.import_flat(layout, count, codes, floats)
  rings = None
  if layout.clipping:
    rings = jnp.asarray(exported.gnorm_vec, jnp.float32, device=replicated(layout))
  return PagedAdamW8bitState(count, handle, rings, layout)


def _import_arrays(target: Adam8bitState, exported: Any) -> Adam8bitState:
  """An adamw8bit state from a checkpoint: checked like a paged import."""
  layout = target.layout
  _, count = _checked_arrays(layout, exported)
  return exported._replace(count=jnp.asarray(count, device=replicated(layout)), layout=layout)


def import_state(target: Any, exported: Any) -> Any:
  """Loads exported 8-bit states into the paged states of `target`.

  Args:
    target: a tree like the one that was exported, holding states from the
      same optimizers' init (fresh ones, or any: they are not changed).
    exported: what `export_state` returned for it (or a restored copy).

  Returns:
    `exported` with each exported state loaded into a new registry slot and
    replaced by a paged state in the form the target has it (a
    PagedAdamW8bitState, or the target's mapping of arrays in an
    ``nnx.state``); everything else as exported. The values are checked
    first (shapes, dtypes, finite non-negative scales, an integral count in
    0..2**31-2), with errors that name the leaf. The next update continues
    exactly where the exported run stopped.
  """

  _collector.ensure_started()
  _collector.look_now()  # restoring in a loop frees the states restored before

  def one(t, e):
    if is_paged(t):
      return rebuild(t, _import_one(view(t), e))
    if _is_exported(t):
      return _import_arrays(t, e)
    return e

  try:
    return jax.tree.map(one, target, exported, is_leaf=_is_state)
  except ValueError as e:
    if "import_state" in str(e):
      raise
    raise ValueError(
      f"import_state: the exported tree does not have the structure of the target: {e}"
    ) from None


# -- checksums ------------------------------------------------------------------


# A checksum is a sum of mixed words of a leaf's bytes and their positions,
# so that any sharding reduces to the same value, and a changed or moved word
# changes it but with a chance of 2**-32. jax.Arrays are hashed where they
# are (with their own dtype: 8-byte values as two words), other values on the
# host from their own bytes, never through JAX's conversion to 32 bits; both
# give the same value for the same bytes.
_GOLDEN = 0x9E3779B1


def _word_type(itemsize: int):
  return {1: np.uint8, 2: np.uint16}.get(itemsize, np.uint32)


def _fmix32(h: Any) -> Any:
  """MurmurHash3's finalizer on uint32 words (JAX or NumPy)."""
  h = h ^ (h >> 16)
  h = h * h.dtype.type(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * h.dtype.type(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    unsigned = jnp.dtype(_word_type(x.dtype.itemsize))
    words = jnp.ravel(lax.bitcast_convert_type(x, unsigned)).astype(jnp.uint32)
  index = lax.iota(jnp.uint32, words.size)
  return jnp.sum(_fmix32(words + index * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)


_checksum_of = jax.jit(_leaf_checksum)


@jax.jit
def _checksums_of(xs: tuple[jax.Array, ...]) -> jax.Array:
  """The checksums of several arrays, in one compiled function: a tree's
  arrays of many shapes compile once, not once per shape."""
  return jnp.stack([_leaf_checksum(x) for x in xs])


def _host_checksum(a: np.ndarray) -> np.uint32:
  a = np.ascontiguousarray(a).reshape(-1)
  if a.dtype == np.bool_:
    words = a.astype(np.uint32)
  else:
    words = a.view(_word_type(a.dtype.itemsize)).astype(np.uint32)
  index = np.arange(words.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    return np.sum(_fmix32(words + index * np.uint32(_GOLDEN)), dtype=np.uint32)


def _scalar(x: Any) -> np.ndarray | None:
  """A number's value in the narrowest of its kind's canonical dtypes that
  holds it exactly (int32 or int64, float32 or float64), so that the same
  value hashes alike as a Python scalar, a NumPy scalar or a 0-d array (a
  TrainState's step is saved as an int32 array and restored into a Python
  int); None when `x` is no number."""
  if isinstance(x, jax.Array):
    if x.ndim != 0:
      return None
    x = np.asarray(x)
  if not isinstance(x, (np.ndarray, np.generic, int, float, bool)) or np.ndim(x) != 0:
    return None
  a = np.asarray(x)
  if a.dtype.kind == "b":
    return a
  if a.dtype.kind in "iu":
    value = int(a)
    for dtype in (np.int32, np.int64, np.uint64):
      info = np.iinfo(dtype)
      if info.min <= value <= info.max:
        return np.asarray(value, dtype)
    return None
  if a.dtype.kind == "f":
    narrow = a.astype(np.float32)
    exact = narrow.astype(np.float64) == a.astype(np.float64) or np.isnan(a)
    return narrow if exact else a.astype(np.float64)
  return a


def _checksum(x: Any) -> np.ndarray:
  scalar = _scalar(x)
  if scalar is not None:
    return np.asarray(_host_checksum(scalar), np.uint32)
  if isinstance(x, jax.Array):
    return np.asarray(_checksum_of(x), np.uint32)
  if isinstance(x, (np.ndarray, np.generic)) and x.dtype != object:
    return np.asarray(_host_checksum(np.asarray(x)), np.uint32)
  return np.asarray(zlib.crc32(repr(x).encode()), np.uint32)


def _legacy_checksum(x: Any) -> int | None:
  """What checkpoints written before the hashes above covered every bit hold
  for a number (hashed after JAX's conversion to 32 bits)."""
  if isinstance(x, (np.ndarray, np.generic, int, float, bool)) and np.asarray(x).dtype != object:
    with contextlib.suppress(Exception):
      return int(_checksum_of(np.asarray(x)))
  return None


def _checksums(tree: Any) -> np.ndarray:
  """One uint32 per leaf of `tree`, in leaf order, as one array: orbax
  writes it as one array (it spends about a millisecond per array).
  jax.Arrays are hashed together, one call per set of devices they live on
  (in leaf order, which every process of a multi-process run shares)."""
  leaves = jax.tree.leaves(tree)
  out = np.zeros(len(leaves), np.uint32)
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(leaves):
    # A 0-d array hashes as the number it holds (_scalar), on the host.
    if isinstance(x, jax.Array) and x.ndim != 0:
      devices = tuple(sorted(d.id for d in x.sharding.device_set))
      groups.setdefault((x.sharding.memory_kind, devices), []).append(i)
    else:
      out[i] = _checksum(x)
  for indices in groups.values():
    out[indices] = np.asarray(_checksums_of(tuple(leaves[i] for i in indices)), np.uint32)
  return out


def _saved_checksums(saved: Any) -> list[Any]:
  """The checksums a checkpoint holds: one array (this format), or one
  scalar per leaf (checkpoints written before it)."""
  leaves = jax.tree.leaves(saved)
  if len(leaves) == 1 and np.ndim(leaves[0]) == 1:
    return list(np.asarray(leaves[0]))
  return leaves


def _verify(where: str, tree: Any, saved: Any) -> None:
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  want = _saved_checksums(saved)
  if len(want) != len(paths):
    raise ValueError(
      f"restore_checkpoint: {where} holds {len(want)} checksums for {len(paths)} leaves: the "
      "checkpoint was corrupted (or changed) after it was written. Restore an earlier checkpoint."
    )
  leaves = jax.tree.leaves(tree)
  for path, leaf, value, stored in zip(paths, leaves, _checksums(tree), want, strict=True):
    stored = int(np.asarray(stored))
    if int(value) != stored and _legacy_checksum(leaf) != stored:
      raise ValueError(
        f"restore_checkpoint: the data of {jax.tree_util.keystr(path)} in {where} do not match "
        "the checksum saved with them: the checkpoint was corrupted (or changed) after it was "
        "written. Restore an earlier checkpoint."
      )


# -- orbax ----------------------------------------------------------------------


def abstract_export(state: PagedAdamW8bitState | Adam8bitState) -> Adam8bitState:
  """ShapeDtypeStructs (with shardings) of what export_state returns for this
  state: the target orbax restores into, without computing the export."""
  layout = state.layout
  if layout.mesh is None:
    default = state.count.sharding
    sharding_of = lambda spec: default
  else:
    sharding_of = lambda spec: NamedSharding(layout.mesh, spec)
  flat = [
    jax.ShapeDtypeStruct(a.shape, a.local.dtype, sharding=sharding_of(a.spec))
    for a in moment_arrays(layout)
  ]
  scalar = sharding_of(PartitionSpec())
  rings = None
  if layout.clipping:
    rings = jax.ShapeDtypeStruct((layout.num_leaves, RING_SIZE), jnp.float32, sharding=scalar)
  return Adam8bitState(
    count=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
    qmap1=jax.ShapeDtypeStruct((256,), jnp.float32, sharding=scalar),
    qmap2=jax.ShapeDtypeStruct((256,), jnp.float32, sharding=scalar),
    **moments_trees(layout, flat),
    gnorm_vec=rings,
    layout=layout,
  )


def _abstract(target: Any) -> Any:
  """What orbax restores `target`'s checkpoint into."""

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  def one(x):
    if is_paged(x):
      return abstract_export(view(x))
    return jax.tree.map(leaf, x)

  return jax.tree.map(one, target, is_leaf=_is_state)


# orbax refuses to write arrays with no elements (an empty param, its
# moments): each is written as this one-byte stand-in and made again, empty,
# from the target's leaf at restore. Checksums cover the tree as it was.
def _stand_in() -> np.ndarray:
  return np.zeros((), np.uint8)


def _is_empty(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) and 0 in tuple(x.shape)


def _with_stand_ins(tree: Any) -> Any:
  return jax.tree.map(lambda x: _stand_in() if _is_empty(x) else x, tree)


def _empty_like(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jnp.zeros(x.shape, x.dtype, device=x.sharding)
  return np.zeros(x.shape, x.dtype)


def _without_stand_ins(restored: Any, abstract: Any) -> Any:
  return jax.tree.map(lambda r, a: _empty_like(a) if _is_empty(a) else r, restored, abstract)


def _abstract_checksums(abstract: Any, legacy: bool = False) -> Any:
  """What orbax restores the checksums into: one array, or (checkpoints
  written before that format) one scalar per leaf."""
  if legacy:
    return jax.tree.map(lambda _: np.zeros((), np.uint32), abstract)
  return np.zeros((len(jax.tree.leaves(abstract)),), np.uint32)


def _manager_and_step(where: Any, step: int | None, saving: bool):
  import orbax.checkpoint as ocp

  if isinstance(where, ocp.CheckpointManager):
    if saving and step is None:
      raise ValueError("save_checkpoint: saving to a CheckpointManager needs step=")
    return where, step
  if not isinstance(where, (str, os.PathLike)):
    raise TypeError(
      "optax_paged8bit checkpoints go to a directory (str or os.PathLike) or an "
      f"orbax.checkpoint.CheckpointManager, got {type(where).__name__}"
    )
  if step is not None:
    raise ValueError("step= is for a CheckpointManager; a directory holds one checkpoint")
  return None, None


_INT64 = np.iinfo(np.int64)


def _check_savable(exported: Any) -> None:
  """Refuses, naming the leaf, what restore_checkpoint would refuse (the
  states' values, as import_state checks them) or orbax cannot write (a
  Python int beyond int64)."""
  for x in jax.tree.leaves(exported, is_leaf=_is_exported):
    if _is_exported(x):
      _checked_arrays(x.layout, x, who="save_checkpoint")
  for path, x in jax.tree_util.tree_flatten_with_path(exported)[0]:
    if isinstance(x, int) and not isinstance(x, bool) and not _INT64.min <= x <= _INT64.max:
      raise ValueError(
        f"save_checkpoint: leaf {jax.tree_util.keystr(path)} is the Python int {x}, beyond "
        "int64, which orbax cannot write; keep it as a string or split it outside the tree"
      )


def save_checkpoint(where: Any, tree: Any, *, step: int | None = None) -> bool:
  """Saves `tree` with orbax: its paged states exported, everything else as
  it is, and a checksum of every leaf that `restore_checkpoint` verifies.

  Args:
    where: a directory (the checkpoint is written there and waited for), or
      an ``orbax.checkpoint.CheckpointManager`` (saved as its `step`, under
      its options: save interval, how many to keep, async writing).
    tree: any pytree: a Flax TrainState, ``{"params": ..., "opt_state":
      ...}``, an ``nnx.state(optimizer)``; sharded states are saved shard by
      shard.
    step: the step to save as, with a CheckpointManager.

  Returns:
    Whether a checkpoint was saved (a CheckpointManager may skip a step).
  """
  import orbax.checkpoint as ocp

  manager, step = _manager_and_step(where, step, saving=True)
  exported = export_state(tree)
  _check_savable(exported)
  payload = {"tree": _with_stand_ins(exported), "checksums": _checksums(exported)}
  if manager is not None:
    return bool(manager.save(step, args=ocp.args.StandardSave(payload)))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(where), payload)
  checkpointer.wait_until_finished()
  return True


def restore_checkpoint(where: Any, target: Any, *, step: int | None = None) -> Any:
  """Restores a `save_checkpoint` into the form of `target` and returns the
  tree to continue from.

  Args:
    where: the directory given to save_checkpoint, or the CheckpointManager.
    target: a tree like the saved one, from this process: params and fresh
      states (`tx.init`) on the devices and mesh to continue on. A paged
      state is loaded into the registry (`import_state`); everything else is
      returned as restored.
    step: with a CheckpointManager, the step to restore (default: the latest).

  Every leaf is checked against the checksum saved with it, and the loaded
  states' values are checked as `import_state` does; a mismatch fails with
  the leaf's path. Restoring onto another mesh is exact when the saved and
  the new shards both lie on 256-element block boundaries (see README);
  orbax reshards the arrays.
  """
  import orbax.checkpoint as ocp

  manager, step = _manager_and_step(where, step, saving=False)
  abstract = _abstract(target)
  forms = [
    {"tree": _with_stand_ins(abstract), "checksums": _abstract_checksums(abstract, legacy)}
    for legacy in (False, True)
  ]
  if manager is not None:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"restore_checkpoint: {manager.directory} holds no checkpoint")
    described = f"step {step} of {manager.directory}"
    restore = lambda form: manager.restore(step, args=ocp.args.StandardRestore(form))
  else:
    described = os.path.abspath(where)
    restore = lambda form: ocp.StandardCheckpointer().restore(described, form)
  try:
    try:
      restored = restore(forms[0])
    except Exception as first:  # perhaps a checkpoint with one checksum per leaf
      try:
        restored = restore(forms[1])
      except Exception:
        raise first from None
  except Exception as e:  # orbax's and tensorstore's own errors, passed on with context
    hint = ""
    if "structure" in str(e):  # orbax: the target's tree is not the saved one's
      hint = (
        "\nThe target must have the saved tree's structure: the same optimizers, each from "
        "init on params like the saved ones (restore_checkpoint takes no partial_restore). To "
        "change optimizers, restore into the form that was saved and convert: "
        "op.to_optax_adamw / op.from_optax_adamw."
      )
    raise ValueError(
      f"restore_checkpoint: could not read the checkpoint at {described}: {type(e).__name__}: "
      f"{e}{hint}"
    ) from e
  tree = _without_stand_ins(restored["tree"], abstract)
  _verify(described, tree, restored["checksums"])
  return import_state(target, tree)
