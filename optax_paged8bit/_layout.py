"""The static per-leaf layout of a state, its key, and how it meets the trees
and devices of a step: the checks of grads and params against it, and the
sharding of the custom calls (jax.shard_map over the params' mesh)."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optax_paged8bit.quantization import BLOCK_SIZE, num_blocks, scale_shape

# Per-leaf flag bits; must match LeafFlag in csrc/adam8bit.h.
LEAF_8BIT = 1
LEAF_DECAY = 2
RING_SIZE = 100
# The fresh-token bit of a handle value (kFreshBit in csrc/registry.h): init
# returns FRESH_BIT | layout key, the first update replaces it by a registry key.
FRESH_BIT = 0x80000000
HANDLE_DTYPE = np.dtype(np.uint32)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Static per-leaf structure of a state, fixed at `init`.

  It is pytree metadata (no array leaves), so two optimizers built with the
  same arguments over the same params give states of identical tree structure
  and share one compiled step; traced copies of `min_8bit_size`, `optim_bits`
  or `percentile_clipping` (under `optax.inject_hyperparams`) cannot change it.
  Its hash is computed once: jit hashes the state's tree structure, and so
  this object, on every dispatch.
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

  def _fields(self) -> tuple:
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

  def __post_init__(self):
    object.__setattr__(self, "_hash", hash(self._fields()))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    if self is other:
      return True
    if not isinstance(other, Layout) or self._hash != other._hash:
      return False
    return self._fields() == other._fields()

  @property
  def num_leaves(self) -> int:
    return len(self.paths)

  @property
  def clipping(self) -> bool:
    return self.percentile_clipping < 100

  def is_8bit(self, i: int) -> bool:
    return bool(self.leaf_flags[i] & LEAF_8BIT)

  @functools.cached_property
  def key(self) -> int:
    """This layout's key (31 bits): in fresh tokens and registry slots."""
    return _intern(self)

  @property
  def fresh_token(self) -> int:
    return FRESH_BIT | self.key

  def leaf_sizes(self) -> np.ndarray:
    """Each leaf's elements on one device (export's and import's attribute)."""
    return np.asarray([math.prod(shape) for shape in self.local_shapes], np.int64)

  def call_attributes(self) -> dict[str, Any]:
    """The attributes every registry call of this layout takes (the update
    calls add the structure attributes)."""
    return dict(
      leaf_flags=np.asarray(self.leaf_flags, np.int32),
      block_wise=self.block_wise,
      layout_key=np.int64(self.key),
    )

  def structure_attributes(self) -> dict[str, Any]:
    """The layout-fixing arguments, as the update calls check them."""
    return dict(
      percentile=np.int32(self.percentile_clipping),
      optim_bits=np.int32(self.optim_bits),
      min_8bit_size=np.int64(self.min_8bit_size),
    )

  @functools.cached_property
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

  @functools.cached_property
  def key_paths(self) -> tuple[tuple, ...]:
    """Each leaf's key path without wrapper entries (see normalized_paths)."""
    return normalized_paths(self.treedef.unflatten([0] * self.treedef.num_leaves))

  def state_nbytes(self) -> int:
    """Bytes of the moments this layout keeps in the registry on each device
    (one arena per slot)."""
    return self.arena_bytes(0, self.num_leaves)

  def arena_bytes(self, lo: int, hi: int) -> int:
    """Bytes of leaves lo..hi-1 in a slot's arena, each array 256-byte
    aligned (csrc/registry.h's LeafArenaBytes): also a chunked step's staged
    moments of those leaves (_calls.update)."""
    pad = lambda n: -(-n // 256) * 256
    total = 0
    for i in range(lo, hi):
      size = math.prod(self.local_shapes[i])
      if self.is_8bit(i):
        scales = num_blocks(size) if self.block_wise else 1
        total += 2 * pad(size) + 2 * pad(4 * scales)
      else:
        total += 2 * pad(4 * size)
    return total

  def canonical(self) -> str:
    """What the key is hashed from: the same for equal layouts in every
    process (the mesh by its axes, not its devices)."""
    mesh = None if self.mesh is None else (self.mesh.axis_names, tuple(self.mesh.devices.shape))
    specs = tuple(tuple(s) for s in self.specs)
    return repr(
      (
        self.paths,
        self.shapes,
        self.dtypes,
        self.leaf_flags,
        self.optim_bits,
        self.min_8bit_size,
        self.percentile_clipping,
        self.block_wise,
        mesh,
        specs,
      )
    )


jax.tree_util.register_static(Layout)

_interned_lock = threading.Lock()
_key_of: dict[Layout, int] = {}
_layout_of: dict[int, Layout] = {}


def _intern(layout: Layout) -> int:
  """A 31-bit key for the layout: a hash of its canonical form, so that a
  fresh state's token means the same layout in every process; another layout
  of this process that hashes alike takes the next free key."""
  with _interned_lock:
    key = _key_of.get(layout)
    if key is not None:
      return key
    digest = hashlib.blake2b(layout.canonical().encode(), digest_size=4).digest()
    key = (int.from_bytes(digest, "little") & 0x7FFFFFFF) or 1
    while key in _layout_of:
      key = key % 0x7FFFFFFF + 1
    _key_of[layout] = key
    _layout_of[key] = layout
    return key


def layout_for_key(key: int) -> Layout | None:
  """The layout of this process with that key (None when none has it)."""
  with _interned_lock:
    return _layout_of.get(int(key))


def _is_value_attribute(entry: Any) -> bool:
  return isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value"


def normalized_paths(tree: Any) -> tuple[tuple, ...]:
  """The key path of each leaf of `tree`, without `.value` attribute entries:
  wrapper nodes that hold one array (Flax NNX's Variables, which init sees and
  update may not) do not count as structure."""
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  return tuple(
    tuple(entry for entry in path if not _is_value_attribute(entry)) for path, _ in leaves_with_path
  )


def flatten_like(who: str, layout: Layout, tree: Any, what: str) -> tuple[list[Any], Any]:
  """Leaves of `tree` (grads or params) in the params' order, and its treedef.

  The tree must have the key paths of the params the state was made for; it
  may differ from them only by wrapper nodes that hold one array each (Flax
  NNX hands init Variables and update plain arrays). A ValueError names the
  first key path that differs, before anything runs.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if treedef == layout.treedef:
    return leaves, treedef
  got, want = normalized_paths(tree), layout.key_paths
  if got != want:
    keystr = lambda path: jax.tree_util.keystr(path) or "(the root)"
    for g, w in zip(got, want, strict=False):
      if g != w:
        detail = f"the {what} have a leaf at {keystr(g)} where the params have {keystr(w)}"
        break
    else:
      if len(got) > len(want):
        detail = f"the {what} have an extra leaf at {keystr(got[len(want)])}"
      else:
        detail = f"the {what} have no leaf at {keystr(want[len(got)])}"
    raise ValueError(
      f"{who}: the {what} do not have the tree structure of the params this opt_state was "
      f"initialised for ({len(got)} leaves against {len(want)}): {detail}.\n"
      f"  state:  {layout.treedef}\n  {what}: {treedef}"
    )
  return leaves, treedef


def check_leaves(who: str, layout: Layout, grads: list[Any], params: list[Any]) -> None:
  """Each grad and param has its leaf's shape and dtype."""
  for path, shape, dtype, g, p in zip(
    layout.paths, layout.shapes, layout.dtypes, grads, params, strict=True
  ):
    for name, x in (("param", p), ("grad", g)):
      if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(
          f"{who}: {name} {path} is a {type(x).__name__}, not an array; params and grads must "
          "be arrays (jnp.asarray)"
        )
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


# -- sharding -----------------------------------------------------------------


def spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def local_shape(shape: tuple[int, ...], spec: Any, mesh: Any) -> tuple[int, ...]:
  """The shape of one device's shard of an array of `shape` sharded by `spec`."""
  out = list(shape)
  for dim, entry in enumerate(spec):
    n = math.prod(mesh.shape[a] for a in spec_axes(entry))
    out[dim] //= n
  return tuple(out)


def mesh_and_specs(who: str, leaves: list[tuple[str, Any]]) -> tuple[Any, tuple]:
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
      n = math.prod(mesh.shape[a] for a in spec_axes(entry))
      if np.shape(p)[dim] % n:
        raise ValueError(
          f"{who}: param {name} has {np.shape(p)[dim]} elements on axis {dim}, not a "
          f"multiple of its {n} shards"
        )
    specs.append(PartitionSpec(*spec))
  return mesh, tuple(specs)


def _mesh_shape(x: Any) -> tuple[tuple[str, int], ...] | None:
  """The (axis, size) pairs of the mesh of more than one device that `x` is
  placed on (seen through jax.typeof inside jit); () when it is on one
  device; None when that cannot be told."""
  if isinstance(x, jax.core.Tracer):
    sharding = getattr(jax.typeof(x), "sharding", None)
  else:
    sharding = getattr(x, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None:
    return () if sharding is not None and len(getattr(sharding, "device_set", ())) == 1 else None
  return _axes(mesh)


def _axes(mesh: Any) -> tuple[tuple[str, int], ...]:
  shape = tuple((str(a), int(n)) for a, n in dict(mesh.shape).items())
  return shape if math.prod(n for _, n in shape) > 1 else ()


def check_placement(who: str, layout: Layout, params: list[Any]) -> None:
  """Each param lies on the mesh that init saw (or on one device, as init
  saw it): a state's moments live where init placed them, one slot per
  device of that mesh."""
  want = () if layout.mesh is None else _axes(layout.mesh)
  for path, p in zip(layout.paths, params, strict=True):
    got = _mesh_shape(p)
    if got is None or got == want or (got == () and want):
      continue  # unknown, the same, or a value jit places on the mesh itself
    where = lambda shape: (
      "one device" if not shape else "a mesh of " + ", ".join(f"{a}={n}" for a, n in shape)
    )
    raise ValueError(
      f"{who}: param {path} lies on {where(got)}, but this opt_state was made by init for "
      f"params on {where(want)}, where its moments live. Call tx.init on the params as they are "
      "placed for the update (init reads their shardings), or place the params as they were "
      "at init."
    )


def _spec_factors(mesh: Any, spec: PartitionSpec, ndim: int) -> list[int]:
  """How many devices split each dimension under `spec`."""
  entries = [spec[i] if i < len(spec) else None for i in range(ndim)]
  return [math.prod(mesh.shape[a] for a in spec_axes(entry)) for entry in entries]


# True while `sharded` traces a body outside shard_map for its result shapes
# (no mesh axis is bound then: collectives must not run).
SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("shapes_only", default=False)


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
    token = SHAPES_ONLY.set(True)
    try:
      local_out = jax.eval_shape(fn, *local_in)
    finally:
      SHAPES_ONLY.reset(token)
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


def replicated(layout: Layout) -> NamedSharding | None:
  """Where a state's scalars live: replicated over the params' mesh."""
  return None if layout.mesh is None else NamedSharding(layout.mesh, PartitionSpec())


# -- the moment arrays ------------------------------------------------------------


class MomentArray(NamedTuple):
  """One exported array: its per-device type, its global shape and spec."""

  local: jax.ShapeDtypeStruct
  shape: tuple[int, ...]
  spec: PartitionSpec


@functools.lru_cache(maxsize=64)
def moment_arrays(layout: Layout) -> tuple[MomentArray, ...]:
  """The four arrays of each leaf (state1, state2, absmax1, absmax2), leaf by leaf.

  Codes shard like their param. Scales do too when each device's last axis
  divides by 256 (they are shaped like the param with that axis divided by
  256); otherwise each device's scales are flat and the global array is their
  concatenation over the leaf's shards, in device order.
  """
  out = []
  for i, (shape, local) in enumerate(zip(layout.shapes, layout.local_shapes, strict=True)):
    spec = layout.specs[i] if layout.mesh is not None else PartitionSpec()
    axes = tuple(a for entry in spec for a in spec_axes(entry))
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
  return tuple(out)


MOMENT_FIELDS = ("state1", "state2", "absmax1", "absmax2")


@functools.lru_cache(maxsize=64)
def in_calls(layout: Layout) -> tuple[int, ...]:
  """Which of moment_arrays' 4 arrays per leaf the custom calls take: all 4
  of an 8-bit leaf, the two float32 moments of another (its scales are empty,
  and zero-size operands only cost XLA's compiler time)."""
  return tuple(
    4 * i + k for i in range(layout.num_leaves) for k in range(4 if layout.is_8bit(i) else 2)
  )


class FlatPiece(NamedTuple):
  """Where one array of in_calls lies in a device's flat buffers of export
  and import: buffer 0 holds the uint8 codes, buffer 1 the float32 scales and
  float32 moments, leaf by leaf (DecodeFlatState in csrc/ffi_common.h)."""

  index: int  # into moment_arrays
  buffer: int
  offset: int
  size: int


@functools.lru_cache(maxsize=64)
def flat_state(layout: Layout) -> tuple[tuple[FlatPiece, ...], int, int]:
  """The pieces of in_calls' arrays in one device's flat buffers, and the
  buffers' lengths (codes, floats)."""
  arrays = moment_arrays(layout)
  pieces, used = [], [0, 0]
  for k in in_calls(layout):
    local = arrays[k].local
    buffer = 0 if local.dtype == jnp.uint8 else 1
    size = math.prod(local.shape)
    pieces.append(FlatPiece(k, buffer, used[buffer], size))
    used[buffer] += size
  return tuple(pieces), used[0], used[1]


def flat_spec(layout: Layout) -> PartitionSpec:
  """A flat buffer's sharding: one piece per device of the mesh."""
  return (
    PartitionSpec(tuple(layout.mesh.axis_names)) if layout.mesh is not None else PartitionSpec()
  )


def with_empty_scales(layout: Layout, arrays: list[Any]) -> list[Any]:
  """The 4 arrays per leaf from the arrays of the calls (in_calls order)."""
  it = iter(arrays)
  out = []
  for i in range(layout.num_leaves):
    out += [next(it), next(it)]
    out += [next(it), next(it)] if layout.is_8bit(i) else [None, None]
  return out


def _is_none(x: Any) -> bool:
  return x is None


def _moment_column(layout: Layout, tree: Any) -> list[Any]:
  """One moment field's leaves in the params' order. A None is a leaf where
  the params have an array (a float32 leaf's scales) but not where the params
  themselves hold None (a frozen or absent submodule)."""
  try:
    return layout.treedef.flatten_up_to(tree)
  except (ValueError, TypeError):  # another structure (say, NNX's): the count decides
    return jax.tree.leaves(tree, is_leaf=_is_none)


def moments_trees(layout: Layout, flat: list[Any], like: Any = None) -> dict[str, Any]:
  """The four params-shaped trees (state1, state2, absmax1, absmax2) from the
  4 arrays per leaf of the custom calls; a float32 leaf's scales are None.
  They take the structure of `like`'s trees when given (the state an update
  was given: Flax NNX hands it without the Variables that init saw), else
  the params' structure."""
  trees = {}
  for k, name in enumerate(MOMENT_FIELDS):
    leaves = [
      None if k >= 2 and not layout.is_8bit(i) else flat[4 * i + k]
      for i in range(layout.num_leaves)
    ]
    treedef = layout.treedef
    if like is not None:
      try:  # the params' structure, whose own Nones are no leaves
        layout.treedef.flatten_up_to(getattr(like, name))
      except (ValueError, TypeError):
        treedef = jax.tree.structure(getattr(like, name), is_leaf=_is_none)
    trees[name] = treedef.unflatten(leaves)
  return trees


def moments_flat(layout: Layout, trees: Any) -> list[Any]:
  """The inverse of moments_trees (None scales become empty arrays); `trees`
  has the four fields as attributes (an Adam8bitState)."""
  empty = jnp.zeros((0,), jnp.float32)
  columns = [_moment_column(layout, getattr(trees, name)) for name in MOMENT_FIELDS]
  for name, column in zip(MOMENT_FIELDS, columns, strict=True):
    if len(column) != layout.num_leaves:
      raise ValueError(
        f"the state's {name} has {len(column)} leaves, its params {layout.num_leaves}; use the "
        "state that init returned for these params"
      )
  flat = []
  for i in range(layout.num_leaves):
    for k in range(4):
      x = columns[k][i]
      flat.append(empty if x is None else x)
  return flat


def rings_operand(layout: Layout, gnorm_vec: Any) -> jax.Array:
  """The clipping-ring operand: the ring, or an empty array when clipping is off."""
  return gnorm_vec if layout.clipping else jnp.zeros((0, RING_SIZE), jnp.float32)


def initial_rings(layout: Layout) -> jax.Array | None:
  if not layout.clipping:
    return None
  return jnp.zeros([layout.num_leaves, RING_SIZE], jnp.float32, device=replicated(layout))
