"""The constructor's contract: bitsandbytes' arguments, their `args`
overrides and their validation (ValueError/TypeError naming the argument and
the value), the per-step hyperparameters, and the layout `init` builds."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged8bit import _ffi
from optax_paged8bit._layout import LEAF_8BIT, LEAF_DECAY, Layout, mesh_and_specs

PARAM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_TRACER_ERRORS = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerArrayConversionError,
  jax.errors.TracerIntegerConversionError,
  jax.errors.TracerBoolConversionError,
)


class Traced:
  """The value of an argument that is a tracer (under optax.inject_hyperparams)."""


TRACED = Traced()


def concrete_number(who: str, name: str, x: Any) -> float | int | bool | Traced:
  """The Python number `x` holds, TRACED for a tracer; a TypeError naming
  the argument for anything that is not a real scalar."""
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, numbers.Real):
    return x
  if isinstance(x, jax.core.Tracer):
    return TRACED
  if isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.shape(x) == ():
    dtype = np.dtype(x.dtype)
    if dtype.kind in "biuf" or dtype == jnp.bfloat16:
      try:
        return np.asarray(x).item()
      except _TRACER_ERRORS:
        return TRACED
  raise TypeError(f"{who}: {name} must be a real number, got {x!r}")


def _check_float(who: str, name: str, x: Any, ok: Callable[[float], bool], rule: str) -> Any:
  value = concrete_number(who, name, x)
  if value is TRACED:
    return value
  if not math.isfinite(value) or not ok(value):
    raise ValueError(f"{who}: {name} must be {rule}, got {value!r}")
  return float(value)


def _check_int(who: str, name: str, value: Any, lo: int, hi: float) -> int | Traced:
  concrete = concrete_number(who, name, value)
  if concrete is TRACED:
    return concrete
  if isinstance(concrete, bool) or not float(concrete).is_integer() or not lo <= concrete <= hi:
    rule = f"an integer in {lo}..{hi}" if hi != math.inf else f"an integer >= {lo}"
    raise ValueError(f"{who}: {name} must be {rule}, got {concrete!r}")
  return int(concrete)


@dataclasses.dataclass(frozen=True)
class Config:
  """Validated arguments. The layout-fixing ones are TRACED when they come
  traced (optax.inject_hyperparams without static_args); `structure` then
  holds them for the custom call to check against the state's layout."""

  optim_bits: int | Traced  # effective: 8, or 32 through args
  min_8bit_size: int | Traced
  percentile_clipping: int | Traced
  block_wise: bool
  structure: tuple | None  # (optim_bits keyword, effective bits, min_8bit_size,
  # percentile_clipping, block_wise) as given, when any is traced

  def structure_operand(self) -> jax.Array:
    if self.structure is None:
      return jnp.zeros((0,), jnp.int32)
    return jnp.stack([jnp.asarray(v).astype(jnp.int32).reshape(()) for v in self.structure])


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
  who: str, optim_bits: Any, args: Any, min_8bit_size: Any, percentile_clipping: Any, block_wise
) -> Config:
  """Validates the structural arguments, with bnb's `args` overrides."""
  bits = concrete_number(who, "optim_bits", optim_bits)
  if bits is not TRACED and bits != 32:
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
      concrete = concrete_number(who, "args.optim_bits", effective_bits)
      if concrete is not TRACED and concrete not in (8, 32):
        raise ValueError(f"{who}: args.optim_bits must be 8 or 32, got {concrete!r}")
    min_8bit_size = fields.get("min_8bit_size", min_8bit_size)
    percentile_clipping = fields.get("percentile_clipping", percentile_clipping)
    block_wise = fields.get("block_wise", block_wise)
  block_wise_value = concrete_number(who, "block_wise", block_wise)
  if not isinstance(block_wise_value, bool):
    raise ValueError(f"{who}: block_wise must be a Python bool, got {block_wise!r}")
  resolved = dict(
    optim_bits=_check_int(who, "optim_bits", effective_bits, 8, 32),
    min_8bit_size=_check_int(who, "min_8bit_size", min_8bit_size, 0, 2**31 - 1),
    percentile_clipping=_check_int(who, "percentile_clipping", percentile_clipping, 1, 100),
  )
  traced = bits is TRACED or any(v is TRACED for v in resolved.values())
  structure = None
  if traced:
    structure = (optim_bits, effective_bits, min_8bit_size, percentile_clipping, block_wise_value)
  return Config(**resolved, block_wise=block_wise_value, structure=structure)


DEFAULT_LR = 1e-3
DEFAULT_BETAS = (0.9, 0.999)


def _same(who: str, names: str, a: Any, b: Any) -> bool:
  """Whether two spellings of one argument hold one value (the same schedule,
  or equal numbers); traced values cannot be compared and count as different."""
  if a is b:
    return True
  if callable(a) or callable(b):
    return False
  x, y = concrete_number(who, names, a), concrete_number(who, names, b)
  return x is not TRACED and y is not TRACED and x == y


def optax_spellings(who: str, lr, betas, learning_rate, b1, b2) -> tuple[Any, Any]:
  """(lr, betas) from bitsandbytes' spellings and optax's (learning_rate, b1,
  b2), which may be given instead: both spellings of one argument must agree;
  neither gives bitsandbytes' default."""
  # The optax spellings are checked under their own names first.
  if learning_rate is not None and not callable(learning_rate):
    if isinstance(learning_rate, str):
      raise TypeError(
        f"{who}: learning_rate must be a float or an optax schedule (count -> lr), got "
        f"{learning_rate!r}"
      )
    _check_float(who, "learning_rate", learning_rate, lambda x: x >= 0, "finite and >= 0")
  for name, value in (("b1", b1), ("b2", b2)):
    if value is not None:
      _check_float(who, name, value, lambda x: 0 <= x < 1, "in [0, 1)")
  if learning_rate is not None:
    if lr is not None and not _same(who, "lr", lr, learning_rate):
      raise ValueError(
        f"{who}: lr={lr!r} and learning_rate={learning_rate!r} are two spellings of one "
        "argument (bitsandbytes' and optax's) that do not hold the same value; give one of them"
      )
    lr = learning_rate
  lr = DEFAULT_LR if lr is None else lr
  if b1 is None and b2 is None:
    return lr, DEFAULT_BETAS if betas is None else betas
  if betas is None:
    betas = DEFAULT_BETAS
  try:
    given = tuple(betas)
    if len(given) != 2:
      raise ValueError
  except (TypeError, ValueError):
    raise ValueError(f"{who}: betas must be a pair (beta1, beta2), got {betas!r}") from None
  out = list(given)
  for i, (name, value) in enumerate((("b1", b1), ("b2", b2))):
    if value is None:
      continue
    if betas is not DEFAULT_BETAS and not _same(who, name, given[i], value):
      raise ValueError(
        f"{who}: betas[{i}]={given[i]!r} and {name}={value!r} are two spellings of one argument "
        "(bitsandbytes' and optax's) that do not hold the same value; give one of them"
      )
    out[i] = value
  return lr, tuple(out)


def validate(
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
) -> Config:
  """Checks every constructor argument that is concrete (traced ones, under
  optax.inject_hyperparams, are checked by the custom call: a layout-fixing
  one must not change, a float one that a step cannot run with skips it)."""
  if concrete_number(who, "amsgrad", amsgrad) is not False:
    raise ValueError(
      f"{who}: amsgrad={amsgrad!r} is not supported (bitsandbytes' 8-bit Adam has no AMSGrad "
      "variant)"
    )
  lr_value = TRACED
  if not callable(lr):
    if isinstance(lr, str):
      raise TypeError(f"{who}: lr must be a float or an optax schedule (count -> lr), got {lr!r}")
    lr_value = _check_float(who, "lr", lr, lambda x: x >= 0, "finite and >= 0")
  try:
    b1, b2 = betas
  except (TypeError, ValueError):
    raise ValueError(f"{who}: betas must be a pair (beta1, beta2), got {betas!r}") from None
  _check_float(who, "betas[0]", b1, lambda x: 0 <= x < 1, "in [0, 1)")
  _check_float(who, "betas[1]", b2, lambda x: 0 <= x < 1, "in [0, 1)")
  _check_float(who, "eps", eps, lambda x: x >= 0, "finite and >= 0")
  wd = _check_float(who, "weight_decay", weight_decay, lambda x: x >= 0, "finite and >= 0")
  if lr_value is not TRACED and wd is not TRACED:
    check_decay(who, lr_value, wd)
  return _resolve_config(who, optim_bits, args, min_8bit_size, percentile_clipping, block_wise)


def check_decay(who: str, lr: float, wd: float) -> None:
  if lr * wd > 1:
    raise ValueError(
      f"{who}: weight_decay={wd!r} with lr={lr!r} gives the decay factor 1 - lr*weight_decay = "
      f"{1 - lr * wd:g}, which would flip the params' sign; lr * weight_decay must be at most 1"
    )


def hyperparams(who: str, lr: Any, count: Any, betas: Any, eps: Any, weight_decay: Any):
  """The float32[5] hyperparameter operand (lr, beta1, beta2, eps, wd). A
  schedule's lr is checked when it is concrete (an eager update); traced, a
  value the step cannot run with skips the step (StepScalars::valid)."""
  lr_value = lr(count) if callable(lr) else lr
  if callable(lr):
    value = concrete_number(who, "the lr schedule's value", jnp.asarray(lr_value).reshape(()))
    if value is not TRACED:
      if not math.isfinite(value) or value < 0:
        raise ValueError(
          f"{who}: the lr schedule returned {value!r} at count {int(count)}; it must be finite "
          "and >= 0"
        )
      wd = concrete_number(who, "weight_decay", weight_decay)
      if wd is not TRACED:
        check_decay(who, value, wd)
  b1, b2 = betas
  values = (lr_value, b1, b2, eps, weight_decay)
  return jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in values])


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
    try:
      value = concrete_number(who, "mask", leaf)
    except TypeError:
      value = None
    if not isinstance(value, bool):
      raise ValueError(f"{who}: mask leaves must be Python bools, got {leaf!r}")
    flags.append(value)
  return flags


def check_mask(who: str, mask: Any, layout: Layout, param_leaves: list[Any]) -> None:
  """The optimizer's mask gives each leaf the weight decay the state was made
  with (the mask is fixed into the state's layout at init)."""
  params = layout.treedef.unflatten(param_leaves)
  for path, flags, decays in zip(
    layout.paths, layout.leaf_flags, _mask_leaves(who, mask, params, layout.treedef), strict=True
  ):
    if bool(flags & LEAF_DECAY) != decays:
      on_off = lambda d: "on" if d else "off"
      raise ValueError(
        f"{who}: leaf {path} has weight decay {on_off(not decays)} in this opt_state (the mask "
        f"of the optimizer whose init made it) but {on_off(decays)} in this optimizer's mask. "
        "The mask is fixed into the state at init: update the state with the optimizer that "
        "created it, or build a new state with this optimizer's init."
      )


def platform_of(tree: Any) -> str:
  """Platform of the concrete arrays of a tree, else JAX's default backend."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      return next(iter(leaf.devices())).platform
  return jax.default_backend()


def build_layout(who: str, config: Config, mask: Any, params: Any) -> Layout:
  """The static per-leaf layout of the params `init` is given."""
  traced = [
    n
    for n in ("optim_bits", "min_8bit_size", "percentile_clipping")
    if getattr(config, n) is TRACED
  ]
  if traced:
    names = ", ".join(traced)
    static = ", ".join(f"'{n}'" for n in traced) + ("," if len(traced) == 1 else "")
    raise ValueError(
      f"{who}: {names} {'is' if len(traced) == 1 else 'are'} traced at init, but "
      f"{'it fixes' if len(traced) == 1 else 'they fix'} the per-leaf layout of the state and "
      "must be concrete there. Under optax.inject_hyperparams call init outside jax.jit, or "
      f"pass static_args=({static})."
    )
  _ffi.check_backend(platform_of(params))
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_path]
  for name, p in zip(paths, (p for _, p in leaves_with_path), strict=True):
    if not hasattr(p, "dtype") or not hasattr(p, "shape"):
      raise TypeError(
        f"{who}: param {name} is a {type(p).__name__}, not an array; pass params as arrays "
        "(jnp.asarray), so that init and update see the same dtype"
      )
  decay = _mask_leaves(who, mask, params, treedef)
  leaves = [p for _, p in leaves_with_path]
  mesh, specs = mesh_and_specs(who, list(zip(paths, leaves, strict=True)))
  shapes, dtypes, flags = [], [], []
  for name, (_, p), decays in zip(paths, leaves_with_path, decay, strict=True):
    dtype = jnp.dtype(p.dtype)
    if dtype not in PARAM_DTYPES:
      raise TypeError(
        f"{who}: param {name} has dtype {dtype}; only float32, bfloat16 and float16 params can "
        "be optimized"
      )
    shape = tuple(int(d) for d in np.shape(p))
    is_8bit = config.optim_bits == 8 and math.prod(shape) >= config.min_8bit_size
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
  return layout


def check_state_layout(who: str, config: Config, state: Any, state_type: type, scalars) -> Layout:
  """The layout of a state given to `who`'s update, after checking that it is
  one of its states and that the concrete layout-fixing arguments agree."""
  if not isinstance(state, state_type):
    raise TypeError(
      f"{who}: expected the opt_state returned by {who}'s init, got {type(state).__name__}"
    )
  layout = state.layout
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
    if mine is not TRACED and mine != theirs:
      raise ValueError(
        f"{who}: this opt_state was built with {name}={theirs!r}, this update has "
        f"{name}={mine!r}. It fixes the state's layout at init and cannot change afterwards: "
        "use the optimizer that created the state, or build a new state with tx.init"
      )
  return layout
