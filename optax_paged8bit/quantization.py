"""Dynamic quantization maps and blockwise scale shapes (SPEC 3.1).

The maps are computed here, in float32 exactly as bitsandbytes builds them, and
handed to the custom call as an operand; the tests check them bit for bit
against `shared/reference/`.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

#: Elements per quantization block (one float32 scale each).
BLOCK_SIZE = 256
#: Leaves with fewer elements than this keep float32 moments (bnb's default).
DEFAULT_MIN_8BIT_SIZE = 4096


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
  """torch.linspace in float32: each point one fused multiply-add from the
  nearer end."""
  start32, end32 = np.float32(start), np.float32(end)
  k = num - 1
  step = np.float32((np.float64(end32) - np.float64(start32)) / k)
  out = np.empty(num, np.float32)
  for i in range(num):
    if i < num // 2:
      out[i] = _fma_f32(step, np.float32(i), start32)
    else:
      out[i] = _fma_f32(-step, np.float32(k - i), end32)
  return out


def _fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
  """Single-rounding float32 fma (exact through Python's integer ratios)."""
  exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
  return _round_fraction_f32(exact)


def _round_fraction_f32(x) -> np.float32:
  """Rounds an exact rational to the nearest float32 (ties to even)."""
  if x == 0:
    return np.float32(0.0)
  lo = np.float32(float(x))  # float64 rounding, then float32: may double-round
  # Correct the double rounding by checking the two float32 neighbours.
  candidates = [lo, np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(-np.inf))]
  best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.uint32)) & 1))
  return np.float32(best)


def dynamic_map(signed: bool = True) -> np.ndarray:
  """bitsandbytes' dynamic (exponent + fraction) 8-bit map: 256 ascending
  float32 values in [-1, 1] (signed, no -1.0) or [0, 1] (unsigned)."""
  values: list[float] = []
  for e in range(7):
    k = 2**e if signed else 2 ** (e + 1)
    bounds = _linspace_f32(0.1, 1.0, k + 1)
    means = (bounds[:-1] + bounds[1:]) * np.float32(0.5)
    scale = np.float32(10.0 ** (e - 6))
    values += list(scale * means)
    if signed:
      values += list(-scale * means)
  values += [np.float32(0.0), np.float32(1.0)]
  table = np.sort(np.asarray(values, np.float32))
  assert table.shape == (256,), table.shape
  return table


#: The first moment's map: bitsandbytes' signed dynamic map, float32[256].
QMAP_SIGNED = dynamic_map(signed=True)
#: The second moment's map: bitsandbytes' unsigned dynamic map, float32[256].
QMAP_UNSIGNED = dynamic_map(signed=False)
#: Both maps as the custom call's operand, float32[2, 256].
QMAPS = np.stack([QMAP_SIGNED, QMAP_UNSIGNED])


def num_blocks(size: int) -> int:
  return -(-size // BLOCK_SIZE)


def scale_shape(shape: tuple[int, ...], block_wise: bool) -> tuple[int, ...]:
  """Shape of an exported absmax array of an 8-bit leaf.

  Blockwise scales are shaped like the param with the last axis divided by
  256 when it divides (so they shard like the param), else flat; the
  non-blockwise scale is one value.
  """
  if not block_wise:
    return (1,)
  size = math.prod(shape)
  if len(shape) >= 1 and shape[-1] % BLOCK_SIZE == 0 and shape[-1] > 0:
    return (*shape[:-1], shape[-1] // BLOCK_SIZE)
  return (num_blocks(size),)


def quantize_blockwise(x, qmap, block_wise: bool = True, signed: bool = True):
  """8-bit codes and float32 scales of `x` with the optimizer's quantizer (SPEC
  3.2 step 5: nearest map entry, ties to the even code, the sign fix for the
  signed map), in JAX. One scale per 256 elements of the flattened array (the
  last block may be partial), or one for the whole array.

  Returns (codes uint8 shaped like x, scales float32[blocks] or [1]).
  """
  import jax.numpy as jnp

  q = jnp.asarray(qmap, jnp.float32)
  flat = jnp.asarray(x, jnp.float32).reshape(-1)
  n = flat.shape[0]
  if block_wise:
    blocks = -(-n // BLOCK_SIZE)
    padded = jnp.pad(flat, (0, blocks * BLOCK_SIZE - n)).reshape(blocks, BLOCK_SIZE)
    absmax = jnp.max(jnp.abs(padded), axis=1)
    scaled = (padded / absmax[:, None]).reshape(-1)[:n]
  else:
    absmax = jnp.max(jnp.abs(flat), keepdims=True) if n else jnp.zeros((1,), jnp.float32)
    scaled = flat / absmax[0]
  k = jnp.clip(jnp.searchsorted(q, scaled, side="left"), 1, q.shape[0] - 1)
  mid = (q[k - 1] + q[k]) * 0.5
  even = jnp.where(k % 2 == 0, k, k - 1)
  code = jnp.where(scaled > mid, k, jnp.where(scaled < mid, k - 1, even))
  code = jnp.where(jnp.isnan(scaled), 0, code)
  if signed:
    flip = jnp.signbit(q[code]) != jnp.signbit(flat)
    code = jnp.where(flip, (code + jnp.where(flat > 0, 1, -1)) % 256, code)
  return code.astype(jnp.uint8).reshape(jnp.shape(x)), absmax


def dequantize_blockwise(codes, scales, qmap, block_wise: bool = True):
  """float32 values of codes from `quantize_blockwise` (in JAX)."""
  import jax.numpy as jnp

  values = jnp.asarray(qmap, jnp.float32)[codes.reshape(-1)]
  scales = jnp.asarray(scales, jnp.float32).reshape(-1)
  if block_wise:
    values = values * jnp.repeat(scales, BLOCK_SIZE)[: values.shape[0]]
  else:
    values = values * scales[0]
  return values.reshape(codes.shape)
