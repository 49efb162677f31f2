"""paged_adamw8bit and adamw8bit: bitsandbytes' 8-bit AdamW as optax transformations.

The whole step (moments, bias correction, param update, weight decay,
requantization) runs in one XLA FFI custom call over every leaf of the tree.
paged_adamw8bit keeps the 8-bit moments in the extension's registry, keyed by
the state's `handle` (the optax state holds only the handle, the step count,
the percentile-clipping ring and the static per-leaf layout); adamw8bit keeps
them as arrays in the optax state. With sharded params the call runs inside
jax.shard_map, one registry slot (or one shard of the arrays) per device.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_paged8bit import _ffi
from optax_paged8bit.quantization import (
  BLOCK_SIZE,
  DEFAULT_MIN_8BIT_SIZE,
  QMAPS,
  num_blocks,
  scale_shape,
)

# Per-leaf flag bits; must match LeafFlag in csrc/adam8bit.h.
LEAF_8BIT = 1
LEAF_DECAY = 2
RING_SIZE = 100
_PARAM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_TRACER_ERRORS = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerArrayConversionError,
  jax.errors.TracerIntegerConversionError,
  jax.errors.TracerBoolConversionError,
)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static per-leaf structure of a state, fixed at `init`.

  It is pytree metadata (no array leaves), so two optimizers built with the
  same arguments over the same params give states of identical tree structure
  and share one compiled step; traced copies of `min_8bit_size`, `optim_bits`
  or `percentile_clipping` (under `optax.inject_hyperparams`) cannot change it.
  """

  treedef: Any  # jax.tree_util.PyTreeDef of the params
  paths: tuple[str, ...]  # jax.tree_util.keystr of each leaf
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]  # param dtype names
  leaf_flags: tuple[int, ...]  # LEAF_8BIT | LEAF_DECAY per leaf
  optim_bits: int  # 8 (codes) or 32 (float32 moments for every leaf, via args)
  min_8bit_size: int
  percentile_clipping: int
  block_wise: bool
  mesh: Any = None  # jax.sharding.Mesh of sharded params; None on one device
  specs: tuple = ()  # PartitionSpec per leaf when mesh is set (P() = replicated)

  @property
  def num_leaves(self) -> int:
    return len(self.paths)

  @property
  def clipping(self) -> bool:
    return self.percentile_clipping < 100

  def is_8bit(self, i: int) -> bool:
    return bool(self.leaf_flags[i] & LEAF_8BIT)

  def call_attributes(self) -> dict[str, Any]:
    """The attributes every custom call of this layout takes (the update calls
    add percentile and write_params)."""
    return dict(leaf_flags=np.asarray(self.leaf_flags, np.int32), block_wise=self.block_wise)

  @property
  def local_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Per-device shapes of the leaves (the global shapes on one device)."""
    if self.mesh is None:
      return self.shapes
    return tuple(
      local_shape(shape, spec, self.mesh)
      for shape, spec in zip(self.shapes, self.specs, strict=True)
    )

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  def state_nbytes(self) -> int:
    """Bytes of the moments this layout keeps in the registry on each device:
    one arena per slot, each array 256-byte aligned (as csrc/registry.cc
    allocates it)."""
    pad = lambda n: -(-n // 256) * 256
    total = 0
    for i, shape in enumerate(self.local_shapes):
      size = math.prod(shape)
      if self.is_8bit(i):
        scales = num_blocks(size) if self.block_wise else 1
        total += 2 * pad(size) + 2 * pad(4 * scales)
      else:
        total += 2 * pad(4 * size)
    return total


jax.tree_util.register_static(Layout)


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def local_shape(shape: tuple[int, ...], spec: Any, mesh: Any) -> tuple[int, ...]:
  """The shape of one device's shard of an array of `shape` sharded by `spec`."""
  out = list(shape)
  for dim, entry in enumerate(spec):
    n = math.prod(mesh.shape[a] for a in _spec_axes(entry))
    out[dim] //= n
  return tuple(out)


def _mesh_and_specs(who: str, leaves: list[tuple[str, Any]]) -> tuple[Any, tuple]:
  """The mesh the params are sharded over (None when none is) and each leaf's
  PartitionSpec, padded to its rank (P() for leaves not sharded by a mesh)."""
  mesh = None
  for name, p in leaves:
    sharding = getattr(p, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      if mesh is not None and sharding.mesh != mesh:
        raise ValueError(
          f"{who}: param {name} is sharded over another mesh than the other params; "
          "all sharded params must share one mesh"
        )
      mesh = sharding.mesh
  if mesh is None:
    return None, ()
  specs = []
  for name, p in leaves:
    sharding = getattr(p, "sharding", None)
    ndim = len(np.shape(p))
    spec = (
      tuple(sharding.spec) if isinstance(sharding, NamedSharding) and sharding.mesh == mesh else ()
    )
    spec = spec + (None,) * (ndim - len(spec))
    for dim, entry in enumerate(spec):
      n = math.prod(mesh.shape[a] for a in _spec_axes(entry))
      if np.shape(p)[dim] % n:
        raise ValueError(
          f"{who}: param {name} has {np.shape(p)[dim]} elements on axis {dim}, not a "
          f"multiple of its {n} shards"
        )
    specs.append(PartitionSpec(*spec))
  return mesh, tuple(specs)


class PagedAdamW8bitState(NamedTuple):
  """State of `paged_adamw8bit`; the moments themselves are in the registry."""

  count: jax.Array  # int32[], number of updates applied; also orders the calls
  handle: jax.Array  # uint32[], key of this state's slots in the registry
  gnorm_vec: jax.Array | None  # float32[num_leaves, 100]: squared grad norms of
  # the last 100 steps per leaf (percentile clipping); None when clipping is off
  layout: Layout  # static per-leaf structure


class QuantizedMoments(NamedTuple):
  """One leaf's moments, named as in bitsandbytes' state_dict."""

  state1: jax.Array  # uint8 codes of the first moment, shaped like the param
  # (float32 moment for a float32 leaf)
  state2: jax.Array  # uint8 codes of the second moment (float32 for a float32 leaf)
  absmax1: jax.Array | None  # float32 block scales of state1 (see moment_arrays;
  # None for a float32 leaf)
  absmax2: jax.Array | None  # float32 block scales of state2


class Adam8bitState(NamedTuple):
  """The 8-bit state as ordinary arrays: what export_state returns, the
  checkpoint format of paged_adamw8bit."""

  count: jax.Array  # int32[], number of updates applied (bnb's "step")
  qmap1: jax.Array  # float32[256], signed dynamic map of state1
  qmap2: jax.Array  # float32[256], unsigned dynamic map of state2
  moments: Any  # pytree shaped like the params, a QuantizedMoments per leaf
  gnorm_vec: jax.Array | None  # float32[num_leaves, 100] clipping ring, or None
  layout: Layout  # static per-leaf structure


class MomentArray(NamedTuple):
  """One exported array: its per-device type, its global shape and spec."""

  local: jax.ShapeDtypeStruct
  shape: tuple[int, ...]
  spec: PartitionSpec


def moment_arrays(layout: Layout) -> list[MomentArray]:
  """The four arrays of each leaf (state1, state2, absmax1, absmax2), leaf by leaf.

  Codes shard like their param. Scales do too when each device's last axis
  divides by 256 (they are shaped like the param with that axis divided by
  256); otherwise each device's scales are flat and the global array is their
  concatenation over the leaf's shards, in device order.
  """
  out = []
  for i, (shape, local) in enumerate(zip(layout.shapes, layout.local_shapes, strict=True)):
    spec = layout.specs[i] if layout.mesh is not None else PartitionSpec()
    axes = tuple(a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ()))
    shards = math.prod(layout.mesh.shape[a] for a in axes) if axes else 1
    if layout.is_8bit(i):
      state = jax.ShapeDtypeStruct(local, jnp.uint8)
      local_scales = scale_shape(local, layout.block_wise)
      if layout.block_wise and len(local) >= 1 and local[-1] % BLOCK_SIZE == 0 and local[-1]:
        scales = MomentArray(
          jax.ShapeDtypeStruct(local_scales, jnp.float32),
          (*shape[:-1], shape[-1] // BLOCK_SIZE),
          spec,
        )
      else:
        flat_spec = PartitionSpec(axes) if axes else PartitionSpec()
        scales = MomentArray(
          jax.ShapeDtypeStruct(local_scales, jnp.float32),
          (shards * local_scales[0],),
          flat_spec,
        )
    else:
      state = jax.ShapeDtypeStruct(local, jnp.float32)
      scales = MomentArray(jax.ShapeDtypeStruct((0,), jnp.float32), (0,), PartitionSpec())
    codes = MomentArray(state, shape, spec)
    out += [codes, codes, scales, scales]
  return out


def moments_tree(layout: Layout, flat: list[Any]) -> Any:
  """The params-shaped tree of QuantizedMoments from the 4 arrays per leaf of
  the custom calls (a float32 leaf's empty scales become None)."""
  leaves = []
  for i in range(layout.num_leaves):
    s1, s2, a1, a2 = flat[4 * i : 4 * i + 4]
    if not layout.is_8bit(i):
      a1 = a2 = None
    leaves.append(QuantizedMoments(s1, s2, a1, a2))
  return layout.treedef.unflatten(leaves)


def moments_flat(layout: Layout, tree: Any) -> list[Any]:
  """The inverse of moments_tree (None scales become empty arrays)."""
  empty = jnp.zeros((0,), jnp.float32)
  flat = []
  for m in layout.treedef.flatten_up_to(tree):
    flat += [m.state1, m.state2]
    flat += [empty if m.absmax1 is None else m.absmax1, empty if m.absmax2 is None else m.absmax2]
  return flat


def rings_operand(layout: Layout, gnorm_vec: Any) -> jax.Array:
  """The clipping-ring operand: the ring, or an empty array when clipping is off."""
  return gnorm_vec if layout.clipping else jnp.zeros((0, RING_SIZE), jnp.float32)


def initial_rings(layout: Layout) -> jax.Array | None:
  return jnp.zeros([layout.num_leaves, RING_SIZE], jnp.float32) if layout.clipping else None


@dataclasses.dataclass(frozen=True)
class _Config:
  """Validated arguments; structural fields are None when traced."""

  optim_bits: int | None
  min_8bit_size: int | None
  percentile_clipping: int | None
  block_wise: bool


def _static_value(x: Any) -> Any:
  """The Python value of x, or None when x is a tracer."""
  if isinstance(x, (bool, int, float)):
    return x
  try:
    return np.asarray(x).item()
  except _TRACER_ERRORS:
    return None


def _check_range(who: str, name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
  concrete = _static_value(value)
  if concrete is not None and not ok(concrete):
    raise ValueError(f"{who}: {name} must be {rule}, got {concrete!r}")


def _check_int(who: str, name: str, value: Any, lo: int, hi: float) -> int | None:
  concrete = _static_value(value)
  if concrete is None:
    return None
  if isinstance(concrete, bool) or not float(concrete).is_integer() or not lo <= concrete <= hi:
    rule = f"an integer in {lo}..{hi}" if hi != math.inf else f"an integer >= {lo}"
    raise ValueError(f"{who}: {name} must be {rule}, got {concrete!r}")
  return int(concrete)


# bitsandbytes `args` fields that this port does not implement, with the
# defaults that leave them off.
_ARGS_UNSUPPORTED = {"max_unorm": 0.0, "skip_zeros": False}
_ARGS_OVERRIDES = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise")


def _args_fields(who: str, args: Any) -> dict[str, Any]:
  if isinstance(args, Mapping):
    return dict(args)
  try:
    return dict(vars(args))
  except TypeError:
    raise TypeError(
      f"{who}: args must be None, a mapping or an object with attributes "
      f"(like bitsandbytes' args), got {type(args).__name__}"
    ) from None


def _resolve_config(
  who: str,
  optim_bits: Any,
  args: Any,
  min_8bit_size: Any,
  percentile_clipping: Any,
  block_wise: Any,
) -> _Config:
  """Validates the structural arguments, with bnb's `args` overrides."""
  bits = _static_value(optim_bits)
  if bits is not None and bits != 32:
    raise ValueError(
      f"{who}: optim_bits must be 32, got {bits!r}. The keyword exists for "
      "signature compatibility with bitsandbytes; the state is 8-bit regardless. For float32 "
      "moments on every leaf pass args={'optim_bits': 32}."
    )
  effective_bits: Any = 8
  if args is not None:
    fields = _args_fields(who, args)
    for name, value in fields.items():
      if name in _ARGS_OVERRIDES:
        continue
      if name in _ARGS_UNSUPPORTED:
        if value != _ARGS_UNSUPPORTED[name]:
          raise ValueError(
            f"{who}: args.{name}={value!r} is not supported "
            f"(only its default {_ARGS_UNSUPPORTED[name]!r})"
          )
        continue
      raise ValueError(
        f"{who}: args.{name} is not an option of bitsandbytes' 8-bit optimizers; "
        f"args may set {', '.join(_ARGS_OVERRIDES)}"
      )
    if "optim_bits" in fields:
      effective_bits = fields["optim_bits"]
      concrete = _static_value(effective_bits)
      if concrete is not None and concrete not in (8, 32):
        raise ValueError(f"{who}: args.optim_bits must be 8 or 32, got {concrete!r}")
    min_8bit_size = fields.get("min_8bit_size", min_8bit_size)
    percentile_clipping = fields.get("percentile_clipping", percentile_clipping)
    block_wise = fields.get("block_wise", block_wise)
  block_wise_value = _static_value(block_wise)
  if block_wise_value is None or not isinstance(block_wise_value, (bool, np.bool_)):
    raise ValueError(f"{who}: block_wise must be a Python bool, got {block_wise!r}")
  return _Config(
    optim_bits=_check_int(who, "optim_bits", effective_bits, 8, 32),
    min_8bit_size=_check_int(who, "min_8bit_size", min_8bit_size, 0, math.inf),
    percentile_clipping=_check_int(who, "percentile_clipping", percentile_clipping, 1, 100),
    block_wise=bool(block_wise_value),
  )


def _mask_leaves(who: str, mask: Any, params: Any, treedef: Any) -> list[bool]:
  """One weight-decay flag per param leaf (optax convention: False = no decay)."""
  if mask is None:
    return [True] * treedef.num_leaves
  tree = mask(params) if callable(mask) else mask
  try:
    full = jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params, is_leaf=lambda x: x is None
    )
    leaves = treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{who}: mask must be a pytree of bools shaped like the params (or a prefix of "
      f"them), or a callable returning one: {e}"
    ) from None
  flags = []
  for leaf in leaves:
    value = _static_value(leaf)
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{who}: mask leaves must be Python bools, got {leaf!r}")
    flags.append(bool(value))
  return flags


def _platform_of(tree: Any) -> str:
  """Platform of the concrete arrays of a tree, else JAX's default backend."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      return next(iter(leaf.devices())).platform
  return jax.default_backend()


def _inside_optax_multisteps() -> bool:
  code = optax.MultiSteps.update.__code__
  frame = sys._getframe(2)
  while frame is not None:
    if frame.f_code is code:
      return True
    frame = frame.f_back
  return False


def _flatten_like(who: str, layout: Layout, tree: Any, what: str) -> tuple[list[Any], Any]:
  """Leaves of `tree` in the params' order, and its treedef.

  The structure may differ from the one `init` saw by wrapper nodes that hold
  one array each (Flax NNX hands init Variables and update plain arrays), so
  the leaves are matched by position, then checked one by one for shape and
  dtype.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if len(leaves) != layout.num_leaves:
    raise ValueError(
      f"{who}: the {what} have {len(leaves)} leaves, but the params this state was "
      f"initialised with have {layout.num_leaves}.\n  state: {layout.treedef}\n  {what}: {treedef}"
    )
  return leaves, treedef


def _check_leaves(who: str, layout: Layout, grads: list[Any], params: list[Any]) -> None:
  for path, shape, dtype, g, p in zip(
    layout.paths, layout.shapes, layout.dtypes, grads, params, strict=True
  ):
    if jnp.dtype(p.dtype) != jnp.dtype(dtype):
      raise TypeError(
        f"{who}: param {path} has dtype {p.dtype}, but the state was initialised for {dtype}"
      )
    if jnp.dtype(g.dtype) != jnp.dtype(p.dtype):
      raise TypeError(
        f"{who}: grad {path} has dtype {g.dtype} but its param has {p.dtype}; "
        "grads must have their param's dtype"
      )
    if tuple(p.shape) != shape or tuple(g.shape) != shape:
      raise ValueError(
        f"{who}: leaf {path}: param shape {tuple(p.shape)} and grad shape "
        f"{tuple(g.shape)} must both equal the shape {shape} the state was initialised for"
      )


def _hyperparams(lr: Any, count: jax.Array, betas: Any, eps: Any, weight_decay: Any) -> jax.Array:
  lr_value = lr(count) if callable(lr) else lr
  b1, b2 = betas
  values = (lr_value, b1, b2, eps, weight_decay)
  return jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in values])


def _spec_factors(mesh: Any, spec: PartitionSpec, ndim: int) -> list[int]:
  """How many devices split each dimension under `spec`."""
  entries = [spec[i] if i < len(spec) else None for i in range(ndim)]
  return [math.prod(mesh.shape[a] for a in _spec_axes(entry)) for entry in entries]


def sharded(layout: Layout, fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
  """fn as is on one device; inside jax.shard_map over the params' mesh, so
  that each device runs it on its own shards (and its own registry slot).

  Zero-size arrays (the clipping ring when clipping is off, the scales of a
  leaf with float32 moments) do not cross the shard_map boundary: they are made
  inside and outside it instead. Shardy (JAX 0.11) crashes on zero-size
  operands of a manual computation.
  """
  if layout.mesh is None:
    return fn
  mesh = layout.mesh
  single = isinstance(out_specs, PartitionSpec)
  out_spec_list = (out_specs,) if single else tuple(out_specs)

  def call(*args):
    local_in = [
      jax.ShapeDtypeStruct(local_shape(a.shape, spec, mesh), a.dtype)
      for a, spec in zip(args, in_specs, strict=True)
    ]
    local_out = jax.eval_shape(fn, *local_in)
    local_out = (local_out,) if single else tuple(local_out)
    keep_in = [i for i, a in enumerate(args) if a.size > 0]
    keep_out = [i for i, o in enumerate(local_out) if o.size > 0]

    def body(*kept):
      full = [jnp.zeros(x.shape, x.dtype) for x in local_in]
      for i, x in zip(keep_in, kept, strict=True):
        full[i] = x
      outs = fn(*full)
      outs = (outs,) if single else tuple(outs)
      return tuple(outs[i] for i in keep_out)

    # jit: called eagerly, shard_map would run the body op by op, each op in
    # its own manual computation with every operand, zero-size ones included.
    kept_outs = jax.jit(
      jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(in_specs[i] for i in keep_in),
        out_specs=tuple(out_spec_list[i] for i in keep_out),
        check_vma=False,
      )
    )(*(args[i] for i in keep_in))
    outs = []
    kept_iter = iter(kept_outs)
    for o, spec in zip(local_out, out_spec_list, strict=True):
      if o.size > 0:
        outs.append(next(kept_iter))
      else:
        factors = _spec_factors(mesh, spec, len(o.shape))
        outs.append(jnp.zeros(tuple(d * f for d, f in zip(o.shape, factors, strict=True)), o.dtype))
    return outs[0] if single else tuple(outs)

  return call


def _update_call(
  layout: Layout,
  state: PagedAdamW8bitState,
  hyper: jax.Array,
  grads: list[jax.Array],
  params: list[jax.Array],
  write_params: bool,
) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
  """Issues the custom call; returns (count, gnorm_vec, per-leaf outputs).

  With sharded params the call runs inside jax.shard_map: each device updates
  its own shards with its own registry slot, and nothing is gathered.
  """
  n = layout.num_leaves

  def local(handle, count, hyper, qmaps, rings, *leaves):
    out_types = [
      jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct(rings.shape, jnp.float32),
      *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in leaves[n:]),
    ]
    aliases = {4: 1}  # the clipping ring is updated in place
    if write_params:
      aliases.update({5 + n + i: 2 + i for i in range(n)})
    # No has_side_effect, unlike SPEC 5.2: the JAX effect it adds turns off
    # jit's C++ dispatch path (about 25 us per leaf per step; 13 ms on the
    # GPT-2 tree). The count operand and result order the updates of a state;
    # XLA drops the call only when none of its results is used (the state then
    # does not advance either), and may merge two calls only if they have the
    # same operands (the same state updated twice with the same grads in one
    # program, which with the flag would fail as stale).
    call = jax.ffi.ffi_call(_ffi.UPDATE_TARGET, out_types, input_output_aliases=aliases)
    return tuple(
      call(
        handle,
        count,
        hyper,
        qmaps,
        rings,
        *leaves,
        **layout.call_attributes(),
        percentile=np.int32(layout.percentile_clipping),
        write_params=write_params,
      )
    )

  rings = rings_operand(layout, state.gnorm_vec)
  operands = (state.handle, state.count, hyper, jnp.asarray(QMAPS), rings)
  replicated = (PartitionSpec(),) * len(operands)
  outs = sharded(
    layout,
    local,
    (*replicated, *layout.specs, *layout.specs),
    (PartitionSpec(), PartitionSpec(), *layout.specs),
  )(*operands, *grads, *params)
  return outs[0], outs[1], list(outs[2:])


def _arrays_call(
  layout: Layout,
  count: jax.Array,
  rings: jax.Array,
  hyper: jax.Array,
  grads: list[jax.Array],
  params: list[jax.Array],
  moments: list[jax.Array],
  write_params: bool,
) -> tuple[jax.Array, jax.Array, list[jax.Array], list[jax.Array]]:
  """adamw8bit's custom call: the state goes in and out as arrays (aliased, so
  updated in place), no registry. Returns (count, rings, outputs, moments)."""
  n = layout.num_leaves
  arrays = moment_arrays(layout)

  def local(count, hyper, qmaps, rings, *leaves):
    out_types = [
      jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct(rings.shape, jnp.float32),
      *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in leaves[n : 2 * n]),
      *(a.local for a in arrays),
    ]
    aliases = {3: 1, **{4 + 2 * n + k: 2 + n + k for k in range(4 * n)}}
    if write_params:
      aliases.update({4 + n + i: 2 + i for i in range(n)})
    call = jax.ffi.ffi_call(_ffi.UPDATE_ARRAYS_TARGET, out_types, input_output_aliases=aliases)
    return tuple(
      call(
        count,
        hyper,
        qmaps,
        rings,
        *leaves,
        **layout.call_attributes(),
        percentile=np.int32(layout.percentile_clipping),
        write_params=write_params,
      )
    )

  operands = (count, hyper, jnp.asarray(QMAPS), rings)
  specs = tuple(a.spec for a in arrays)
  outs = sharded(
    layout,
    local,
    ((PartitionSpec(),) * 4 + layout.specs + layout.specs + specs),
    (PartitionSpec(), PartitionSpec(), *layout.specs, *specs),
  )(*operands, *grads, *params, *moments)
  return outs[0], outs[1], list(outs[2 : 2 + n]), list(outs[2 + n :])


def _validate(
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
) -> _Config:
  """Checks every constructor argument that is concrete (traced ones, under
  optax.inject_hyperparams, are checked where they are used or not at all)."""
  if _static_value(amsgrad) is not False:
    raise ValueError(
      f"{who}: amsgrad={amsgrad!r} is not supported (bitsandbytes' 8-bit Adam has no AMSGrad "
      "variant)"
    )
  if not callable(lr):
    _check_range(who, "lr", lr, lambda x: x >= 0, ">= 0")
  try:
    b1, b2 = betas
  except (TypeError, ValueError):
    raise ValueError(f"{who}: betas must be a pair (beta1, beta2), got {betas!r}") from None
  _check_range(who, "betas[0]", b1, lambda x: 0 <= x < 1, "in [0, 1)")
  _check_range(who, "betas[1]", b2, lambda x: 0 <= x < 1, "in [0, 1)")
  _check_range(who, "eps", eps, lambda x: x >= 0, ">= 0")
  _check_range(who, "weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
  return _resolve_config(who, optim_bits, args, min_8bit_size, percentile_clipping, block_wise)


def _build_layout(who: str, config: _Config, mask: Any, params: Any) -> Layout:
  """The static per-leaf layout of the params `init` is given."""
  for name in ("optim_bits", "min_8bit_size", "percentile_clipping"):
    if getattr(config, name) is None:
      raise ValueError(
        f"{who}: {name} is traced at init, but it fixes the per-leaf layout of the state and "
        "must be concrete there. Under optax.inject_hyperparams call init outside jax.jit, or "
        f"pass static_args=('{name}',)."
      )
  _ffi.check_backend(_platform_of(params))
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  decay = _mask_leaves(who, mask, params, treedef)
  mesh, specs = _mesh_and_specs(
    who, [(jax.tree_util.keystr(path), p) for path, p in leaves_with_path]
  )
  paths, shapes, dtypes, flags = [], [], [], []
  for (path, p), decays in zip(leaves_with_path, decay, strict=True):
    name = jax.tree_util.keystr(path)
    dtype = jnp.dtype(getattr(p, "dtype", None) or jnp.result_type(p))
    if dtype not in _PARAM_DTYPES:
      raise TypeError(
        f"{who}: param {name} has dtype {dtype}; only float32, bfloat16 and float16 params can "
        "be optimized"
      )
    shape = tuple(int(d) for d in np.shape(p))
    is_8bit = config.optim_bits == 8 and math.prod(shape) >= config.min_8bit_size
    paths.append(name)
    shapes.append(shape)
    dtypes.append(dtype.name)
    flags.append((LEAF_8BIT if is_8bit else 0) | (LEAF_DECAY if decays else 0))
  layout = Layout(
    treedef=treedef,
    paths=tuple(paths),
    shapes=tuple(shapes),
    dtypes=tuple(dtypes),
    leaf_flags=tuple(flags),
    optim_bits=config.optim_bits,
    min_8bit_size=config.min_8bit_size,
    percentile_clipping=config.percentile_clipping,
    block_wise=config.block_wise,
    mesh=mesh,
    specs=specs,
  )
  if layout.mesh is not None and layout.clipping:
    raise ValueError(
      f"{who}: percentile_clipping < 100 with params sharded over several devices is not "
      "supported yet (each device would clip by its own shard's norm); use "
      "optax.clip_by_global_norm before the optimizer instead"
    )
  return layout


def _check_state_layout(who: str, config: _Config, state: Any, state_type: type) -> Layout:
  if not isinstance(state, state_type):
    raise TypeError(
      f"{who}: expected the opt_state returned by {who}'s init, got {type(state).__name__}"
    )
  layout = state.layout
  scalars = {"count": jnp.int32}
  if state_type is PagedAdamW8bitState:
    scalars["handle"] = _ffi.HANDLE_DTYPE
  for name, dtype in scalars.items():
    value = getattr(state, name)
    if jnp.shape(value) != () or jnp.result_type(value) != jnp.dtype(dtype):
      raise TypeError(
        f"{who}: opt_state.{name} must be a scalar of dtype {jnp.dtype(dtype).name}, got "
        f"{jnp.result_type(value).name}{list(jnp.shape(value))}; use the opt_state that "
        f"{who}'s init returned"
      )
  for name in ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise"):
    mine, theirs = getattr(config, name), getattr(layout, name)
    if mine is not None and mine != theirs:
      raise ValueError(
        f"{who}: this opt_state was built by an optimizer with {name}={theirs!r}, this one has "
        f"{name}={mine!r}; use the optimizer that created the state"
      )
  return layout


def _step_inputs(who, layout, updates, params, count, lr, betas, eps, weight_decay):
  """Flattened and checked grads and params, their treedefs, the hyperparameters."""
  if params is None:
    raise ValueError(f"{who}: update needs the params: call tx.update(grads, opt_state, params)")
  _ffi.check_backend(_platform_of(params))
  grads, grads_def = _flatten_like(who, layout, updates, "grads")
  param_leaves, params_def = _flatten_like(who, layout, params, "params")
  _check_leaves(who, layout, grads, param_leaves)
  hyper = _hyperparams(lr, count, betas, eps, weight_decay)
  return grads, grads_def, param_leaves, params_def, hyper


def paged_adamw8bit(
  lr: float | optax.ScalarOrSchedule = 1e-3,
  betas: tuple[float, float] = (0.9, 0.999),
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
  elements keep float32 moments. Non-finite gradient elements leave their
  param unchanged and reset their moments.

  Args:
    lr: learning rate, a float or an optax schedule of the step count.
    betas: (beta1, beta2), each in [0, 1).
    eps: added to the bias-corrected denominator, >= 0.
    weight_decay: decoupled weight decay, >= 0.
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

  Returns:
    An ``optax.GradientTransformation``. Its ``update`` needs ``params`` and
    returns updates that ``optax.apply_updates`` turns into exactly the new
    params. Each opt_state can be updated once (the moments advance in
    place); use :func:`accumulate_gradients` instead of ``optax.MultiSteps``.
    The moments' memory is freed by :func:`release`, or by the collector
    once no live ``jax.Array`` holds the state's handle (:func:`collect`).

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
  config = _validate(
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
    layout = _build_layout(who, config, mask, params)
    _ffi.scan_for_unheld_states(wait=True)  # reclaim states that are gone first
    return PagedAdamW8bitState(
      count=jnp.zeros([], jnp.int32),
      handle=jnp.asarray(_ffi.new_handle(), _ffi.HANDLE_DTYPE),
      gnorm_vec=initial_rings(layout),
      layout=layout,
    )

  def step(updates, state, params, write_params):
    layout = _check_state_layout(who, config, state, PagedAdamW8bitState)
    if _inside_optax_multisteps():
      raise ValueError(
        "paged_adamw8bit cannot run inside optax.MultiSteps: MultiSteps runs the inner update on "
        "every micro-step and keeps or discards its new state afterwards, but a paged state is "
        "advanced in place, so it would be corrupted. Accumulate with "
        "optax_paged8bit.accumulate_gradients(tx, every_k_steps), or use adamw8bit."
      )
    grads, grads_def, param_leaves, params_def, hyper = _step_inputs(
      who, layout, updates, params, state.count, lr, betas, eps, weight_decay
    )
    concrete = all(
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
      for x in (state.handle, state.count)
    )
    if concrete and layout.mesh is None:
      _ffi.check_update(state.handle, state.count, layout)  # eager: fail before the call
    count, rings, outs = _update_call(layout, state, hyper, grads, param_leaves, write_params)
    out_def = params_def if write_params else grads_def
    rings = rings if layout.clipping else None
    return out_def.unflatten(outs), state._replace(count=count, gnorm_vec=rings)

  return PagedGradientTransformation(
    init_fn,
    lambda updates, state, params=None: step(updates, state, params, False),
    lambda updates, state, params: step(updates, state, params, True),
  )


def adamw8bit(
  lr: float | optax.ScalarOrSchedule = 1e-3,
  betas: tuple[float, float] = (0.9, 0.999),
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
) -> PagedGradientTransformation:
  """8-bit blockwise AdamW with its state as ordinary JAX arrays (bitsandbytes' AdamW8bit).

  The same contract, algorithm and custom call as :func:`paged_adamw8bit`,
  bit for bit; the codes and scales live in the optax state (an
  :class:`Adam8bitState`, the format `export_state` returns) instead of the
  registry. The update is a pure function, so it works where a paged state
  cannot: ``optax.MultiSteps``, ``optax.apply_if_finite``, ``jnp.where``
  selection between states, re-running a step. The state arrays shard like
  the params (see `export_state`), and orbax saves them as they are.

  Args and Returns: as :func:`paged_adamw8bit`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_paged8bit import adamw8bit
    >>> tx = optax.MultiSteps(adamw8bit(2e-4), every_k_schedule=4)
  """
  who = "adamw8bit"
  config = _validate(
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
    layout = _build_layout(who, config, mask, params)

    def zeros(a: MomentArray) -> jax.Array:
      if layout.mesh is None:
        return jnp.zeros(a.shape, a.local.dtype)
      return jnp.zeros(a.shape, a.local.dtype, device=NamedSharding(layout.mesh, a.spec))

    return Adam8bitState(
      count=jnp.zeros([], jnp.int32),
      qmap1=jnp.asarray(QMAPS[0]),
      qmap2=jnp.asarray(QMAPS[1]),
      moments=moments_tree(layout, [zeros(a) for a in moment_arrays(layout)]),
      gnorm_vec=initial_rings(layout),
      layout=layout,
    )

  def step(updates, state, params, write_params):
    layout = _check_state_layout(who, config, state, Adam8bitState)
    grads, grads_def, param_leaves, params_def, hyper = _step_inputs(
      who, layout, updates, params, state.count, lr, betas, eps, weight_decay
    )
    count, rings, outs, new_moments = _arrays_call(
      layout,
      state.count,
      rings_operand(layout, state.gnorm_vec),
      hyper,
      grads,
      param_leaves,
      moments_flat(layout, state.moments),
      write_params,
    )
    out_def = params_def if write_params else grads_def
    new_state = state._replace(
      count=count,
      gnorm_vec=rings if layout.clipping else None,
      moments=moments_tree(layout, new_moments),
    )
    return out_def.unflatten(outs), new_state

  return PagedGradientTransformation(
    init_fn,
    lambda updates, state, params=None: step(updates, state, params, False),
    lambda updates, state, params: step(updates, state, params, True),
  )


class PagedGradientTransformation(optax.GradientTransformation):
  """An optax transformation that also offers the fused, in-place step.

  ``fused_update(grads, opt_state, params) -> (new_params, new_opt_state)``
  writes the new params into the params' buffers (donate them to the jitted
  step) instead of returning updates: 16 bytes of memory traffic per float32
  param instead of 28 through ``update`` + ``optax.apply_updates``, with
  bit-identical results.
  """

  def __new__(cls, init: Callable, update: Callable, fused_update: Callable):
    tx = super().__new__(cls, init, update)
    tx.fused_update = fused_update
    return tx
