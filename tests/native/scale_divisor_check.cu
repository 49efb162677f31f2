// Checks ScaleDivisor::Divide and DivideInRange (adam8bit.h), the quantizer's
// division on the GPU, against __fdiv_rn: every divisor significand at several exponents
// across the fast range and beyond it, each against `per_divisor` dividends
// (pseudo-random significands, exponents from the divisor's down to 2^-100
// below it, both signs, and the edge cases of the range).
//   scale_divisor_check [per_divisor]  ->  prints "pairs N mismatches M"
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

__global__ void CheckKernel(uint32_t exponent, int per_divisor, unsigned long long* pairs,
                            unsigned long long* mismatches, uint32_t* example) {
  uint32_t mantissa = blockIdx.x * blockDim.x + threadIdx.x;
  if (mantissa >= (1u << 23)) return;
  float b = BitsFloat((exponent << 23) | mantissa);
  ScaleDivisor divisor(b);
  unsigned long long local_pairs = 0, local_bad = 0;
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
      a = -0.0f;
    } else if (k < 8) {  // around the fast path's lower bound, b * 2^-60
      a = BitsFloat(FloatBits(b * 8.67361737988403547e-19f) + (k - 6));
    } else {
      int drop = static_cast<int>(Hash(h) % 101);  // exponents b's down to 2^-100 below
      int e = static_cast<int>(exponent) - drop;
      if (e < 1) e = 1;
      a = BitsFloat((static_cast<uint32_t>(e) << 23) | (h & 0x7fffffu));
      if (Abs(a) > b) a = b;
    }
    if (h & 0x80000000u) a = -a;
    float fast = divisor.Divide(a);
    float exact = __fdiv_rn(a, b);
    // DivideInRange is what blocks with in-range scales use (|a| <= b here).
    float in_range = divisor.fast ? divisor.DivideInRange(a) : exact;
    ++local_pairs;
    // DivideInRange may drop a zero quotient's sign (documented there).
    bool in_range_same = FloatBits(in_range) == FloatBits(exact) || (in_range == 0 && exact == 0);
    if (FloatBits(fast) != FloatBits(exact) || !in_range_same) {
      ++local_bad;
      example[0] = FloatBits(a);
      example[1] = FloatBits(b);
    }
  }
  atomicAdd(pairs, local_pairs);
  if (local_bad) atomicAdd(mismatches, local_bad);
}

int main(int argc, char** argv) {
  int per_divisor = argc > 1 ? std::atoi(argv[1]) : 256;
  unsigned long long *pairs, *mismatches;
  uint32_t* example;
  cudaMallocManaged(&pairs, sizeof(*pairs));
  cudaMallocManaged(&mismatches, sizeof(*mismatches));
  cudaMallocManaged(&example, 2 * sizeof(*example));
  *pairs = 0, *mismatches = 0;
  // Biased exponents: 2^-61 (below the fast range), 2^-60, 2^-20, 1, 2^20,
  // 2^60 and 2^61 (above it).
  const uint32_t exponents[] = {66, 67, 107, 127, 147, 187, 188};
  for (uint32_t e : exponents) {
    CheckKernel<<<(1u << 23) / 256, 256>>>(e, per_divisor, pairs, mismatches, example);
  }
  cudaError_t error = cudaDeviceSynchronize();
  if (error != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(error));
    return 2;
  }
  std::printf("pairs %llu mismatches %llu\n", *pairs, *mismatches);
  if (*mismatches) std::printf("example a=0x%08x b=0x%08x\n", example[0], example[1]);
  return *mismatches == 0 ? 0 : 1;
}
