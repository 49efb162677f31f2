"""Migration from and to optax.adamw: its float32 mu and nu quantized into an
8-bit state (each device quantizing its own shards, as the update does), and
an 8-bit state's moments dequantized back."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_paged8bit._layout import Layout, moment_arrays, moments_flat, sharded
from optax_paged8bit.checkpoint import export_state, import_state
from optax_paged8bit.functional import Adam8bitState, arrays_state
from optax_paged8bit.paged import PagedAdamW8bitState
from optax_paged8bit.quantization import (
  QMAP_SIGNED,
  QMAP_UNSIGNED,
  dequantize_blockwise,
  quantize_blockwise,
)


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


def _is_8bit_state(x: Any) -> bool:
  return isinstance(x, (PagedAdamW8bitState, Adam8bitState))


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
  if not _is_8bit_state(opt_state):
    raise TypeError("from_optax_adamw: opt_state must come from paged_adamw8bit or adamw8bit")
  layout = opt_state.layout
  mus = layout.treedef.flatten_up_to(adam.mu)
  nus = layout.treedef.flatten_up_to(adam.nu)
  flat = _quantize_moments(layout, *mus, *nus)
  rings = jnp.zeros((layout.num_leaves, 100), jnp.float32) if layout.clipping else None
  converted = arrays_state(layout, jnp.asarray(adam.count, jnp.int32), list(flat), rings)
  return import_state(opt_state, converted)


def to_optax_adamw(opt_state: Any) -> optax.ScaleByAdamState:
  """The dequantized moments of a paged_adamw8bit or adamw8bit state as an
  optax `ScaleByAdamState` (float32 `mu`, `nu`, the step count): put it in
  place of the ScaleByAdamState of `optax.adamw(...).init(params)`."""
  if not _is_8bit_state(opt_state):
    raise TypeError("to_optax_adamw: opt_state must come from paged_adamw8bit or adamw8bit")
  exported = export_state(opt_state)
  layout = exported.layout
  out = _dequantize_moments(layout, *moments_flat(layout, exported))
  n = layout.num_leaves
  return optax.ScaleByAdamState(
    count=exported.count,
    mu=layout.treedef.unflatten(list(out[:n])),
    nu=layout.treedef.unflatten(list(out[n:])),
  )
