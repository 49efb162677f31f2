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
#include <cuda_bf16.h>
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
// (fmaxf is that on the device: one instruction, acc is never NaN.)
OP8_HD float MaxAbs(float acc, float x) {
#if defined(__CUDA_ARCH__)
  return fmaxf(acc, fabsf(x));
#else
  float a = Abs(x);
  return a > acc ? a : acc;
#endif
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

// The rounding functors of the step (FinishStep): RoundToType, and on the GPU
// the hardware conversion to bfloat16 (round to nearest even), which gives
// RoundToType's result for every float but NaN (it returns the canonical NaN,
// not x's payload): tests/native/fast_path_check.cu compares the two on every
// float32.
struct TypeRounding {
  int32_t type;
  OP8_HD float operator()(float x) const { return RoundToType(x, type); }
};

#if defined(__CUDACC__)
struct Bf16HardwareRounding {
  __device__ __forceinline__ float operator()(float x) const {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
};
#endif

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
  // The hyperparameters are ones a step can run with: lr, eps and wd finite
  // and >= 0, betas in [0, 1), decay >= 0. A traced value (a schedule's lr)
  // that is not skips the step: params and moments stay as they are, the
  // count advances (SkipStep).
  bool valid;
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
  float eps = hyper[kEps], wd = hyper[kWeightDecay];
  s.valid = IsFinite(lr) && lr >= 0.0f && s.beta1 >= 0.0f && s.beta1 < 1.0f && s.beta2 >= 0.0f &&
            s.beta2 < 1.0f && IsFinite(eps) && eps >= 0.0f && IsFinite(wd) && wd >= 0.0f &&
            s.decay >= 0.0f;
  return s;
}

// ---------------------------------------------------------------------------
// Moments and the param step.
// ---------------------------------------------------------------------------

// 8-bit path, SPEC 3.2 step 2, for a finite gf.
OP8_HD void FiniteBlockwiseMoments(float gf, float q1, float absmax1, float q2, float absmax2,
                                   const StepScalars& s, float* m, float* v) {
  *m = Fma(gf, s.one_minus_beta1, Mul(Mul(q1, absmax1), s.beta1));
  *v = Fma(gf, Mul(s.one_minus_beta2, gf), Mul(Mul(q2, absmax2), s.beta2));
}

// The same for any gf: a non-finite gf zeroes both moments.
OP8_HD void BlockwiseMoments(float gf, float q1, float absmax1, float q2, float absmax2,
                             const StepScalars& s, float* m, float* v) {
  FiniteBlockwiseMoments(gf, q1, absmax1, q2, absmax2, s, m, v);
  if (!IsFinite(gf)) *m = *v = 0.0f;
}

// float32 path, SPEC 3.3.
OP8_HD void Float32Moments(float g, const StepScalars& s, float* m, float* v) {
  *m = Fma(*m, s.beta1, Mul(g, s.one_minus_beta1));
  *v = Fma(*v, s.beta2, Mul(s.one_minus_beta2, Mul(g, g)));
}

// SPEC 3.2 step 4 / 3.3: the step before rounding (root = Sqrt(v)), then
// FinishStep: rounded to the param dtype, and the decoupled weight decay AFTER
// the step, rounded again.
OP8_HD float StepUnrounded(float p, float m, float root, const StepScalars& s) {
  return Fma(s.step_size, Div(m, Add(root, s.eps_hat)), p);
}

template <typename Round>
OP8_HD float FinishStep(float x, const StepScalars& s, bool decay, Round round) {
  float p1 = round(x);
  if (decay && s.weight_decay_on) return round(Mul(s.decay, p1));
  return p1;
}

OP8_HD float StepParamWithRoot(float p, float m, float root, const StepScalars& s, bool decay,
                               int32_t type) {
  return FinishStep(StepUnrounded(p, m, root, s), s, decay, TypeRounding{type});
}

OP8_HD float StepParam(float p, float m, float v, const StepScalars& s, bool decay, int32_t type) {
  return StepParamWithRoot(p, m, Sqrt(v), s, decay, type);
}

// SPEC 3.3 for one element of a leaf with float32 moments: the new param. A
// non-finite g resets both moments and leaves the param unchanged, as on the
// 8-bit path (bitsandbytes' 32-bit kernel lets the NaN through instead).
OP8_HD float Float32Step(float g, float p, float* m, float* v, const StepScalars& s, bool decay,
                         int32_t type) {
  if (!IsFinite(g)) {
    *m = *v = 0.0f;
    return RoundToType(p, type);
  }
  Float32Moments(g, s, m, v);
  return StepParam(p, *m, *v, s, decay, type);
}

// Sqrt of n values. On the GPU, where every value lies in [2^-101, 2^128),
// the fast path of __fsqrt_rn (the hardware reciprocal square root, a
// product and one fma correction, the sequence nvcc emits for __fsqrt_rn
// there) without its per-value branch; otherwise __fsqrt_rn for each.
// tests/native/fast_path_check.cu compares the two on every float32 of that
// range on the GPU.
OP8_HD bool SqrtFastDomain(float v) { return FloatBits(v) - 0x0d000000u <= 0x727fffffu; }

#if defined(__CUDACC__)
__device__ __forceinline__ float SqrtFastPath(float v) {
  float r, root, half_r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(root) : "f"(v), "f"(r));
  asm("mul.rn.ftz.f32 %0, %1, 0f3F000000;" : "=f"(half_r) : "f"(r));
  return __fmaf_rn(__fmaf_rn(-root, root, v), half_r, root);
}
#endif

template <int n>
OP8_HD void SqrtEach(const float v[n], float root[n]) {
#if defined(__CUDA_ARCH__)
  bool fast = true;
#pragma unroll
  for (int k = 0; k < n; ++k) fast = fast && SqrtFastDomain(v[k]);
  if (fast) {
#pragma unroll
    for (int k = 0; k < n; ++k) root[k] = SqrtFastPath(v[k]);
    return;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) root[k] = Sqrt(v[k]);
#else
  for (int k = 0; k < n; ++k) root[k] = Sqrt(v[k]);
#endif
}

// The optax path returns u = T(p_new - p), so that optax.apply_updates lands
// on T(p + u) == p_new whenever that is representable: always, except where
// the step crosses into a lower binade and p_new has bits below the spacing
// of p and u (then it lands on the nearest value of that spacing). The fused
// step writes p_new itself.
OP8_HD float UpdateUnrounded(float p, float p_new) { return Add(p_new, -p); }

OP8_HD float UpdateFor(float p, float p_new, int32_t type) {
  return RoundToType(UpdateUnrounded(p, p_new), type);
}

// What RoundedEach does with each value and a rounding functor: the step's
// two roundings (FinishStep), or one.
struct StepFinish {
  const StepScalars& s;
  bool decay;
  template <typename Round>
  OP8_HD float operator()(float x, Round round) const {
    return FinishStep(x, s, decay, round);
  }
};

struct OneRounding {
  template <typename Round>
  OP8_HD float operator()(float x, Round round) const {
    return round(x);
  }
};

// out[k] = finish(x[k], rounding to T). On the GPU, bfloat16 rounds by the
// hardware conversion when no x is NaN or infinite (a NaN probe: 0 * x is NaN
// exactly then); then no rounding sees a NaN: the step's second rounding gets
// the decay (finite) times a bfloat16 value (finite).
template <int32_t T, int n, typename Finish>
OP8_HD void RoundedEach(const float x[n], Finish finish, float out[n]) {
#if defined(__CUDA_ARCH__)
  if constexpr (T == kBF16) {
    float probe = 0.0f;
#pragma unroll
    for (int k = 0; k < n; ++k) probe = Fma(x[k], 0.0f, probe);
    if (!IsNan(probe)) {
#pragma unroll
      for (int k = 0; k < n; ++k) out[k] = finish(x[k], Bf16HardwareRounding{});
      return;
    }
  }
#pragma unroll
#endif
  for (int k = 0; k < n; ++k) out[k] = finish(x[k], TypeRounding{T});
}

// StepParamWithRoot and UpdateFor for n elements.
template <int32_t T, int n>
OP8_HD void StepParamsEach(const float p[n], const float m[n], const float root[n],
                           const StepScalars& s, bool decay, float out[n]) {
  float x[n];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < n; ++k) x[k] = StepUnrounded(p[k], m[k], root[k], s);
  RoundedEach<T, n>(x, StepFinish{s, decay}, out);
}

template <int32_t T, int n>
OP8_HD void UpdatesEach(const float p[n], const float p_new[n], float out[n]) {
  float x[n];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < n; ++k) x[k] = UpdateUnrounded(p[k], p_new[k]);
  RoundedEach<T, n>(x, OneRounding{}, out);
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
// A bucket is 2^shift consecutive float32 bit patterns (an interval of floats:
// 1/64 of a binade for the signed map, 1/128 for the unsigned one), indexed by
// the pattern shifted right, and start[b] = #{i : mid[i] < the bucket's lowest
// float}. When no bucket holds two midpoints, only mid[s] (s = start[bucket
// of x]) can be below or equal to x: c = s + [mid[s] < x], or s + [mid[s] <= x]
// when s is odd (the tie goes to s + 1). The table keeps edge[s] = mid[s] for
// even s and the float just below mid[s] for odd s, so that c = s + [edge[s] <
// x]: two shared-memory reads, one comparison.
//
// The first moment's sign fix is folded into its tables: with n = neg1 (the
// entries with the sign bit, a prefix) and q1[n] = +0.0, a negative moment's
// nearest code is at most n and the fix moves n to n - 1, while a positive
// one's is at least n and never moves. So the negative buckets whose start
// is n or more start at n - 1, and edge[n - 1] = -0.0, which no negative x
// exceeds: every negative x there gets n - 1. The bucket is taken from |x|
// with m's sign, which also covers a quotient whose zero lost its sign.
//
// Scaled moments lie in [-1, 1] (signed) and [+0, 1] (unsigned); Code1/Code2
// clamp other values (which leaves the count unchanged) and handle NaN. Maps
// without these properties take the definition (`fast` is 0).
constexpr uint32_t kBitsOne = 0x3f800000u;  // FloatBits(1.0f)
constexpr int kSignedShift = 17;
constexpr int kUnsignedShift = 16;
// Buckets of [-1, 1] by bit pattern: [+0, 1] then [-0, -1] (those between,
// floats above 1, are never read).
constexpr int kSignedBuckets = static_cast<int>((kBitsOne | 0x80000000u) >> kSignedShift) + 1;
constexpr int kUnsignedBuckets = static_cast<int>(kBitsOne >> kUnsignedShift) + 1;

// The lowest float of a bucket (for negative floats the largest pattern).
OP8_HD float BucketLowest(uint32_t bucket, int shift) {
  uint32_t first = bucket << shift;
  return BitsFloat((first & 0x80000000u) ? (first | ((1u << shift) - 1u)) : first);
}

// Entries with the sign bit (a prefix of an ascending map). The device's
// table builder counts them with __syncthreads_count instead.
OP8_HD int NegativePrefix(const float* q) {
  int n = 0;
  for (int i = 0; i < kMapSize; ++i) n += SignBit(q[i]) ? 1 : 0;
  return n;
}

struct alignas(16) QuantTables {
  float q1[kMapSize];  // signed map (first moment)
  float q2[kMapSize];  // unsigned map (second moment)
  // edge[s] as above; edge[255] = NaN, which no comparison takes.
  float edge1[kMapSize];
  float edge2[kMapSize];
  uint8_t start1[(kSignedBuckets + 15) & ~15];
  uint8_t start2[(kUnsignedBuckets + 15) & ~15];
  int32_t fast;  // both maps have the properties above
  int32_t padding[3];
};

// The table pieces, each computable on its own (the device builds them in
// parallel, the host in a loop). `fold` is neg1 - 1 for the signed map and -1
// for the unsigned one.
OP8_HD float EdgeEntry(const float* q, int s, int fold) {
  if (s >= kMapSize - 1) return BitsFloat(0x7fc00000u);
  if (s == fold) return -0.0f;
  float mid = Midpoint(q, s);
  if (!(s & 1)) return mid;
  uint32_t u = FloatBits(mid);  // the next float toward -infinity
  if ((u & 0x7fffffffu) == 0) return BitsFloat(0x80000001u);
  return BitsFloat((u & 0x80000000u) ? u + 1 : u - 1);
}

OP8_HD uint8_t StartEntry(const float* q, int shift, int bucket, int fold) {
  float lowest = BucketLowest(static_cast<uint32_t>(bucket), shift);
  int lo = 0, hi = kMapSize - 1;  // #{i < 255 : mid[i] < lowest}, mids ascending
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (Midpoint(q, mid) < lowest) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (fold >= 0 && SignBit(lowest) && lo > fold) lo = fold;
  return static_cast<uint8_t>(lo);
}

// The fast route's conditions at midpoint i: strictly between its entries,
// within [lowest, 1], and not in the bucket of midpoint i - 1.
OP8_HD bool FastRouteHoldsAt(const float* q, int shift, float lowest, int i) {
  float mid = Midpoint(q, i);
  if (!(q[i] < mid && mid < q[i + 1]) || !(lowest <= mid && mid <= 1.0f)) return false;
  return i == 0 || (FloatBits(mid) >> shift) != (FloatBits(Midpoint(q, i - 1)) >> shift);
}

// The sign fix's fold needs q1[neg1] == +0.0 after at least one negative entry.
OP8_HD bool SignFoldHolds(const float* q1, int neg1) {
  return neg1 >= 1 && neg1 < kMapSize && FloatBits(q1[neg1]) == 0;
}

// code1 = Q(q1, m / absmax1) with the sign fix, for x1 = m / absmax1 in
// [-1, 1], or any x1 whose code is that quotient's (see ScaleDivisor): the
// sign is taken from m. The code (0..255) comes as a word.
OP8_HD uint32_t FastCode1(const QuantTables& t, float m, float x1) {
  uint32_t u = (FloatBits(x1) & 0x7fffffffu) | (FloatBits(m) & 0x80000000u);
  uint32_t s = t.start1[u >> kSignedShift];
  return s + (t.edge1[s] < BitsFloat(u) ? 1u : 0u);
}

// code2 = Q(q2, v / absmax2), for x2 = v / absmax2 in [+0, 1] (or -0).
OP8_HD uint32_t FastCode2(const QuantTables& t, float x2) {
  uint32_t u = FloatBits(x2) & 0x7fffffffu;
  uint32_t s = t.start2[u >> kUnsignedShift];
  return s + (t.edge2[s] < BitsFloat(u) ? 1u : 0u);
}

OP8_HD float Clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// The same for any x1 = m / absmax1 (absmax1 >= 0: NaN and infinities
// included).
OP8_HD uint8_t Code1(const QuantTables& t, float m, float x1) {
  if (!t.fast) return SignFix(t.q1, m, NearestCode(t.q1, x1, LowerBound(t.q1, x1)));
  if (IsNan(x1)) return SignFix(t.q1, m, 0);
  return static_cast<uint8_t>(FastCode1(t, m, Clamp(x1, -1.0f, 1.0f)));
}

OP8_HD uint8_t Code2(const QuantTables& t, float x2) {
  if (!t.fast) return NearestCode(t.q2, x2, LowerBound(t.q2, x2));
  if (IsNan(x2)) return 0;
  return static_cast<uint8_t>(FastCode2(t, Clamp(x2, 0.0f, 1.0f)));
}

#if !defined(__CUDA_ARCH__)
inline void BuildQuantTables(const float* qmaps, QuantTables* t) {
  std::memcpy(t->q1, qmaps, sizeof(t->q1));
  std::memcpy(t->q2, qmaps + kMapSize, sizeof(t->q2));
  int fold = NegativePrefix(t->q1) - 1;
  for (int k = 0; k < kMapSize; ++k) {
    t->edge1[k] = EdgeEntry(t->q1, k, fold);
    t->edge2[k] = EdgeEntry(t->q2, k, -1);
  }
  std::memset(t->start1, 0, sizeof(t->start1));
  std::memset(t->start2, 0, sizeof(t->start2));
  for (int b = 0; b < kSignedBuckets; ++b) t->start1[b] = StartEntry(t->q1, kSignedShift, b, fold);
  for (int b = 0; b < kUnsignedBuckets; ++b) {
    t->start2[b] = StartEntry(t->q2, kUnsignedShift, b, -1);
  }
  t->fast = SignFoldHolds(t->q1, fold + 1) ? 1 : 0;
  for (int i = 0; i + 1 < kMapSize; ++i) {
    if (!FastRouteHoldsAt(t->q1, kSignedShift, -1.0f, i) ||
        !FastRouteHoldsAt(t->q2, kUnsignedShift, 0.0f, i)) {
      t->fast = 0;
    }
  }
  t->padding[0] = t->padding[1] = t->padding[2] = 0;
}
#endif

// x / scale for the quantizer, with the scale fixed for a block. Divide is the
// correctly rounded division. DivideForCode gives a quotient with the same
// code: on the host the division; on the GPU, where the scale is a normal
// float below 2^127 (`fast`), __fdiv_rn's own fast path (hardware reciprocal
// refined once, a product, one fma correction) on x and the scale both
// multiplied by the power of two that brings the scale into [1, 2), with the
// reciprocal hoisted out of the block. The scaling is exact unless x * factor
// is subnormal (then the quotient is below 2^-126). For |x| <= scale the fast
// path gives __fdiv_rn's quotient unless that is below 2^-60 (the fma's
// remainder may be subnormal there), and then it gives one below 2^-47 in
// magnitude: every such quotient has the code of a zero of m's sign in both
// maps (their smallest midpoints are above 2^-23), and FastCode1 takes the
// sign from m. tests/native/fast_path_check.cu checks these properties on
// the GPU over every significand of the scale; quantizer_check.cc checks the
// codes of tiny quotients.
struct ScaleDivisor {
  float scale;
  bool fast = false;  // the GPU's route applies (always false on the host)
#if defined(__CUDA_ARCH__)
  float factor, scaled, inverse;
#endif
  OP8_HD explicit ScaleDivisor(float b) : scale(b) {
#if defined(__CUDA_ARCH__)
    uint32_t exponent = FloatBits(b) >> 23;  // biased; the sign bit makes it large
    fast = exponent - 1u < 253u;
    factor = BitsFloat((254u - exponent) << 23);
    scaled = __fmul_rn(b, factor);
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(scaled));
    inverse = __fmaf_rn(r, __fmaf_rn(-scaled, r, 1.0f), r);
#endif
  }
  OP8_HD float Divide(float x) const { return Div(x, scale); }
  // For |x| <= scale when fast is true.
  OP8_HD float DivideForCode(float x) const {
#if defined(__CUDA_ARCH__)
    float xs = __fmul_rn(x, factor);
    float q = __fmul_rn(xs, inverse);
    float r = __fmaf_rn(-scaled, q, xs);
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
