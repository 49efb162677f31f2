"""An independent NumPy reference of SPEC section 3 (the test oracle).

Written from the specification, not from the C++ code: vectorized float32
NumPy, with each fused multiply-add emulated exactly (an exact float64
product plus a two-sum correction of the final rounding to float32).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

F32 = np.float32
BLOCK = 256


def fma32(a, b, c) -> np.ndarray:
  """float32 fma with one rounding, vectorized."""
  a = np.asarray(a, F32).astype(np.float64)
  b = np.asarray(b, F32).astype(np.float64)
  c = np.asarray(c, F32).astype(np.float64)
  p = a * b  # exact: 24 + 24 bits fit in float64's 53
  with np.errstate(invalid="ignore", over="ignore"):
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly
    r = s.astype(F32)
    r64 = r.astype(np.float64)
    toward = np.where(s > r64, F32(np.inf), F32(-np.inf)).astype(F32)
    other = np.nextafter(r, toward)
    # s exactly halfway between two float32s: the float64 error decides.
    midpoint = np.isfinite(s) & (s != r64) & (r64 + other.astype(np.float64) == 2.0 * s)
    up = midpoint & (err > 0)
    down = midpoint & (err < 0)
    out = np.where(up, np.maximum(r, other), np.where(down, np.minimum(r, other), r))
  return out.astype(F32)


def pow_by_squaring(base: float, exponent: int) -> float:
  result = 1.0
  while exponent > 0:
    if exponent & 1:
      result = result * base
    base = base * base
    exponent >>= 1
  return result


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
  """Round float32 values to the param dtype (nearest even) and back."""
  return np.asarray(x, F32).astype(dtype).astype(F32)


def quantize(q: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Nearest map entry, ties to the even code, NaN to 0."""
  k = np.searchsorted(q, x, side="left")  # #{i : q[i] < x}; NaN sorts last
  k = np.clip(k, 1, 255)
  mid = (q[k - 1] + q[k]) * F32(0.5)
  with np.errstate(invalid="ignore"):
    code = np.where(x > mid, k, np.where(x < mid, k - 1, np.where(k % 2 == 0, k, k - 1)))
  code = np.where(np.isnan(x), 0, code)
  return code.astype(np.uint8)


def quantize_signed(q1: np.ndarray, m: np.ndarray, absmax: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    code = quantize(q1, m / absmax)
  flip = np.signbit(q1[code]) != np.signbit(m)
  step = np.where(m > 0, 1, -1)
  return np.where(flip, (code.astype(np.int64) + step) % 256, code).astype(np.uint8)


def quantize_unsigned(q2: np.ndarray, v: np.ndarray, absmax: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return quantize(q2, v / absmax)


def block_max(x: np.ndarray) -> np.ndarray:
  """max |x| along the last axis, from 0, skipping NaN (bitsandbytes' fmaxf
  reduction; a NaN moment comes from a zero code under an infinite scale)."""
  return np.fmax.reduce(np.abs(x), axis=-1, initial=F32(0)).astype(F32)


class Oracle:
  """paged_adamw8bit of SPEC 3 over a flat list of NumPy leaves."""

  def __init__(
    self,
    q1,
    q2,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    min_8bit_size=4096,
    percentile_clipping=100,
    block_wise=True,
    optim_bits=8,
    decay_mask=None,
  ):
    self.q1, self.q2 = np.asarray(q1, F32), np.asarray(q2, F32)
    self.lr, self.b1, self.b2 = F32(lr), F32(betas[0]), F32(betas[1])
    self.eps, self.wd = F32(eps), F32(weight_decay)
    self.min_8bit_size = min_8bit_size
    self.percentile = percentile_clipping
    self.block_wise = block_wise
    self.optim_bits = optim_bits
    self.decay_mask = decay_mask

  def init(self, params: list[np.ndarray]) -> None:
    self.t = 0
    self.leaves = []
    for p in params:
      n = p.size
      if self.optim_bits == 8 and n >= self.min_8bit_size:
        nscale = -(-n // BLOCK) if self.block_wise else 1
        self.leaves.append(
          dict(
            is_8bit=True,
            state1=np.zeros(n, np.uint8),
            state2=np.zeros(n, np.uint8),
            absmax1=np.zeros(nscale, F32),
            absmax2=np.zeros(nscale, F32),
          )
        )
      else:
        self.leaves.append(dict(is_8bit=False, state1=np.zeros(n, F32), state2=np.zeros(n, F32)))
      self.leaves[-1]["ring"] = np.zeros(100, F32)

  # -- per-step scalars -----------------------------------------------------
  def scalars(self):
    t = self.t
    c1 = F32(1.0 - pow_by_squaring(float(self.b1), t))
    c2 = F32(math.sqrt(1.0 - pow_by_squaring(float(self.b2), t)))
    step_size = F32(F32(-self.lr) * c2) / c1
    eps_hat = self.eps * c2
    decay = fma32(-self.lr, self.wd, F32(1.0))
    return step_size, eps_hat, decay

  def runnable(self) -> bool:
    """Hyperparameters a step can run with (else it is skipped)."""
    _, _, decay = self.scalars()
    finite = np.isfinite([self.lr, self.eps, self.wd]).all()
    return bool(
      finite
      and self.lr >= 0
      and 0 <= self.b1 < 1
      and 0 <= self.b2 < 1
      and self.eps >= 0
      and self.wd >= 0
      and decay >= 0
    )

  def clip_scale(self, leaf, g32: np.ndarray) -> np.float32:
    if self.percentile >= 100:
      return F32(1.0)
    with np.errstate(over="ignore", invalid="ignore"):
      n2 = F32(np.sum(g32.astype(np.float64) ** 2))
    if not np.isfinite(n2):  # a NaN grad or a spike: the largest finite float
      n2 = np.finfo(F32).max
    ring = leaf["ring"]
    if self.t == 1:
      ring[:] = n2
    else:
      ring[self.t % 100] = n2
    current = np.sqrt(n2)
    clip = np.sqrt(np.sort(ring)[self.percentile])
    return clip / current if current > clip else F32(1.0)

  def step_param(self, p32, m, v, decays, dtype):
    step_size, eps_hat, decay = self.scalars()
    with np.errstate(invalid="ignore"):
      p1 = to_dtype(fma32(step_size, m / (np.sqrt(v) + eps_hat), p32), dtype)
    if decays and self.wd > 0:
      p1 = to_dtype(decay * p1, dtype)
    return p1

  def step(self, grads: list[np.ndarray], params: list[np.ndarray]) -> list[np.ndarray]:
    self.t += 1
    out = []
    for i, (g, p) in enumerate(zip(grads, params, strict=True)):
      dtype = p.dtype
      decays = True if self.decay_mask is None else self.decay_mask[i]
      leaf = self.leaves[i]
      g32 = g.reshape(-1).astype(F32)
      p32 = p.reshape(-1).astype(F32)
      scale = self.clip_scale(leaf, g32)
      gf = g32 * scale
      if not self.runnable():
        new = p32  # the step is skipped: params and moments stay, the count advances
      elif not leaf["is_8bit"]:
        # SPEC 3.3, with the 8-bit path's guard (unlike bitsandbytes' 32-bit
        # kernel): where a new moment is not finite (a NaN or infinite grad,
        # or a finite spike that overflows), both reset and the param stays.
        b1, b2 = self.b1, self.b2
        with np.errstate(over="ignore", invalid="ignore"):
          m = fma32(leaf["state1"], b1, gf * (F32(1) - b1))
          v = fma32(leaf["state2"], b2, (F32(1) - b2) * (gf * gf))
        finite = np.isfinite(m) & np.isfinite(v)
        leaf["state1"] = np.where(finite, m, F32(0))
        leaf["state2"] = np.where(finite, v, F32(0))
        stepped = self.step_param(p32, leaf["state1"], leaf["state2"], decays, dtype)
        new = np.where(finite, stepped, p32)
      elif self.block_wise:
        new = self._step_blockwise(leaf, gf, p32, decays, dtype)
      else:
        new = self._step_whole(leaf, gf, p32, decays, dtype)
      out.append(new.astype(dtype).reshape(p.shape))
    return out

  def _moments(self, gf, c1, c2, a1, a2):
    """The new moments, and where the element steps: SPEC 3.2 step 2's guard
    resets both moments where one is not finite (a NaN or infinite grad, or
    a finite spike whose moment overflows)."""
    b1, b2 = self.b1, self.b2
    with np.errstate(over="ignore", invalid="ignore"):
      m = fma32(gf, F32(1) - b1, (self.q1[c1] * a1) * b1)
      v = fma32(gf, (F32(1) - b2) * gf, (self.q2[c2] * a2) * b2)
    finite = np.isfinite(m) & np.isfinite(v)
    m = np.where(finite, m, F32(0))
    v = np.where(finite, v, F32(0))
    return m, v, finite

  def _step_blockwise(self, leaf, gf, p32, decays, dtype):
    n = gf.size
    nb = -(-n // BLOCK)
    pad = nb * BLOCK - n
    g = np.concatenate([gf, np.zeros(pad, F32)]).reshape(nb, BLOCK)
    c1 = np.concatenate([leaf["state1"], np.full(pad, 128, np.uint8)]).reshape(nb, BLOCK)
    c2 = np.concatenate([leaf["state2"], np.zeros(pad, np.uint8)]).reshape(nb, BLOCK)
    m, v, finite = self._moments(g, c1, c2, leaf["absmax1"][:, None], leaf["absmax2"][:, None])
    a1 = block_max(m)
    a2 = block_max(v)
    m, v, finite = m.reshape(-1)[:n], v.reshape(-1)[:n], finite.reshape(-1)[:n]
    a1_el = np.repeat(a1, BLOCK)[:n]
    a2_el = np.repeat(a2, BLOCK)[:n]
    new = np.where(finite, self.step_param(p32, m, v, decays, dtype), p32)
    leaf["state1"] = quantize_signed(self.q1, m, a1_el)
    leaf["state2"] = quantize_unsigned(self.q2, v, a2_el)
    leaf["absmax1"], leaf["absmax2"] = a1.astype(F32), a2.astype(F32)
    return new

  def _step_whole(self, leaf, gf, p32, decays, dtype):
    m, v, finite = self._moments(
      gf, leaf["state1"], leaf["state2"], leaf["absmax1"][0], leaf["absmax2"][0]
    )
    a1 = block_max(m.reshape(1, -1))[0]
    a2 = block_max(v.reshape(1, -1))[0]
    new = np.where(finite, self.step_param(p32, m, v, decays, dtype), p32)
    leaf["state1"] = quantize_signed(self.q1, m, a1)
    leaf["state2"] = quantize_unsigned(self.q2, v, a2)
    leaf["absmax1"], leaf["absmax2"] = np.array([a1], F32), np.array([a2], F32)
    return new


BFLOAT16 = ml_dtypes.bfloat16
