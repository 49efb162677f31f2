// Checks the GPU's fast paths of adam8bit.h against the correctly rounded
// intrinsics they stand for:
// 1. ScaleDivisor::DivideForCode, the quantizer's division, against
//    __fdiv_rn: every divisor significand at exponents across the normal
//    range, each against `per_divisor` dividends in [-b, b] (pseudo-random
//    significands, exponents from the divisor's down to 160 below it,
//    subnormals included, both signs, and edge cases). The quotient must be
//    __fdiv_rn's bit for bit (a zero's sign aside), except where __fdiv_rn's
//    is below 2^-60 in magnitude: there it must be below 2^-47 (such
//    quotients share one code, FastCode1 taking the sign from m; see
//    quantizer_check.cc). Divisors that are not normal floats below 2^127
//    must not take the route. A dividend whose sign bit is clear must give a
//    quotient whose sign bit is clear (FastCode2OfUnsigned indexes by it).
// 2. SqrtFastPath against __fsqrt_rn on every float32 bit pattern in
//    SqrtFastDomain, which must hold no value outside [2^-101, 2^128).
// 3. Bf16PairRounding against RoundToType(x, kBF16) on every float32 bit
//    pattern but NaN, in either half of the pair.
// 4. DivFastPath, the step's division, against __fdiv_rn: every divisor
//    significand at exponents across [2^-51, 2^65) (both ends included), each
//    against per_divisor / 4 dividends with |a| in [2^-59, 2^75]
//    (pseudo-random significands and exponents, both signs, the range's ends),
//    bit for bit.
//   fast_path_check [per_divisor]
//     ->  prints "pairs N mismatches M tiny T route R sqrt S sqrt_mismatches Q
//                 bf16 B bf16_mismatches C div D div_mismatches E sign_errors F"
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "adam8bit.h"

using namespace optax_paged8bit;

__device__ uint32_t Hash(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct Counts {
  unsigned long long pairs, mismatches, tiny, route_errors, sqrt_checked, sqrt_mismatches;
  unsigned long long bf16_checked, bf16_mismatches, div_checked, div_mismatches, sign_errors;
  uint32_t example[2], div_example[2];
};

__global__ void CheckKernel(uint32_t exponent, int per_divisor, Counts* counts) {
  uint32_t mantissa = blockIdx.x * blockDim.x + threadIdx.x;
  if (mantissa >= (1u << 23)) return;
  float b = BitsFloat((exponent << 23) | mantissa);
  ScaleDivisor divisor(b);
  bool want_route = exponent >= 1 && exponent <= 253;
  if (divisor.fast != want_route) atomicAdd(&counts->route_errors, 1ull);
  if (!divisor.fast) return;
  unsigned long long pairs = 0, bad = 0, tiny = 0, sign_errors = 0;
  for (int k = 0; k < per_divisor; ++k) {
    float a;
    uint32_t h = Hash(mantissa * 2654435761u + k * 40503u + exponent);
    if (k == 0) {
      a = b;
    } else if (k == 1) {
      a = BitsFloat(FloatBits(b) - 1);  // just below b
    } else if (k == 2) {
      a = 0.0f;
    } else if (k == 3) {
      a = BitsFloat(1u);  // the smallest subnormal
    } else if (k < 8) {   // around a quotient of 2^-60
      a = BitsFloat(FloatBits(__fmul_rn(b, 8.67361737988403547e-19f)) + (k - 6));
    } else {
      int drop = static_cast<int>(Hash(h) % 161);  // exponents b's down to 160 below
      int e = static_cast<int>(exponent) - drop;
      a = BitsFloat((e < 1 ? 0u : static_cast<uint32_t>(e) << 23) | (h & 0x7fffffu));
      if (Abs(a) > b) a = b;
    }
    if (h & 0x80000000u) a = -a;
    float fast = divisor.DivideForCode(a);
    float exact = __fdiv_rn(a, b);
    ++pairs;
    sign_errors += !SignBit(a) && SignBit(fast);
    if (FloatBits(fast) == FloatBits(exact) || (fast == 0.0f && exact == 0.0f)) continue;
    if (Abs(exact) < 8.67361737988403547e-19f && Abs(fast) < 7.105427357601002e-15f) {
      ++tiny;  // 2^-60, 2^-47
      continue;
    }
    ++bad;
    counts->example[0] = FloatBits(a);
    counts->example[1] = FloatBits(b);
  }
  atomicAdd(&counts->pairs, pairs);
  if (bad) atomicAdd(&counts->mismatches, bad);
  if (tiny) atomicAdd(&counts->tiny, tiny);
  if (sign_errors) atomicAdd(&counts->sign_errors, sign_errors);
}

// What a check of one float found.
enum Verdict { kSkipped, kEqual, kDifferent };

// Runs `check` on every float32 bit pattern, each thread taking a strided
// share, and adds up what it found.
template <typename Check>
__device__ void CheckEveryFloat(Check check, unsigned long long* checked,
                                unsigned long long* mismatches) {
  uint64_t threads = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  unsigned long long n = 0, bad = 0;
  for (uint64_t bits = blockIdx.x * blockDim.x + threadIdx.x; bits <= 0xffffffffull;
       bits += threads) {
    Verdict verdict = check(BitsFloat(static_cast<uint32_t>(bits)));
    n += verdict != kSkipped;
    bad += verdict == kDifferent;
  }
  atomicAdd(checked, n);
  if (bad) atomicAdd(mismatches, bad);
}

__global__ void SqrtKernel(Counts* counts) {
  auto check = [counts](float v) {
    bool in_domain = SqrtFastDomain(v);
    bool in_range = IsFinite(v) && v >= 3.9443045261050590e-31f;  // 2^-101
    if (in_domain != in_range) atomicAdd(&counts->route_errors, 1ull);
    if (!in_domain) return kSkipped;
    return FloatBits(SqrtFastPath(v)) == FloatBits(__fsqrt_rn(v)) ? kEqual : kDifferent;
  };
  CheckEveryFloat(check, &counts->sqrt_checked, &counts->sqrt_mismatches);
}

__global__ void Bf16Kernel(Counts* counts) {
  auto check = [](float x) {
    if (IsNan(x)) return kSkipped;
    // x in the low half next to -x, then in the high half next to a neighbour.
    float y = BitsFloat(FloatBits(x) ^ 0x00400001u);
    Bf16Pair first = Bf16PairRounding{}(Bf16Pair{x, -x});
    Bf16Pair second = Bf16PairRounding{}(Bf16Pair{IsNan(y) ? x : y, x});
    uint32_t want = FloatBits(RoundToType(x, kBF16));
    bool same = FloatBits(first.lo) == want && FloatBits(second.hi) == want &&
                FloatBits(first.hi) == FloatBits(RoundToType(-x, kBF16));
    return same ? kEqual : kDifferent;
  };
  CheckEveryFloat(check, &counts->bf16_checked, &counts->bf16_mismatches);
}

__global__ void DivisionKernel(uint32_t exponent, int per_divisor, Counts* counts) {
  uint32_t mantissa = blockIdx.x * blockDim.x + threadIdx.x;
  if (mantissa >= (1u << 23)) return;
  float b = BitsFloat((exponent << 23) | mantissa);
  unsigned long long n = 0, bad = 0;
  for (int k = 0; k < per_divisor; ++k) {
    uint32_t h = Hash(mantissa * 2246822519u + k * 3266489917u + exponent);
    float a;
    if (k == 0) {
      a = 0x1p-59f;
    } else if (k == 1) {
      a = 0x1p75f;
    } else if (k == 2) {
      a = BitsFloat(FloatBits(0x1p75f) - 1);
    } else if (k == 3) {
      a = b;
    } else {  // biased exponents 68 (2^-59) to 201, any significand; 2^75 itself above
      uint32_t e = 68u + Hash(h) % 134u;
      a = BitsFloat((e << 23) | (h & 0x7fffffu));
    }
    if (h & 0x80000000u) a = -a;
    ++n;
    float fast = DivFastPath(a, b), exact = __fdiv_rn(a, b);
    if (FloatBits(fast) != FloatBits(exact)) {
      ++bad;
      counts->div_example[0] = FloatBits(a);
      counts->div_example[1] = FloatBits(b);
    }
  }
  atomicAdd(&counts->div_checked, n);
  if (bad) atomicAdd(&counts->div_mismatches, bad);
}

int main(int argc, char** argv) {
  int per_divisor = argc > 1 ? std::atoi(argv[1]) : 256;
  Counts* counts;
  cudaMallocManaged(&counts, sizeof(*counts));
  *counts = Counts{};
  // Biased exponents: the route's range 1..253 at its ends and across it, and
  // 0 (subnormal), 254 and 255 (infinity, NaN) outside it.
  const uint32_t exponents[] = {0, 1, 2, 30, 67, 107, 127, 147, 187, 220, 252, 253, 254, 255};
  for (uint32_t e : exponents) {
    CheckKernel<<<(1u << 23) / 256, 256>>>(e, per_divisor, counts);
  }
  SqrtKernel<<<4096, 256>>>(counts);
  Bf16Kernel<<<4096, 256>>>(counts);
  // Divisor exponents (biased): 76 (2^-51) to 191 (below 2^65), the ends and
  // between.
  const uint32_t div_exponents[] = {76, 77, 90, 110, 127, 128, 150, 170, 190, 191};
  for (uint32_t e : div_exponents) {
    DivisionKernel<<<(1u << 23) / 256, 256>>>(e, per_divisor / 4, counts);
  }
  cudaError_t error = cudaDeviceSynchronize();
  if (error != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(error));
    return 2;
  }
  std::printf(
      "pairs %llu mismatches %llu tiny %llu route %llu sqrt %llu sqrt_mismatches %llu bf16 %llu "
      "bf16_mismatches %llu div %llu div_mismatches %llu sign_errors %llu\n",
      counts->pairs, counts->mismatches, counts->tiny, counts->route_errors, counts->sqrt_checked,
      counts->sqrt_mismatches, counts->bf16_checked, counts->bf16_mismatches, counts->div_checked,
      counts->div_mismatches, counts->sign_errors);
  if (counts->mismatches) {
    std::printf("example a=0x%08x b=0x%08x\n", counts->example[0], counts->example[1]);
  }
  if (counts->div_mismatches) {
    std::printf("division example a=0x%08x b=0x%08x\n", counts->div_example[0],
                counts->div_example[1]);
  }
  bool ok = counts->mismatches == 0 && counts->route_errors == 0 && counts->sqrt_mismatches == 0 &&
            counts->bf16_mismatches == 0 && counts->div_mismatches == 0 && counts->sign_errors == 0;
  return ok ? 0 : 1;
}
