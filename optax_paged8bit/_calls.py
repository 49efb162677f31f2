"""The custom calls (csrc/ffi_common.h has their operands and results): the
paged update, adamw8bit's update on arrays, and the paged state's export and
import. With sharded params each runs inside jax.shard_map, one registry slot
(or one shard of the arrays) per device."""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optax_paged8bit import _ffi
from optax_paged8bit._layout import (
  HANDLE_DTYPE,
  SHAPES_ONLY,
  Layout,
  flat_spec,
  flat_state,
  in_calls,
  moment_arrays,
  sharded,
  spec_axes,
  with_empty_scales,
)
from optax_paged8bit.quantization import BLOCK_SIZE, QMAPS

_SCALAR = jax.ShapeDtypeStruct((), jnp.int32)

# A call writes a leaf's new params (fused step) and adamw8bit's new state
# arrays into the operands' buffers (aliased; donated by the caller) or into
# new buffers. With the step's inputs donated, a result that is not aliased
# is copied into the donated buffer after the call, one copy per array; an
# aliased operand that is not donated is copied before the call instead.
# Measured on an H200 (benchmarks/RESULTS.md): the fused step on 1152 LoRA
# leaves took 17.9 ms with the copies and 10.9 ms aliased; on GPT-2 medium's
# 292 leaves (196 of them small) 3.88 ms and 3.45 ms.
# But XLA's fusion pass checks every aliased pair of a call for each fusion
# candidate next to it, so aliases cost compile time in proportion to the
# whole program: aliasing thousands of small leaves makes compiling quadratic
# (46 s for 3000 leaves of a fused step, 83 s for 1000 leaves of adamw8bit on
# a 2-core CPU), and even a cap of 512 small aliases took 10000 leaves from
# 19.4 s to 32.5 s. So a call of at most PARAM_ALIAS_ALL_LEAVES leaves aliases
# every param (a step with one such call is a small program), and a larger
# one only its large params. Aliasing every adamw8bit state array was
# measured on an H200 (1152 LoRA leaves, donated): it removes 4609 small
# copies (5.4 ms of GPU time) but not the step's time, which JAX's host
# dispatch of its ~6900 arrays bounds; so it stays at large
# arrays.
PARAM_ALIAS_MIN_ELEMENTS = 1 << 16  # one alias per leaf
PARAM_ALIAS_ALL_LEAVES = 512  # a call with at most this many leaves aliases all
STATE_ALIAS_MIN_ELEMENTS = 1 << 20  # four per leaf


def _large(layout: Layout, i: int, threshold: int = PARAM_ALIAS_MIN_ELEMENTS) -> bool:
  return math.prod(layout.local_shapes[i]) >= threshold


def _param_aliases(
  layout: Layout, first_param: int, first_out: int, leaves: range | None = None
) -> dict[int, int]:
  """Aliases of the params among `leaves` (all by default): every one if
  they are at most PARAM_ALIAS_ALL_LEAVES, else the large ones; the call's
  params and results numbered from first_param and first_out."""
  leaves = range(layout.num_leaves) if leaves is None else leaves
  every = len(leaves) <= PARAM_ALIAS_ALL_LEAVES
  return {
    first_param + t: first_out + t for t, i in enumerate(leaves) if every or _large(layout, i)
  }


_HANDLE = jax.ShapeDtypeStruct((), HANDLE_DTYPE)

_NO_VMAP = (
  "paged_adamw8bit cannot run under jax.vmap: its moments live in the registry, one slot per "
  "state, and a batched update would need one state per ensemble member. Use "
  "optax_paged8bit.adamw8bit (the same optimizer with its state as arrays), which works under "
  "jax.vmap, each member exactly as in a separate run."
)


def _refuse_vmap(call):
  """`call` unchanged, except under jax.vmap, where it raises _NO_VMAP
  instead of JAX's generic message about ffi_call's vmap_method."""
  wrapped = jax.custom_batching.custom_vmap(call)

  @wrapped.def_vmap
  def _(axis_size, in_batched, *args):
    raise ValueError(_NO_VMAP)

  return wrapped


def _gathered_norms(layout: Layout, i: int, norms: jax.Array) -> jax.Array:
  """Leaf i's block norms on this device, gathered over the mesh axes that
  shard it into the leaf's global block order (inside shard_map).

  When every local block is a global block (sharded on the first axis with
  whole blocks per shard, or with local last-axis lengths that are multiples
  of 256) that order is a single device's, and so is the clipping; otherwise
  the norm is still the whole leaf's, summed in mesh order (the blocks differ
  from a single device's anyway)."""
  spec, local = layout.specs[i], layout.local_shapes[i]
  dims = [(d, spec_axes(spec[d])) for d in range(len(spec)) if spec_axes(spec[d])]
  if not dims:
    return norms
  if local[-1] % BLOCK_SIZE == 0:
    grid = norms.reshape(*local[:-1], local[-1] // BLOCK_SIZE, 2)
    for d, axes in dims:
      grid = jax.lax.all_gather(grid, axes, axis=d, tiled=True)
    return grid.reshape(-1, 2)
  for _, axes in dims:
    norms = jax.lax.all_gather(norms, axes, axis=0, tiled=True)
  return norms


def _block_norms(layout: Layout, grads: list[jax.Array]) -> tuple[jax.Array, np.ndarray]:
  """The `norms` operand and `norm_blocks` attribute of an update (inside
  shard_map): with sharded params and percentile clipping, every leaf's
  block norms in its global block order, so that each device clips by the
  whole leaf's norm; otherwise empty (the call takes them from its grads)."""
  empty = (jnp.zeros((0, 2), jnp.uint32), np.zeros(0, np.int64))
  if layout.mesh is None or not layout.clipping or not grads or SHAPES_ONLY.get():
    return empty
  sizes = [-(-math.prod(shape) // BLOCK_SIZE) for shape in layout.local_shapes]
  if sum(sizes) == 0:
    return empty
  call = jax.ffi.ffi_call(
    _ffi.BLOCK_NORMS_TARGET,
    jax.ShapeDtypeStruct((sum(sizes), 2), jnp.uint32),
    vmap_method="sequential",
  )
  local = call(*grads)
  parts, at = [], 0
  for i, n in enumerate(sizes):
    parts.append(_gathered_norms(layout, i, local[at : at + n]))
    at += n
  return jnp.concatenate(parts), np.asarray([p.shape[0] for p in parts], np.int64)


# A paged step of more than UPDATE_ONE_CALL_LEAVES leaves runs as calls of at
# most UPDATE_CALL_LEAVES leaves (more than PARAM_ALIAS_ALL_LEAVES each, so
# that only large params are aliased), chained by handle and count: XLA's
# compile time grows with the square of one call's operands and results. On a
# 2-core CPU the first fused step of 10000 leaves of 3 elements took 19.3 s as
# one call and 9.3-9.9 s as 10 (benchmarks/RESULTS.md). The calls before the
# last stage their leaves' new moments in a buffer that the last call copies
# into the slot, so that the state changes only once every call has run
# (csrc/ffi_common.h); the buffers hold the state's bytes of those leaves for
# the step's duration, and on a GPU each call reads its handle and count to
# the host. On an H200 a step of 3000 leaves as 3 calls ran within 7% of one
# call (5-6% slower in one run, 4-7% faster in another: the step is bound by
# the host's dispatch), while one call of 3000 leaves compiles in 2 s on the
# CPU: so trees of up to UPDATE_ONE_CALL_LEAVES leaves keep one call.
UPDATE_ONE_CALL_LEAVES = 4096
UPDATE_CALL_LEAVES = 1024


def update_chunks(n: int) -> list[int]:
  """The first leaf of each call of a step of n leaves (calls of about
  equal size)."""
  calls = 1 if n <= UPDATE_ONE_CALL_LEAVES else -(-n // UPDATE_CALL_LEAVES)
  return [n * k // calls for k in range(calls)]


def _leaves_part(
  layout: Layout,
  rings: jax.Array,
  norms: jax.Array,
  norm_blocks: np.ndarray,
  lo: int,
  hi: int,
  slice_rings: bool = True,
) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """The clipping rings, given block norms and norm_blocks of leaves lo..hi-1,
  the operands of one call of a step that runs as several (the whole rings
  when not slice_rings or without clipping)."""
  part_rings = rings[lo:hi] if layout.clipping and slice_rings else rings
  if not len(norm_blocks):
    return part_rings, norms, norm_blocks
  at = np.concatenate([[0], np.cumsum(norm_blocks)]).astype(int)
  return part_rings, norms[at[lo] : at[hi]], norm_blocks[lo:hi]


def update(
  layout: Layout,
  handle: jax.Array,
  count: jax.Array,
  structure: jax.Array,
  hyper: jax.Array,
  rings: jax.Array,
  grads: list[jax.Array],
  params: list[jax.Array],
  write_params: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
  """The paged update; returns (handle, count, rings, per-leaf outputs). The
  handle comes back new when the state was fresh.

  With sharded params each device updates its own shards with its own slot,
  and nothing is gathered; the handle array is replicated, but each device's
  buffer holds that device's handle (registry.h).
  """
  n = layout.num_leaves
  starts = update_chunks(n)
  ends = [*starts[1:], n]
  chunked = len(starts) > 1
  # The attributes of every call of the step (each adds its own leaves').
  common = dict(
    layout.call_attributes(),
    **layout.structure_attributes(),
    write_params=write_params,
    chunk_starts=np.asarray(starts, np.int64),
  )
  flags = common["leaf_flags"]
  common.update(
    layout_flags=flags if chunked else np.zeros(0, np.int32),
    layout_sizes=layout.leaf_sizes() if chunked else np.zeros(0, np.int64),
  )

  def local(handle, count, structure, hyper, qmaps, rings, *leaves):
    norms, norm_blocks = _block_norms(layout, list(leaves[:n]))
    return _refuse_vmap(functools.partial(calls, norm_blocks))(
      handle, count, structure, hyper, qmaps, rings, norms, *leaves
    )

  def calls(norm_blocks, handle, count, structure, hyper, qmaps, rings, norms, *leaves):
    new_rings, outs, staged = [], [], []
    for lo, hi in zip(starts, ends, strict=True):
      m, commit = hi - lo, hi == n
      part_rings, part_norms, part_blocks = _leaves_part(
        layout, rings, norms, norm_blocks, lo, hi, slice_rings=chunked
      )
      out_types = [
        _HANDLE,
        _SCALAR,
        jax.ShapeDtypeStruct(part_rings.shape, jnp.float32),
        *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in leaves[n + lo : n + hi]),
      ]
      if not commit:
        out_types.append(jax.ShapeDtypeStruct((layout.arena_bytes(lo, hi),), jnp.uint8))
      aliases = {5: 2}  # the clipping ring is updated in place
      if write_params:
        aliases.update(_param_aliases(layout, 7 + m, 3, range(lo, hi)))
      # No has_side_effect, unlike SPEC 5.2: the JAX effect it adds turns off
      # jit's C++ dispatch path (about 25 us per leaf per step; 13 ms on the
      # GPT-2 tree). The count operand and result order the updates of a state;
      # XLA drops a call only when none of its results is used (the state then
      # does not advance either), and may merge two calls only if they have the
      # same operands (the same state updated twice with the same grads in one
      # program, which with the flag would fail as stale).
      call = jax.ffi.ffi_call(_ffi.UPDATE_TARGET, out_types, input_output_aliases=aliases)
      attributes = dict(
        common, leaf_flags=flags[lo:hi], norm_blocks=part_blocks, first_leaf=np.int64(lo)
      )
      scalars = (handle, count, structure, hyper, qmaps, part_rings, part_norms)
      grads_params = (*leaves[lo:hi], *leaves[n + lo : n + hi])
      results = call(*scalars, *grads_params, *(staged if commit else ()), **attributes)
      handle, count = results[0], results[1]
      new_rings.append(results[2])
      outs += results[3 : 3 + m]
      if not commit:
        staged.append(results[3 + m])
    rings_out = new_rings[0] if len(new_rings) == 1 else jnp.concatenate(new_rings)
    return (handle, count, rings_out, *outs)

  operands = (handle, count, structure, hyper, jnp.asarray(QMAPS), rings)
  replicated = (PartitionSpec(),) * len(operands)
  outs = sharded(
    layout,
    local,
    (*replicated, *layout.specs, *layout.specs),
    (PartitionSpec(), PartitionSpec(), PartitionSpec(), *layout.specs),
  )(*operands, *grads, *params)
  return outs[0], outs[1], outs[2], list(outs[3:])


# adamw8bit's update runs as one custom call per ARRAYS_CALL_LEAVES leaves:
# XLA's compile time grows with the square of one call's operands and aliases
# (CPU, 1000 leaves of 512 elements: one call 13.8 s, 78 s with every state
# array aliased; ten calls 4.5 s and 3.4 s), and the leaves are independent.
# 256 compiles as fast as 128 with half the calls (on a GPU each call reads its
# count back to the host).
ARRAYS_CALL_LEAVES = 256


def update_arrays(
  layout: Layout,
  count: jax.Array,
  structure: jax.Array,
  hyper: jax.Array,
  rings: jax.Array,
  grads: list[jax.Array],
  params: list[jax.Array],
  moments: list[jax.Array],
  write_params: bool,
) -> tuple[jax.Array, jax.Array, list[jax.Array], list[Any]]:
  """adamw8bit's update: the state goes in and out as arrays, no registry
  (its signature parallels update's, with the state arrays for the handle).
  Returns (count, rings, outputs, the 4 state arrays per leaf, None for a
  float32 leaf's scales). Under jax.vmap the calls run once per member
  (vmap_method="sequential"), so each member's blocks are exactly those of
  a separate run."""
  n = layout.num_leaves
  present = in_calls(layout)
  every = moment_arrays(layout)
  flags = layout.call_attributes()["leaf_flags"]

  def local(count, structure, hyper, qmaps, rings, *leaves):
    norms, norm_blocks = _block_norms(layout, list(leaves[:n]))
    new_count, new_rings, outs, new_moments = None, [], [], []
    for lo in range(0, max(n, 1), ARRAYS_CALL_LEAVES):
      hi = min(n, lo + ARRAYS_CALL_LEAVES)
      m = hi - lo
      # The state arrays of leaves lo..hi: a run of `present` (ordered by leaf).
      own = range(bisect.bisect_left(present, 4 * lo), bisect.bisect_left(present, 4 * hi))
      part_rings, part_norms, part_blocks = _leaves_part(layout, rings, norms, norm_blocks, lo, hi)
      out_types = [
        _SCALAR,
        jax.ShapeDtypeStruct(part_rings.shape, jnp.float32),
        *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in leaves[n + lo : n + hi]),
        *(every[present[j]].local for j in own),
      ]
      # The kernels read the old state from the operands and write the new one
      # to the results, in place where they are aliased (STATE_ALIAS_MIN_ELEMENTS).
      aliases = {4: 1}
      aliases.update(
        {
          6 + 2 * m + t: 2 + m + t
          for t, j in enumerate(own)
          if _large(layout, present[j] // 4, STATE_ALIAS_MIN_ELEMENTS)
        }
      )
      if write_params:
        aliases.update(_param_aliases(layout, 6 + m, 2, range(lo, hi)))
      call = jax.ffi.ffi_call(
        _ffi.UPDATE_ARRAYS_TARGET,
        out_types,
        input_output_aliases=aliases,
        vmap_method="sequential",
      )
      results = call(
        count,
        structure,
        hyper,
        qmaps,
        part_rings,
        part_norms,
        *leaves[lo:hi],
        *leaves[n + lo : n + hi],
        *(leaves[2 * n + j] for j in own),
        leaf_flags=flags[lo:hi],
        block_wise=layout.block_wise,
        **layout.structure_attributes(),
        write_params=write_params,
        norm_blocks=part_blocks,
      )
      new_count = results[0] if new_count is None else new_count
      new_rings.append(results[1])
      outs += results[2 : 2 + m]
      new_moments += results[2 + m :]
    rings_out = new_rings[0] if len(new_rings) == 1 else jnp.concatenate(new_rings)
    return (new_count, rings_out, *outs, *new_moments)

  operands = (count, structure, hyper, jnp.asarray(QMAPS), rings)
  specs = tuple(every[k].spec for k in present)
  outs = sharded(
    layout,
    local,
    ((PartitionSpec(),) * 5 + layout.specs + layout.specs + specs),
    (PartitionSpec(), PartitionSpec(), *layout.specs, *specs),
  )(*operands, *grads, *params, *(moments[k] for k in present))
  return outs[0], outs[1], list(outs[2 : 2 + n]), with_empty_scales(layout, outs[2 + n :])


# Export and import carry the state arrays in two flat buffers per device
# (flat_state): two results or operands whatever the number of leaves, so
# that compiling them takes about as long for 10000 leaves as for 10. Eager
# callers split and pack the buffers on the host (export_arrays,
# import_arrays); an export traced inside jit splits them in the program.


def _export_call(layout: Layout):
  _, codes, floats = flat_state(layout)
  out_types = (
    _SCALAR,
    jax.ShapeDtypeStruct((codes,), jnp.uint8),
    jax.ShapeDtypeStruct((floats,), jnp.float32),
  )
  call = jax.ffi.ffi_call(_ffi.EXPORT_TARGET, out_types, has_side_effect=True)
  return lambda handle, count: tuple(
    call(handle, count, **layout.call_attributes(), leaf_sizes=layout.leaf_sizes())
  )


@functools.partial(jax.jit, static_argnums=0)
def export_flat(layout: Layout, handle: jax.Array, count: jax.Array) -> tuple:
  """(the step the moments are at, codes, floats): each device's flat
  buffers, concatenated in device order."""
  spec = flat_spec(layout)
  return sharded(
    layout, _export_call(layout), (PartitionSpec(), PartitionSpec()), (PartitionSpec(), spec, spec)
  )(handle, count)


def _unpack(layout: Layout, codes: Any, floats: Any) -> list[Any]:
  """One device's arrays of in_calls, cut from its two flat buffers (numpy
  arrays on the host, or traced arrays in a program)."""
  pieces, _, _ = flat_state(layout)
  every = moment_arrays(layout)
  buffers = (codes, floats)
  return [
    buffers[p.buffer][p.offset : p.offset + p.size].reshape(every[p.index].local.shape)
    for p in pieces
  ]


def export_split(layout: Layout, handle: jax.Array, count: jax.Array) -> tuple:
  """export_flat with the buffers split into the state arrays in the
  program (for an export traced inside jit): (step, 4 arrays per leaf, None
  for a float32 leaf's scales)."""
  pieces, _, _ = flat_state(layout)
  every = moment_arrays(layout)

  def local(handle, count):
    step, codes, floats = _export_call(layout)(handle, count)
    return (step, *_unpack(layout, codes, floats))

  specs = (PartitionSpec(), *(every[p.index].spec for p in pieces))
  outs = sharded(layout, local, (PartitionSpec(), PartitionSpec()), specs)(handle, count)
  return outs[0], with_empty_scales(layout, outs[1:])


def _per_device(x: jax.Array) -> dict[Any, np.ndarray]:
  return {s.device: np.asarray(s.data) for s in x.addressable_shards}


def export_arrays(layout: Layout, codes: jax.Array, floats: jax.Array) -> list[Any]:
  """The 4 arrays per leaf (None for a float32 leaf's scales), split from
  export_flat's buffers on the host and placed like the params."""
  pieces, _, _ = flat_state(layout)
  every = moment_arrays(layout)
  codes, floats = _per_device(codes), _per_device(floats)
  # Every device holds floats (unless every leaf is empty); codes only where
  # there are 8-bit leaves (an empty buffer is made outside the shard_map, on
  # one device).
  devices = list(floats)
  local = {d: jax.device_put(_unpack(layout, codes.get(d), floats[d]), d) for d in devices}
  if layout.mesh is None:
    return with_empty_scales(layout, local[devices[0]])
  arrays = [
    jax.make_array_from_single_device_arrays(
      every[p.index].shape,
      NamedSharding(layout.mesh, every[p.index].spec),
      [local[d][j] for d in devices],
    )
    for j, p in enumerate(pieces)
  ]
  return with_empty_scales(layout, arrays)


def import_arrays(layout: Layout, arrays: list[Any], like: jax.Array) -> tuple[Any, Any]:
  """Packs the state arrays of in_calls (jax.Arrays or numpy) into import's
  two flat buffers per device, on the host; `like` (the target's count)
  gives the device of an unsharded layout."""
  pieces, n_codes, n_floats = flat_state(layout)
  every = moment_arrays(layout)
  if layout.mesh is None:
    devices = [next(iter(like.devices()))]
    shards = [{devices[0]: np.asarray(x)} for x in arrays]
  else:
    placed = jax.device_put(
      list(arrays), [NamedSharding(layout.mesh, every[p.index].spec) for p in pieces]
    )
    shards = [_per_device(x) for x in placed]
    devices = [d for d in layout.mesh.devices.flat if d.process_index == jax.process_index()]
  packed = {}
  for d in devices:
    codes, floats = np.empty(n_codes, np.uint8), np.empty(n_floats, np.float32)
    buffers = (codes, floats)
    for p, x in zip(pieces, shards, strict=True):
      buffers[p.buffer][p.offset : p.offset + p.size] = x[d].reshape(-1)
    packed[d] = (codes, floats)
  if layout.mesh is None:
    return tuple(jax.device_put(packed[devices[0]], devices[0]))
  sharding = NamedSharding(layout.mesh, flat_spec(layout))
  out = []
  for k, n in ((0, n_codes), (1, n_floats)):
    local = [jax.device_put(packed[d][k], d) for d in devices]
    out.append(jax.make_array_from_single_device_arrays((n * layout.mesh.size,), sharding, local))
  return tuple(out)


@functools.partial(jax.jit, static_argnums=0)
def import_flat(
  layout: Layout, count: jax.Array, codes: jax.Array, floats: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Loads import_arrays' buffers into a new slot; returns (handle, count)."""

  def local(count, codes, floats):
    call = jax.ffi.ffi_call(_ffi.IMPORT_TARGET, (_HANDLE, _SCALAR), has_side_effect=True)
    attributes = layout.call_attributes()
    return tuple(call(count, codes, floats, **attributes, leaf_sizes=layout.leaf_sizes()))

  spec = flat_spec(layout)
  return sharded(layout, local, (PartitionSpec(), spec, spec), (PartitionSpec(), PartitionSpec()))(
    count, codes, floats
  )
