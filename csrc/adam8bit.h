// Per-element math of the 8-bit blockwise AdamW step (SPEC section 3).
//
// Everything here is usable from host C++ and from CUDA device code, and uses
// only correctly rounded float32/float64 operations, so that the CPU and CUDA
// backends produce bit-identical codes, scales and params. No XLA, no pybind11.
//
// The block reduction and the iteration over leaves live in each backend; the
// scalar step, the quantizer, the rounding to the param dtype and the defined
// reduction order of the percentile-clipping norm live here, once.
#ifndef OPTAX_PAGED8BIT_ADAM8BIT_H_
#define OPTAX_PAGED8BIT_ADAM8BIT_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define OP8_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define OP8_HD inline
#endif

namespace optax_paged8bit {

// Elements per quantization block (one float32 scale each).
constexpr int kBlockSize = 256;
// Entries of each dynamic quantization map.
constexpr int kMapSize = 256;
// Slots of the percentile-clipping ring (squared grad norms of past steps).
constexpr int kRingSize = 100;
// A block is processed by 32 lanes that own 8 consecutive elements each; the
// clipping norm is reduced in that shape on every backend (see BlockNormSq).
constexpr int kLanes = 32;
constexpr int kLaneElems = kBlockSize / kLanes;
// Threads of the second stage of the per-leaf norm reduction (LeafNormSq).
constexpr int kNormThreads = 1024;
// Code of the signed map's smallest positive value; padded lanes use it.
constexpr uint8_t kPadCode1 = 128;

// Order of the float hyperparameter operand.
enum HyperParam : int { kLr = 0, kBeta1, kBeta2, kEps, kWeightDecay, kNumHyperParams };

// Param/grad element types, as stored in leaf descriptors.
enum ElemType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Per-leaf flag bits (an attribute of the custom call).
enum LeafFlag : int32_t { kLeaf8bit = 1, kLeafDecay = 2 };

// ---------------------------------------------------------------------------
// Correctly rounded primitives. On the device the explicit _rn intrinsics keep
// nvcc from contracting a*b+c into an fma; on the host the build passes
// -ffp-contract=off for the same reason.
// ---------------------------------------------------------------------------
OP8_HD float Mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
OP8_HD float Add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
OP8_HD float Div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
OP8_HD float Sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
OP8_HD float Fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
OP8_HD double MulD(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
OP8_HD double AddD(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
OP8_HD double SqrtD(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
OP8_HD float ToFloat(double a) {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(a);
#else
  return static_cast<float>(a);
#endif
}

OP8_HD uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
OP8_HD float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
OP8_HD bool IsFinite(float f) { return (FloatBits(f) & 0x7f800000u) != 0x7f800000u; }
OP8_HD bool IsNan(float f) { return (FloatBits(f) & 0x7fffffffu) > 0x7f800000u; }
OP8_HD bool SignBit(float f) { return (FloatBits(f) >> 31) != 0; }
OP8_HD float Abs(float f) { return BitsFloat(FloatBits(f) & 0x7fffffffu); }
// max(acc, |x|) that skips a NaN, as bitsandbytes' fmaxf reduction does. A
// NaN moment arises where a zero code meets an infinite scale (a second moment
// that overflowed in the previous step).
OP8_HD float MaxAbs(float acc, float x) {
  float a = Abs(x);
  return a > acc ? a : acc;
}

// ---------------------------------------------------------------------------
// Param dtypes: float32 <-> bfloat16 / float16, round to nearest even.
// ---------------------------------------------------------------------------
OP8_HD float Bf16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

OP8_HD uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if (IsNan(f)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

OP8_HD float F16ToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float32.
    float magnitude = Mul(static_cast<float>(mantissa), 5.9604644775390625e-08f);
    return BitsFloat(sign | FloatBits(magnitude));
  }
  return BitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

OP8_HD uint16_t RoundShiftRightEven(uint32_t value, int shift) {
  uint32_t result = value >> shift;
  uint32_t rest = value & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (result & 1u))) ++result;
  return static_cast<uint16_t>(result);
}

OP8_HD uint16_t FloatToF16(float f) {
  uint32_t u = FloatBits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (a >= 0x38800000u) {                       // normal half (>= 2^-14)
    return sign | RoundShiftRightEven(a - 0x38000000u, 13);
  }
  if (a < 0x33000000u) return sign;  // below 2^-25: rounds to zero
  uint32_t exponent = a >> 23;
  uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
  return sign | RoundShiftRightEven(mantissa, static_cast<int>(126u - exponent));
}

OP8_HD float LoadAsFloat(const void* data, int32_t type, int64_t i) {
  switch (type) {
    case kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(data)[i]);
    case kF16:
      return F16ToFloat(static_cast<const uint16_t*>(data)[i]);
    default:
      return static_cast<const float*>(data)[i];
  }
}

// Rounds x to the param dtype and back: T(x) of SPEC 3.2.
OP8_HD float RoundToType(float x, int32_t type) {
  switch (type) {
    case kBF16:
      return Bf16ToFloat(FloatToBf16(x));
    case kF16:
      return F16ToFloat(FloatToF16(x));
    default:
      return x;
  }
}

OP8_HD void StoreFromFloat(void* data, int32_t type, int64_t i, float x) {
  switch (type) {
    case kBF16:
      static_cast<uint16_t*>(data)[i] = FloatToBf16(x);
      break;
    case kF16:
      static_cast<uint16_t*>(data)[i] = FloatToF16(x);
      break;
    default:
      static_cast<float*>(data)[i] = x;
  }
}

// ---------------------------------------------------------------------------
// Per-step scalars (SPEC 3): the bias corrections from count, with the powers
// by binary exponentiation in float64 and one rounding to float32.
// ---------------------------------------------------------------------------
struct StepScalars {
  float beta1, beta2;
  float one_minus_beta1, one_minus_beta2;
  float step_size;  // -lr * c2 / c1
  float eps_hat;    // eps * c2
  float decay;      // 1 - lr * wd, one rounding
  bool weight_decay_on;
};

OP8_HD double PowBySquaring(double base, int64_t exponent) {
  double result = 1.0;
  while (exponent > 0) {
    if (exponent & 1) result = MulD(result, base);
    base = MulD(base, base);
    exponent >>= 1;
  }
  return result;
}

// hyper: float32[kNumHyperParams]; t = count + 1.
OP8_HD StepScalars ComputeStepScalars(const float* hyper, int64_t t) {
  StepScalars s;
  float lr = hyper[kLr];
  s.beta1 = hyper[kBeta1];
  s.beta2 = hyper[kBeta2];
  s.one_minus_beta1 = Add(1.0f, -s.beta1);
  s.one_minus_beta2 = Add(1.0f, -s.beta2);
  float c1 = ToFloat(AddD(1.0, -PowBySquaring(static_cast<double>(s.beta1), t)));
  float c2 = ToFloat(SqrtD(AddD(1.0, -PowBySquaring(static_cast<double>(s.beta2), t))));
  s.step_size = Div(Mul(-lr, c2), c1);
  s.eps_hat = Mul(hyper[kEps], c2);
  s.decay = Fma(-lr, hyper[kWeightDecay], 1.0f);
  s.weight_decay_on = hyper[kWeightDecay] > 0.0f;
  return s;
}

// ---------------------------------------------------------------------------
// Moments and the param step.
// ---------------------------------------------------------------------------

// 8-bit path, SPEC 3.2 step 2. A non-finite gf zeroes both moments.
OP8_HD void BlockwiseMoments(float gf, float q1, float absmax1, float q2, float absmax2,
                             const StepScalars& s, float* m, float* v) {
  if (!IsFinite(gf)) {
    *m = 0.0f;
    *v = 0.0f;
    return;
  }
  *m = Fma(gf, s.one_minus_beta1, Mul(Mul(q1, absmax1), s.beta1));
  *v = Fma(gf, Mul(s.one_minus_beta2, gf), Mul(Mul(q2, absmax2), s.beta2));
}

// float32 path, SPEC 3.3.
OP8_HD void Float32Moments(float g, const StepScalars& s, float* m, float* v) {
  *m = Fma(*m, s.beta1, Mul(g, s.one_minus_beta1));
  *v = Fma(*v, s.beta2, Mul(s.one_minus_beta2, Mul(g, g)));
}

// SPEC 3.2 step 4 / 3.3: the step, rounded to the param dtype, then the
// decoupled weight decay AFTER the step, rounded again.
OP8_HD float StepParam(float p, float m, float v, const StepScalars& s, bool decay, int32_t type) {
  float p1 = RoundToType(Fma(s.step_size, Div(m, Add(Sqrt(v), s.eps_hat)), p), type);
  if (decay && s.weight_decay_on) return RoundToType(Mul(s.decay, p1), type);
  return p1;
}

// The optax path returns u = T(p_new - p), so that optax.apply_updates lands
// on T(p + u) == p_new whenever that is representable: always, except where
// the step crosses into a lower binade and p_new has bits below the spacing
// of p and u (then it lands on the nearest value of that spacing). The fused
// step writes p_new itself.
OP8_HD float UpdateFor(float p, float p_new, int32_t type) {
  return RoundToType(Add(p_new, -p), type);
}

// ---------------------------------------------------------------------------
// The quantizer (SPEC 3.2 step 5). q is an ascending map of kMapSize values.
// NearestCode(q, x, LowerBound(q, x)) is the definition; QuantTables below is
// the fast route both backends take.
// ---------------------------------------------------------------------------

// k = #{i : q[i] < x}, by binary search.
OP8_HD int LowerBound(const float* q, float x) {
  int lo = 0, hi = kMapSize;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (q[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Midpoint of entries i and i + 1, as NearestCode computes it.
OP8_HD float Midpoint(const float* q, int i) { return Mul(Add(q[i], q[i + 1]), 0.5f); }

// Nearest entry given the lower bound: ties go to the even code, NaN to 0.
OP8_HD uint8_t NearestCode(const float* q, float x, int lower_bound) {
  if (IsNan(x)) return 0;
  int k = lower_bound < 1 ? 1 : (lower_bound > kMapSize - 1 ? kMapSize - 1 : lower_bound);
  float midpoint = Midpoint(q, k - 1);
  if (x > midpoint) return static_cast<uint8_t>(k);
  if (x < midpoint) return static_cast<uint8_t>(k - 1);
  return static_cast<uint8_t>((k & 1) ? k - 1 : k);
}

// First moment's sign fix: a code whose value has the wrong sign moves one
// step toward m's sign, so that a small negative moment never decodes as zero.
OP8_HD uint8_t SignFix(const float* q1, float m, uint8_t code) {
  if (SignBit(q1[code]) != SignBit(m)) code = static_cast<uint8_t>(m > 0.0f ? code + 1 : code - 1);
  return code;
}

// Fast route. With mid[i] = Midpoint(q, i), the definition's code is
// c = #{i : mid[i] < x}, and x == mid[c] is a tie that goes to the even one of
// c and c + 1, for every ascending map whose midpoints differ from its entries.
// Floats are ordered by a monotonic 32-bit key; a bucket is 2^shift
// consecutive keys, and start[b] = #{i : mid[i] < the bucket's first float}.
// When no bucket holds two midpoints (the dynamic maps at these shifts: a
// bucket is 1/64 of a binade for the signed map, 1/128 for the unsigned one),
// mid[s + 1] lies in a later bucket than x, so with s = start[bucket of x]
// only mid[s] can be below or equal to x: c = s + [mid[s] < x], or
// s + [mid[s] <= x] when s is odd (the tie goes to s + 1). The table keeps
// edge[s] = mid[s] for even s and the float just below mid[s] for odd s, so
// that c = s + [edge[s] < x]: two shared-memory reads, one comparison. Scaled
// moments lie in [-1, 1] (signed) and [0, 1] (unsigned); a key below the first
// bucket (-0.0 for the unsigned map) clamps to it and the count stays right.
// Maps without these properties take the definition (`fast` is 0).
constexpr uint32_t kKeyMinusOne = 0x407fffffu;  // OrderKey(-1.0f)
constexpr uint32_t kKeyZero = 0x80000000u;      // OrderKey(+0.0f)
constexpr int kSignedShift = 17;
constexpr int kUnsignedShift = 16;
constexpr int kSignedBuckets = 16384;    // keys of [-1, 1]: 16257 buckets used
constexpr int kUnsignedBuckets = 16384;  // keys of [0, 1]: 16257 buckets used

OP8_HD uint32_t OrderKey(float x) {
  uint32_t u = FloatBits(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

OP8_HD float KeyFloat(uint32_t key) {
  return BitsFloat((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

OP8_HD int BucketIndex(float x, uint32_t base, int shift, int num_buckets) {
  uint32_t key = OrderKey(x);
  uint32_t i = ((key < base ? base : key) - base) >> shift;
  return i < static_cast<uint32_t>(num_buckets) ? static_cast<int>(i) : num_buckets - 1;
}

// The same buckets for x known to lie in [-1, 1] (signed map) or in [+0, 1]
// (unsigned map), where no clamping is needed.
OP8_HD int SignedBucketInRange(float x) { return (OrderKey(x) - kKeyMinusOne) >> kSignedShift; }
OP8_HD int UnsignedBucketInRange(float x) { return FloatBits(x) >> kUnsignedShift; }

struct alignas(16) QuantTables {
  float q1[kMapSize];  // signed map (first moment)
  float q2[kMapSize];  // unsigned map (second moment)
  // edge[s] as above; edge[255] = NaN, which no comparison takes.
  float edge1[kMapSize];
  float edge2[kMapSize];
  uint8_t start1[kSignedBuckets];
  uint8_t start2[kUnsignedBuckets];
  int32_t fast;  // both maps have the properties above
  int32_t neg1;  // entries of q1 with the sign bit (a prefix of a strictly ascending map)
  int32_t padding[2];
};

// The table pieces, each computable on its own (the device builds them in
// parallel, the host in a loop).
OP8_HD float EdgeEntry(const float* q, int s) {
  if (s >= kMapSize - 1) return BitsFloat(0x7fc00000u);
  float mid = Midpoint(q, s);
  if (!(s & 1)) return mid;
  uint32_t u = FloatBits(mid);  // the next float toward -infinity
  if ((u & 0x7fffffffu) == 0) return BitsFloat(0x80000001u);
  return BitsFloat((u & 0x80000000u) ? u + 1 : u - 1);
}

OP8_HD uint8_t StartEntry(const float* q, uint32_t base, int shift, int bucket) {
  float first = KeyFloat(base + (static_cast<uint32_t>(bucket) << shift));
  int lo = 0, hi = kMapSize - 1;  // #{i < 255 : mid[i] < first}, mids ascending
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (Midpoint(q, mid) < first) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return static_cast<uint8_t>(lo);
}

// The fast route's conditions at midpoint i: strictly between its entries,
// not below the first bucket, and not in the bucket of midpoint i - 1.
OP8_HD bool FastRouteHoldsAt(const float* q, uint32_t base, int shift, int num_buckets, int i) {
  float mid = Midpoint(q, i);
  if (!(q[i] < mid && mid < q[i + 1]) || OrderKey(mid) < base) return false;
  return i == 0 || BucketIndex(mid, base, shift, num_buckets) !=
                       BucketIndex(Midpoint(q, i - 1), base, shift, num_buckets);
}

OP8_HD uint8_t FastCode(const float* q, const float* edge, const uint8_t* start, uint32_t base,
                        int shift, int num_buckets, bool fast, float x) {
  if (!fast) return NearestCode(q, x, LowerBound(q, x));
  int s = start[BucketIndex(x, base, shift, num_buckets)];
  int c = s + (edge[s] < x ? 1 : 0);
  return IsNan(x) ? 0 : static_cast<uint8_t>(c);
}

// code1 = Q(q1, m / absmax1) with the sign fix, x1 = m / absmax1 given.
OP8_HD uint8_t Code1(const QuantTables& t, float m, float x1) {
  uint8_t c = FastCode(t.q1, t.edge1, t.start1, kKeyMinusOne, kSignedShift, kSignedBuckets,
                       t.fast != 0, x1);
  return SignFix(t.q1, m, c);
}

// code2 = Q(q2, v / absmax2), x2 = v / absmax2 given.
OP8_HD uint8_t Code2(const QuantTables& t, float x2) {
  return FastCode(t.q2, t.edge2, t.start2, kKeyZero, kUnsignedShift, kUnsignedBuckets, t.fast != 0,
                  x2);
}

// The same two codes where the fast route holds, x1 lies in [-1, 1] and x2
// in [+0, 1] (a block whose scales are positive and finite). The sign fix
// reads sign(q1[c]) as c < neg1 there.
OP8_HD uint8_t FastCode1(const QuantTables& t, float m, float x1) {
  int s = t.start1[SignedBucketInRange(x1)];
  int c = s + (t.edge1[s] < x1 ? 1 : 0);
  if ((c < t.neg1) != SignBit(m)) c += m > 0.0f ? 1 : -1;
  return static_cast<uint8_t>(c);
}

OP8_HD uint8_t FastCode2(const QuantTables& t, float x2) {
  int s = t.start2[UnsignedBucketInRange(x2)];
  return static_cast<uint8_t>(s + (t.edge2[s] < x2 ? 1 : 0));
}

#if !defined(__CUDA_ARCH__)
inline void BuildQuantTables(const float* qmaps, QuantTables* t) {
  std::memcpy(t->q1, qmaps, sizeof(t->q1));
  std::memcpy(t->q2, qmaps + kMapSize, sizeof(t->q2));
  for (int k = 0; k < kMapSize; ++k) {
    t->edge1[k] = EdgeEntry(t->q1, k);
    t->edge2[k] = EdgeEntry(t->q2, k);
  }
  for (int b = 0; b < kSignedBuckets; ++b) {
    t->start1[b] = StartEntry(t->q1, kKeyMinusOne, kSignedShift, b);
  }
  for (int b = 0; b < kUnsignedBuckets; ++b) {
    t->start2[b] = StartEntry(t->q2, kKeyZero, kUnsignedShift, b);
  }
  t->neg1 = 0;
  for (int i = 0; i < kMapSize; ++i) t->neg1 += SignBit(t->q1[i]) ? 1 : 0;
  t->fast = 1;
  for (int i = 0; i + 1 < kMapSize; ++i) {
    if (!FastRouteHoldsAt(t->q1, kKeyMinusOne, kSignedShift, kSignedBuckets, i) ||
        !FastRouteHoldsAt(t->q2, kKeyZero, kUnsignedShift, kUnsignedBuckets, i)) {
      t->fast = 0;
    }
  }
}
#endif

// x / scale for the quantizer, with the scale fixed for a block. On the host
// a division; on the GPU the fast path of __fdiv_rn (hardware reciprocal
// refined once, a product, one fma correction) with the reciprocal hoisted out
// of the block, taken only well inside the normal range: scale within
// 2^+-60, |x| at least 2^-90 and scale * 2^-60 (so that the fma's remainder
// stays normal), |x| at most scale. There it gives __fdiv_rn's result;
// anything else divides. tests/native/scale_divisor_check.cu compares the two
// on the GPU over every significand of the scale.
struct ScaleDivisor {
  float scale;
  bool fast = false;  // the scale is in range (always false on the host)
#if defined(__CUDA_ARCH__)
  float inverse, min_x;
#endif
  OP8_HD explicit ScaleDivisor(float b) : scale(b) {
#if defined(__CUDA_ARCH__)
    fast = b >= 8.67361737988403547e-19f && b <= 1.15292150460684698e18f;  // 2^-60, 2^60
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
    inverse = __fmaf_rn(r, __fmaf_rn(-b, r, 1.0f), r);
    min_x = fmaxf(__fmul_rn(b, 8.67361737988403547e-19f), 8.07793566946316088e-28f);  // 2^-90
#endif
  }
  OP8_HD float Divide(float x) const {
#if defined(__CUDA_ARCH__)
    float a = Abs(x);
    if (fast && ((a >= min_x && a <= scale) || x == 0.0f)) {
      float q = __fmul_rn(x, inverse);
      float r = __fmaf_rn(-scale, q, x);
      return x == 0.0f ? x : __fmaf_rn(inverse, r, q);
    }
#endif
    return Div(x, scale);
  }
  // The same for |x| <= scale (x in the scale's block) when fast is true,
  // except that a zero quotient may lose its sign (-0 gives +0): the
  // quantizer's codes do not depend on it (both zeros share a bucket and
  // compare equal; the sign fix reads the moment, not the quotient).
  OP8_HD float DivideInRange(float x) const {
#if defined(__CUDA_ARCH__)
    // 0 < |x| < min_x divides; 0 and [min_x, scale] take the fast path.
    if (FloatBits(Abs(x)) - 1u < FloatBits(min_x) - 1u) return Div(x, scale);
    float q = __fmul_rn(x, inverse);
    float r = __fmaf_rn(-scale, q, x);
    return __fmaf_rn(inverse, r, q);
#else
    return Div(x, scale);
#endif
  }
};

// ---------------------------------------------------------------------------
// Percentile clipping (SPEC 3.5).
//
// The squared norm of a leaf's gradient is summed in float64 in one defined
// order, shared by all backends:
//  1. per block of 256: each of the 32 lanes sums the squares of its 8
//     consecutive elements in order, then the lanes combine by the butterfly
//     s[i] += s[i ^ d] for d = 16, 8, 4, 2, 1 (BlockNormSq);
//  2. per leaf: thread t of kNormThreads sums the block partials t, t + T,
//     t + 2T, ... in order, then the threads combine by the tree
//     a[t] += a[t + d] for d = T/2, ..., 1 (LeafNormSq).
// ---------------------------------------------------------------------------
// One lane's sum: the squares of its `valid` (<= 8) loaded grads, in order.
OP8_HD double LaneNormSq(const float* g, int valid) {
  double sum = 0.0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < kLaneElems; ++k) {
    double x = static_cast<double>(g[k]);
    if (k < valid) sum = AddD(sum, MulD(x, x));
  }
  return sum;
}

#if !defined(__CUDA_ARCH__)
// Host emulation of the block butterfly (the device uses warp shuffles).
inline double BlockNormSq(const void* grad, int32_t type, int64_t block, int64_t size) {
  double lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    float g[kLaneElems];
    int64_t start = block * kBlockSize + l * kLaneElems;
    int valid = 0;
    for (; valid < kLaneElems && start + valid < size; ++valid) {
      g[valid] = LoadAsFloat(grad, type, start + valid);
    }
    lanes[l] = LaneNormSq(g, valid);
  }
  for (int d = kLanes / 2; d >= 1; d /= 2) {
    double next[kLanes];
    for (int l = 0; l < kLanes; ++l) next[l] = AddD(lanes[l], lanes[l ^ d]);
    for (int l = 0; l < kLanes; ++l) lanes[l] = next[l];
  }
  return lanes[0];
}

// Host emulation of the second stage; `scratch` has kNormThreads entries.
inline double LeafNormSq(const double* partials, int64_t num_blocks, double* scratch) {
  for (int t = 0; t < kNormThreads; ++t) {
    double sum = 0.0;
    for (int64_t j = t; j < num_blocks; j += kNormThreads) sum = AddD(sum, partials[j]);
    scratch[t] = sum;
  }
  for (int d = kNormThreads / 2; d >= 1; d /= 2) {
    for (int t = 0; t < d; ++t) scratch[t] = AddD(scratch[t], scratch[t + d]);
  }
  return scratch[0];
}
#endif

// NaN sorts last, as in torch.sort.
OP8_HD bool RingLess(float a, float b) { return a < b || (!IsNan(a) && IsNan(b)); }

// Writes this step's squared norm into the ring and returns gnorm_scale.
OP8_HD float UpdateRingAndScale(float* ring, float norm_sq, int64_t t, int percentile) {
  if (t == 1) {
    for (int i = 0; i < kRingSize; ++i) ring[i] = norm_sq;
  } else {
    ring[t % kRingSize] = norm_sq;
  }
  float sorted[kRingSize];
  for (int i = 0; i < kRingSize; ++i) {
    float x = ring[i];
    int j = i;
    while (j > 0 && RingLess(x, sorted[j - 1])) {
      sorted[j] = sorted[j - 1];
      --j;
    }
    sorted[j] = x;
  }
  float current = Sqrt(norm_sq);
  float clip = Sqrt(sorted[percentile]);
  return current > clip ? Div(clip, current) : 1.0f;
}

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_ADAM8BIT_H_
