"""Host-side control of optimizer states: export/import, orbax checkpoints,
migration from and to optax.adamw, release and collection, paging and memory
accounting."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_paged8bit import _ffi
from optax_paged8bit.quantization import (
  QMAP_SIGNED,
  QMAP_UNSIGNED,
  dequantize_blockwise,
  quantize_blockwise,
)
from optax_paged8bit.transform import (
  Adam8bitState,
  Layout,
  PagedAdamW8bitState,
  QuantizedMoments,
  moment_arrays,
  moments_flat,
  moments_tree,
  sharded,
)


def _is_paged(x: Any) -> bool:
  return isinstance(x, PagedAdamW8bitState)


def _is_exported(x: Any) -> bool:
  return isinstance(x, Adam8bitState)


def _paged_states(opt_state: Any) -> list[PagedAdamW8bitState]:
  return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_paged) if _is_paged(s)]


def _concrete_handle(state: PagedAdamW8bitState) -> int:
  """The registry key of a concrete state's handle."""
  try:
    return _ffi.registry_handle(state.handle)
  except jax.errors.ConcretizationTypeError:
    raise ValueError(
      "optax_paged8bit: this function manages registry memory from the host and needs a "
      "concrete opt_state; call it outside jax.jit"
    ) from None


# The custom-call wrappers below are jitted with the layout static, so that
# eager calls (export, import, migration between checkpoints) compile once per
# layout rather than on every call.
@functools.partial(jax.jit, static_argnums=0)
def _export_arrays(layout: Layout, handle: jax.Array, count: jax.Array) -> tuple:
  arrays = moment_arrays(layout)

  def local(handle, count):
    return tuple(
      jax.ffi.ffi_call(_ffi.EXPORT_TARGET, [a.local for a in arrays], has_side_effect=True)(
        handle,
        count,
        **layout.call_attributes(),
      )
    )

  specs = tuple(a.spec for a in arrays)
  return sharded(layout, local, (PartitionSpec(), PartitionSpec()), specs)(handle, count)


def _export_one(state: PagedAdamW8bitState) -> Adam8bitState:
  layout = state.layout
  flat = _export_arrays(layout, state.handle, state.count)
  return Adam8bitState(
    count=state.count,
    qmap1=jnp.asarray(QMAP_SIGNED),
    qmap2=jnp.asarray(QMAP_UNSIGNED),
    moments=moments_tree(layout, list(flat)),
    gnorm_vec=state.gnorm_vec,
    layout=layout,
  )


def export_state(opt_state: Any) -> Any:
  """The 8-bit state of every paged_adamw8bit state in `opt_state`, as arrays.

  Args:
    opt_state: an opt_state that contains paged_adamw8bit states (alone, or
      inside optax.chain, masked, partition, inject_hyperparams, ...).

  Returns:
    `opt_state` with each `PagedAdamW8bitState` replaced by an `Adam8bitState`
    (codes, scales, count, maps and clipping ring as ordinary jax.Arrays):
    the checkpoint format, for orbax or any pytree serializer.
  """
  return jax.tree.map(lambda s: _export_one(s) if _is_paged(s) else s, opt_state, is_leaf=_is_paged)


def _check_importable(layout: Layout, exported: Adam8bitState) -> list[jax.Array]:
  if not _is_exported(exported):
    raise TypeError(
      f"import_state: expected an Adam8bitState (from export_state), got {type(exported).__name__}"
    )
  theirs = exported.layout
  for name in ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise"):
    if getattr(layout, name) != getattr(theirs, name):
      raise ValueError(
        f"import_state: the saved state has {name}={getattr(theirs, name)!r}, this optimizer "
        f"has {name}={getattr(layout, name)!r}"
      )
  if theirs.treedef != layout.treedef:
    raise ValueError(
      "import_state: the saved state was made for params of another tree structure:\n"
      f"  saved: {theirs.treedef}\n  this:  {layout.treedef}"
    )
  if not (
    np.array_equal(np.asarray(exported.qmap1), QMAP_SIGNED)
    and np.array_equal(np.asarray(exported.qmap2), QMAP_UNSIGNED)
  ):
    raise ValueError("import_state: the saved qmap1/qmap2 differ from this version's maps")
  flat = layout.treedef.flatten_up_to(exported.moments)
  wanted = moment_arrays(layout)
  for i, (path, leaf) in enumerate(zip(layout.paths, flat, strict=True)):
    for k, (name, array) in enumerate(zip(QuantizedMoments._fields, leaf, strict=True)):
      want = wanted[4 * i + k]
      if array is None and not layout.is_8bit(i) and k >= 2:
        continue  # a float32 leaf has no scales
      if array is None or tuple(array.shape) != want.shape or array.dtype != want.local.dtype:
        got = "None" if array is None else f"{array.dtype}{list(array.shape)}"
        raise ValueError(
          f"import_state: leaf {path}: {name} must be {want.local.dtype}{list(want.shape)}, got "
          f"{got}"
        )
  arrays = moments_flat(layout, exported.moments)
  if layout.clipping:
    want_rings = (layout.num_leaves, 100)
    if exported.gnorm_vec is None or tuple(exported.gnorm_vec.shape) != want_rings:
      raise ValueError(
        f"import_state: gnorm_vec must be float32{list(want_rings)}, got "
        f"{None if exported.gnorm_vec is None else list(exported.gnorm_vec.shape)}"
      )
  return arrays


@functools.partial(jax.jit, static_argnums=0)
def _import_arrays(layout: Layout, handle: jax.Array, count: jax.Array, *arrays) -> jax.Array:
  def local(handle, count, *arrays):
    return jax.ffi.ffi_call(
      _ffi.IMPORT_TARGET, jax.ShapeDtypeStruct((), jnp.int32), has_side_effect=True
    )(
      handle,
      count,
      *arrays,
      **layout.call_attributes(),
    )

  specs = tuple(a.spec for a in moment_arrays(layout))
  return sharded(layout, local, (PartitionSpec(), PartitionSpec(), *specs), PartitionSpec())(
    handle, count, *arrays
  )


def _import_one(state: PagedAdamW8bitState, exported: Adam8bitState) -> PagedAdamW8bitState:
  layout = state.layout
  _concrete_handle(state)
  arrays = _check_importable(layout, exported)
  count = _import_arrays(layout, state.handle, jnp.asarray(exported.count, jnp.int32), *arrays)
  rings = jnp.asarray(exported.gnorm_vec, jnp.float32) if layout.clipping else None
  return state._replace(count=count, gnorm_vec=rings)


def import_state(opt_state: Any, exported: Any) -> Any:
  """Loads exported 8-bit states into the paged states of `opt_state`.

  Args:
    opt_state: a fresh (or any) opt_state from the same optimizer's init.
    exported: what `export_state` returned (or a restored copy of it), with
      the same structure as `opt_state`.

  Returns:
    `exported` with each exported state replaced by the matching paged state
    of `opt_state`, its count and clipping ring set from the export. The
    registry now holds the exported codes and scales, and the next update
    continues exactly where the exported run stopped.
  """
  return jax.tree.map(
    lambda s, e: _import_one(s, e) if _is_paged(s) else e,
    opt_state,
    exported,
    is_leaf=lambda x: _is_paged(x) or _is_exported(x),
  )


def release(opt_state: Any) -> int:
  """Frees the registry memory of every paged state in `opt_state`.

  The handles are tombstoned: updating, exporting or importing a released
  state (or any state sharing its handle) is an error. Returns the bytes freed.
  """
  states = _paged_states(opt_state)
  # Dispatch is asynchronous: let the update that made each state, and any
  # export or import still in flight, finish before their memory goes.
  jax.block_until_ready([s.count for s in states])
  jax.effects_barrier()
  return sum(_ffi.release(_concrete_handle(s)) for s in states)


def collect() -> int:
  """Frees the registry memory of every paged state that is gone.

  A state is gone when no live `jax.Array` holds its handle any more: it was
  dropped, or kept only as a host copy (`jax.device_get`, pickle; save states
  with `export_state` instead). The same collection also runs by itself when
  a state is created (`tx.init`) and after each full garbage collection
  (`gc.collect()`); those free a state on their second look, to stay safe
  against steps being dispatched on other threads, while `collect()` looks
  twice and frees at once. Waits for computations in flight first. Returns
  the bytes freed; `release(opt_state)` frees one state right away.
  """
  freed = 0
  for _ in range(2):
    freed += _ffi.scan_for_unheld_states(wait=True)
  return freed


def state_nbytes(opt_state: Any) -> int:
  """Bytes of optimizer state: the arrays of `opt_state` plus, for each paged
  state, what its layout keeps in the registry on all its devices (allocated
  at the first update)."""
  arrays = sum(
    np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
    for x in jax.tree.leaves(opt_state)
    if hasattr(x, "dtype")
  )
  return arrays + sum(
    s.layout.state_nbytes() * s.layout.num_devices for s in _paged_states(opt_state)
  )


def slot_info(opt_state: Any) -> list[dict]:
  """Per-slot registry info (platform, device, step, bytes) of every paged state."""
  out = []
  for s in _paged_states(opt_state):
    handle = _concrete_handle(s)
    for info in _ffi.slot_info(handle):
      out.append({"handle": handle, **info})
  return out


def _cuda_op(name: str):
  if not _ffi.BUILT_WITH_CUDA:
    return None
  return getattr(_ffi._ops, name)


def page_out(opt_state: Any) -> int:
  """Moves the GPU-resident state of every paged state in `opt_state` to host
  RAM (to free HBM for evaluation, generation or a memory spike).

  Waits for the updates in flight first. The next update brings the pages
  back itself (prefetched on XLA's stream before the kernel), so `page_in` is
  optional. Returns the bytes moved; 0 for CPU states.
  """
  jax.block_until_ready([s.count for s in _paged_states(opt_state)])
  move = _cuda_op("page_out")
  if move is None:
    return 0
  return sum(int(move(_concrete_handle(s))) for s in _paged_states(opt_state))


def page_in(opt_state: Any) -> int:
  """Moves paged-out state back to its GPUs now; returns the bytes moved.

  Raises when free device memory cannot take it (the state then stays on the
  host, and the next update reads it there instead of oversubscribing).
  """
  move = _cuda_op("page_in")
  if move is None:
    return 0
  return sum(int(move(_concrete_handle(s))) for s in _paged_states(opt_state))


def residency(opt_state: Any) -> dict[str, int]:
  """Bytes of registry state on GPUs and in host memory, over every paged state
  in `opt_state` (CPU states count as host)."""
  on_device = on_host = 0
  for info in slot_info(opt_state):
    on_device += info["bytes_on_device"]
    on_host += info["bytes_on_host"]
  return {"bytes_on_device": on_device, "bytes_on_host": on_host}


def set_device_memory_budget(nbytes: int | None) -> None:
  """Caps the bytes of paged state placed on each GPU; allocations beyond it go
  to host memory (read by the kernel over the bus). None removes the cap (free
  device memory, minus a reserve, is always a cap). Applies to allocations made
  after the call."""
  if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
    raise ValueError(
      f"set_device_memory_budget: nbytes must be None or an int >= 0, got {nbytes!r}"
    )
  setter = _cuda_op("set_device_budget")
  if setter is not None:  # a CPU-only build places nothing on a GPU
    setter(-1 if nbytes is None else nbytes)


def _abstract_export(state: PagedAdamW8bitState | Adam8bitState) -> Adam8bitState:
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
  replicated = sharding_of(PartitionSpec())
  rings = None
  if layout.clipping:
    rings = jax.ShapeDtypeStruct((layout.num_leaves, 100), jnp.float32, sharding=replicated)
  return Adam8bitState(
    count=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    qmap1=jax.ShapeDtypeStruct((256,), jnp.float32, sharding=replicated),
    qmap2=jax.ShapeDtypeStruct((256,), jnp.float32, sharding=replicated),
    moments=moments_tree(layout, flat),
    gnorm_vec=rings,
    layout=layout,
  )


def save_checkpoint(directory: str, opt_state: Any) -> None:
  """Saves `export_state(opt_state)` with orbax (a StandardCheckpointer) and
  waits until it is written. Sharded states are saved shard by shard."""
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), export_state(opt_state))
  checkpointer.wait_until_finished()


def restore_checkpoint(directory: str, opt_state: Any) -> Any:
  """Restores a `save_checkpoint` into `opt_state` (a fresh one from the same
  optimizer's init, on the mesh to continue on) and returns the state to
  continue from: paged states are loaded into the registry (`import_state`),
  adamw8bit states are returned as restored.

  Restoring onto another mesh is exact when the saved and the new shards both
  lie on 256-element block boundaries (see README); orbax reshards the arrays.
  """
  import orbax.checkpoint as ocp

  def target(x):
    if _is_paged(x) or _is_exported(x):
      return _abstract_export(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

  is_state = lambda x: _is_paged(x) or _is_exported(x)
  abstract = jax.tree.map(target, opt_state, is_leaf=is_state)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract)
  return import_state(opt_state, restored)


def _find_adam_state(adamw_state: Any) -> Any:
  found = [
    s
    for s in jax.tree.leaves(adamw_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)
  ]
  if len(found) != 1:
    raise ValueError(
      "from_optax_adamw: expected an optax.adamw state (one ScaleByAdamState inside), found "
      f"{len(found)}"
    )
  return found[0]


@functools.partial(jax.jit, static_argnums=0)
def _quantize_moments(layout: Layout, *moments) -> tuple:
  """Float32 mu, nu (leaves, then leaves) -> the four state arrays per leaf."""
  arrays = moment_arrays(layout)

  def local(*moments):
    out = []
    for i in range(layout.num_leaves):
      mu, nu = moments[i], moments[layout.num_leaves + i]
      if layout.is_8bit(i):
        c1, a1 = quantize_blockwise(mu, QMAP_SIGNED, layout.block_wise, signed=True)
        c2, a2 = quantize_blockwise(nu, QMAP_UNSIGNED, layout.block_wise, signed=False)
        scale_shape_ = arrays[4 * i + 2].local.shape
        out += [c1, c2, a1.reshape(scale_shape_), a2.reshape(scale_shape_)]
      else:
        empty = jnp.zeros((0,), jnp.float32)
        out += [mu.astype(jnp.float32), nu.astype(jnp.float32), empty, empty]
    return tuple(out)

  specs = layout.specs if layout.mesh is not None else ()
  return sharded(layout, local, (*specs, *specs), tuple(a.spec for a in arrays))(*moments)


@functools.partial(jax.jit, static_argnums=0)
def _dequantize_moments(layout: Layout, *flat) -> tuple:
  """The four state arrays per leaf -> float32 mu, nu (leaves, then leaves)."""
  arrays = moment_arrays(layout)

  def local(*flat):
    mus, nus = [], []
    for i in range(layout.num_leaves):
      s1, s2, a1, a2 = flat[4 * i : 4 * i + 4]
      if layout.is_8bit(i):
        mus.append(dequantize_blockwise(s1, a1, QMAP_SIGNED, layout.block_wise))
        nus.append(dequantize_blockwise(s2, a2, QMAP_UNSIGNED, layout.block_wise))
      else:
        mus.append(s1)
        nus.append(s2)
    return (*mus, *nus)

  specs = layout.specs if layout.mesh is not None else ()
  return sharded(layout, local, tuple(a.spec for a in arrays), (*specs, *specs))(*flat)


def from_optax_adamw(adamw_state: Any, opt_state: Any) -> Any:
  """Continues an `optax.adamw` run with an 8-bit optimizer.

  Args:
    adamw_state: the state of `optax.adamw` (or its ScaleByAdamState), whose
      `mu`, `nu` and `count` are taken.
    opt_state: a fresh state from `paged_adamw8bit(...).init(params)` or
      `adamw8bit(...).init(params)` for the same params.

  Returns:
    `opt_state` holding the quantized `mu` and `nu` (each device quantizes
    its own shards, as the update does) and adamw's step count.
  """
  adam = _find_adam_state(adamw_state)
  state = opt_state
  if not (_is_paged(state) or _is_exported(state)):
    raise TypeError("from_optax_adamw: opt_state must come from paged_adamw8bit or adamw8bit")
  layout = state.layout
  mus = layout.treedef.flatten_up_to(adam.mu)
  nus = layout.treedef.flatten_up_to(adam.nu)
  flat = _quantize_moments(layout, *mus, *nus)
  converted = Adam8bitState(
    count=jnp.asarray(adam.count, jnp.int32),
    qmap1=jnp.asarray(QMAP_SIGNED),
    qmap2=jnp.asarray(QMAP_UNSIGNED),
    moments=moments_tree(layout, list(flat)),
    gnorm_vec=jnp.zeros((layout.num_leaves, 100), jnp.float32) if layout.clipping else None,
    layout=layout,
  )
  return import_state(state, converted) if _is_paged(state) else converted


def to_optax_adamw(opt_state: Any) -> optax.ScaleByAdamState:
  """The dequantized moments of a paged_adamw8bit or adamw8bit state as an
  optax `ScaleByAdamState` (float32 `mu`, `nu`, the step count): put it in
  place of the ScaleByAdamState of `optax.adamw(...).init(params)`."""
  if not (_is_paged(opt_state) or _is_exported(opt_state)):
    raise TypeError("to_optax_adamw: opt_state must come from paged_adamw8bit or adamw8bit")
  exported = export_state(opt_state)
  layout = exported.layout
  out = _dequantize_moments(layout, *moments_flat(layout, exported.moments))
  n = layout.num_leaves
  return optax.ScaleByAdamState(
    count=exported.count,
    mu=layout.treedef.unflatten(list(out[:n])),
    nu=layout.treedef.unflatten(list(out[n:])),
  )
