// CUDA kernels: one warp per 256-element block, lane l owning elements
// 8l..8l+7 of it, a persistent grid over the blocks of every leaf.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "adam8bit.h"
#include "cuda_kernels.h"

namespace optax_paged8bit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / kLanes;
constexpr unsigned kFullMask = 0xffffffffu;

// The leaf that owns the launch's block `block` (the last leaf starting at or
// before it; empty leaves start where the next one does).
__device__ __forceinline__ int FindLeaf(const LeafTable& table, int64_t block) {
  int lo = 0, hi = table.num_leaves - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (table.leaves[mid].block_begin <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Loads a lane's elements [start, start + valid) as float; the rest are 0.
__device__ __forceinline__ void LoadLane(const void* data, int32_t type, int64_t start, int valid,
                                         float out[kLaneElems]) {
  if (valid == kLaneElems) {
    if (type == kF32) {
      const float* p = static_cast<const float*>(data) + start;
      if (Aligned16(p)) {
        float4 a = __ldcs(reinterpret_cast<const float4*>(p));
        float4 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
        out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
        out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
        return;
      }
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(data) + start;
      if (Aligned16(p)) {
        uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
        uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          uint16_t lo = static_cast<uint16_t>(words[k] & 0xffffu);
          uint16_t hi = static_cast<uint16_t>(words[k] >> 16);
          out[2 * k] = type == kBF16 ? Bf16ToFloat(lo) : F16ToFloat(lo);
          out[2 * k + 1] = type == kBF16 ? Bf16ToFloat(hi) : F16ToFloat(hi);
        }
        return;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k)
    out[k] = k < valid ? LoadAsFloat(data, type, start + k) : 0.0f;
}

// Stores a lane's elements [start, start + valid) in the param dtype.
__device__ __forceinline__ void StoreLane(void* data, int32_t type, int64_t start, int valid,
                                          const float in[kLaneElems]) {
  if (valid == kLaneElems) {
    if (type == kF32) {
      float* p = static_cast<float*>(data) + start;
      if (Aligned16(p)) {
        reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
        return;
      }
    } else {
      uint16_t* p = static_cast<uint16_t*>(data) + start;
      if (Aligned16(p)) {
        uint32_t words[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          uint16_t lo = type == kBF16 ? FloatToBf16(in[2 * k]) : FloatToF16(in[2 * k]);
          uint16_t hi = type == kBF16 ? FloatToBf16(in[2 * k + 1]) : FloatToF16(in[2 * k + 1]);
          words[k] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
        *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
        return;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    if (k < valid) StoreFromFloat(data, type, start + k, in[k]);
  }
}

// 8 codes of a lane; padded lanes get `pad`.
__device__ __forceinline__ void LoadCodes(const uint8_t* codes, int64_t start, int valid,
                                          uint8_t pad, uint8_t out[kLaneElems]) {
  if (valid == kLaneElems) {
    uint2 raw = *reinterpret_cast<const uint2*>(codes + start);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[k] = static_cast<uint8_t>(raw.x >> (8 * k));
      out[4 + k] = static_cast<uint8_t>(raw.y >> (8 * k));
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) out[k] = k < valid ? codes[start + k] : pad;
}

__device__ __forceinline__ void StoreCodes(uint8_t* codes, int64_t start, int valid,
                                           const uint8_t in[kLaneElems]) {
  if (valid == kLaneElems) {
    uint2 raw = make_uint2(0, 0);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      raw.x |= static_cast<uint32_t>(in[k]) << (8 * k);
      raw.y |= static_cast<uint32_t>(in[4 + k]) << (8 * k);
    }
    *reinterpret_cast<uint2*>(codes + start) = raw;
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    if (k < valid) codes[start + k] = in[k];
  }
}

__device__ __forceinline__ float WarpMax(float x) {
#pragma unroll
  for (int d = kLanes / 2; d >= 1; d >>= 1) {
    float other = __shfl_xor_sync(kFullMask, x, d);
    x = other > x ? other : x;
  }
  return x;
}

__device__ __forceinline__ int LaneValid(int64_t size, int64_t start) {
  int64_t rest = size - start;
  return rest <= 0 ? 0 : (rest >= kLaneElems ? kLaneElems : static_cast<int>(rest));
}

// Dequantized moments of a lane (SPEC 3.2 step 2); padded lanes take part.
__device__ __forceinline__ void LaneMoments(const LeafDesc& leaf, const float* q1, const float* q2,
                                            const StepScalars& s, int64_t start, int valid,
                                            float a1, float a2, float scale, bool pad,
                                            float m[kLaneElems], float v[kLaneElems],
                                            unsigned* finite) {
  float g[kLaneElems];
  uint8_t c1[kLaneElems], c2[kLaneElems];
  LoadLane(leaf.grad, leaf.type, start, valid, g);
  LoadCodes(static_cast<const uint8_t*>(leaf.state1), start, valid, kPadCode1, c1);
  LoadCodes(static_cast<const uint8_t*>(leaf.state2), start, valid, 0, c2);
  *finite = 0;
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    float gf = k < valid ? Mul(g[k], scale) : 0.0f;
    if (IsFinite(gf)) *finite |= 1u << k;
    BlockwiseMoments(gf, q1[c1[k]], a1, q2[c2[k]], a2, s, &m[k], &v[k]);
    if (k >= valid && !pad) m[k] = v[k] = 0.0f;  // whole-leaf scales: no padding
  }
}

__device__ __forceinline__ void LoadMaps(const float* qmaps, float* shared) {
  for (int i = threadIdx.x; i < 2 * kMapSize; i += blockDim.x) shared[i] = qmaps[i];
  __syncthreads();
}

// Shared-memory copy of the maps and their bucket tables (see adam8bit.h).
struct alignas(16) Quantizer {
  float q[2 * kMapSize];
  uint8_t table1[kSignedBuckets];
  uint8_t table2[kUnsignedBuckets];
};

__device__ __forceinline__ void LoadQuantizer(const float* qmaps, const uint8_t* tables,
                                              Quantizer* shared) {
  for (int i = threadIdx.x; i < 2 * kMapSize; i += blockDim.x) shared->q[i] = qmaps[i];
  const uint4* src = reinterpret_cast<const uint4*>(tables);
  uint4* dst = reinterpret_cast<uint4*>(shared->table1);  // table2 follows table1
  constexpr int kWords = (kSignedBuckets + kUnsignedBuckets) / 16;
  for (int i = threadIdx.x; i < kWords; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
}

// Blocks [begin, end) of the launch handled by this warp: a contiguous range,
// so that a warp (and its neighbours) stays within one leaf for long runs.
__device__ __forceinline__ void WarpRange(int64_t num_blocks, int64_t* begin, int64_t* end) {
  int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kLanes;
  int64_t per_warp = (num_blocks + num_warps - 1) / num_warps;
  *begin = warp * per_warp;
  *end = *begin + per_warp < num_blocks ? *begin + per_warp : num_blocks;
}

// Follows a warp's blocks through the leaves. On crossing into a leaf it copies
// the leaf's descriptor from the kernel parameters (constant memory, whose
// small cache thrashes when warps sit in many different leaves) into this
// warp's shared-memory slot; later reads are shared-memory broadcasts.
struct LeafCursor {
  LeafDesc* slot;  // this warp's shared-memory copy
  int index = -1;
  int64_t begin = 0, end = 0;

  __device__ __forceinline__ const LeafDesc& At(const LeafTable& table, int64_t block) {
    if (index < 0 || block < begin || block >= end) {
      index = FindLeaf(table, block);
      constexpr int kWords = sizeof(LeafDesc) / sizeof(uint32_t);
      static_assert(kWords <= kLanes, "a leaf descriptor is copied one word per lane");
      int lane = threadIdx.x & (kLanes - 1);
      __syncwarp();
      if (lane < kWords) {
        reinterpret_cast<uint32_t*>(slot)[lane] =
            reinterpret_cast<const uint32_t*>(&table.leaves[index])[lane];
      }
      __syncwarp();
      begin = slot->block_begin;
      end = begin + (slot->size + kBlockSize - 1) / kBlockSize;
    }
    return *slot;
  }
};

__device__ __forceinline__ LeafDesc* WarpLeafSlot() {
  __shared__ LeafDesc slots[kWarpsPerCta];
  return &slots[threadIdx.x / kLanes];
}

__global__ void BuildTablesKernel(const float* qmaps, uint8_t* tables) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < kSignedBuckets) tables[i] = BucketEntry(qmaps, kKeyMinusOne, i);
  if (i < kUnsignedBuckets) {
    tables[kSignedBuckets + i] = BucketEntry(qmaps + kMapSize, kKeyZero, i);
  }
}

__global__ void __launch_bounds__(kThreads)
    BlockNormSqKernel(const __grid_constant__ LeafTable table, double* partials) {
  int lane = threadIdx.x & (kLanes - 1);
  int64_t first, last;
  WarpRange(table.num_blocks, &first, &last);
  LeafCursor cursor{WarpLeafSlot()};
  for (int64_t b = first; b < last; ++b) {
    const LeafDesc& leaf = cursor.At(table, b);
    int64_t start = (b - cursor.begin) * kBlockSize + lane * kLaneElems;
    int valid = LaneValid(leaf.size, start);
    float g[kLaneElems];
    LoadLane(leaf.grad, leaf.type, start, valid, g);
    double sum = LaneNormSq(g, valid);
#pragma unroll
    for (int d = kLanes / 2; d >= 1; d >>= 1) sum = AddD(sum, __shfl_xor_sync(kFullMask, sum, d));
    if (lane == 0) partials[b] = sum;
  }
}

__global__ void __launch_bounds__(kNormThreads)
    RingScaleKernel(const __grid_constant__ LeafTable table, const double* partials, float* rings,
                    float* clip_scale, int64_t t, int32_t percentile) {
  __shared__ double sums[kNormThreads];
  const LeafDesc& leaf = table.leaves[blockIdx.x];
  int64_t num_blocks = (leaf.size + kBlockSize - 1) / kBlockSize;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < num_blocks; j += kNormThreads) {
    sum = AddD(sum, partials[leaf.block_begin + j]);
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int d = kNormThreads / 2; d >= 1; d >>= 1) {
    if (threadIdx.x < d) sums[threadIdx.x] = AddD(sums[threadIdx.x], sums[threadIdx.x + d]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* ring = rings + static_cast<int64_t>(leaf.index) * kRingSize;
    clip_scale[leaf.index] = UpdateRingAndScale(ring, ToFloat(sums[0]), t, percentile);
  }
}

__global__ void __launch_bounds__(kThreads)
    WholeLeafMaxKernel(const __grid_constant__ LeafTable table, const StepArgs args) {
  __shared__ float maps[2 * kMapSize];
  LoadMaps(args.qmaps, maps);
  StepScalars s = ComputeStepScalars(args.hyper, args.t);
  int lane = threadIdx.x & (kLanes - 1);
  int64_t first, last;
  WarpRange(table.num_blocks, &first, &last);
  LeafCursor cursor{WarpLeafSlot()};
  for (int64_t b = first; b < last; ++b) {
    const LeafDesc& leaf = cursor.At(table, b);
    if (!(leaf.flags & kLeafWhole)) continue;
    int64_t start = (b - cursor.begin) * kBlockSize + lane * kLaneElems;
    int valid = LaneValid(leaf.size, start);
    float scale = args.clip_scale ? args.clip_scale[leaf.index] : 1.0f;
    float m[kLaneElems], v[kLaneElems];
    unsigned finite;
    LaneMoments(leaf, maps, maps + kMapSize, s, start, valid, leaf.absmax1[0], leaf.absmax2[0],
                scale, false, m, v, &finite);
    float max1 = 0.0f, max2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      max1 = MaxAbs(max1, m[k]);
      max2 = MaxAbs(max2, v[k]);
    }
    max1 = WarpMax(max1);
    max2 = WarpMax(max2);
    if (lane == 0) {
      // Non-negative floats order like their bit patterns.
      auto* out = reinterpret_cast<unsigned*>(args.whole_absmax + 2 * leaf.index);
      atomicMax(out, FloatBits(max1));
      atomicMax(out + 1, FloatBits(max2));
    }
  }
}

__global__ void __launch_bounds__(kThreads, 4)
    UpdateKernel(const __grid_constant__ LeafTable table, const StepArgs args) {
  __shared__ Quantizer quant;
  LoadQuantizer(args.qmaps, args.tables, &quant);
  const float* q1 = quant.q;
  const float* q2 = quant.q + kMapSize;
  StepScalars s = ComputeStepScalars(args.hyper, args.t);
  if (args.write_count && blockIdx.x == 0 && threadIdx.x == 0) {
    *args.count_out = static_cast<int32_t>(args.t);
  }
  int lane = threadIdx.x & (kLanes - 1);
  int64_t first, last;
  WarpRange(table.num_blocks, &first, &last);
  LeafCursor cursor{WarpLeafSlot()};
  for (int64_t b = first; b < last; ++b) {
    const LeafDesc& leaf = cursor.At(table, b);
    int64_t j = b - cursor.begin;
    int64_t start = j * kBlockSize + lane * kLaneElems;
    int valid = LaneValid(leaf.size, start);
    float scale = args.clip_scale ? args.clip_scale[leaf.index] : 1.0f;
    bool decay = (leaf.flags & kLeafDecay) != 0;
    float p[kLaneElems], out[kLaneElems];

    if (!(leaf.flags & kLeaf8bit)) {  // SPEC 3.3: float32 moments
      float g[kLaneElems], m[kLaneElems], v[kLaneElems];
      LoadLane(leaf.grad, leaf.type, start, valid, g);
      LoadLane(leaf.state1, kF32, start, valid, m);
      LoadLane(leaf.state2, kF32, start, valid, v);
      LoadLane(leaf.param, leaf.type, start, valid, p);
#pragma unroll
      for (int k = 0; k < kLaneElems; ++k) {
        Float32Moments(Mul(g[k], scale), s, &m[k], &v[k]);
        float p_new = StepParam(p[k], m[k], v[k], s, decay, leaf.type);
        out[k] = args.write_params ? p_new : UpdateFor(p[k], p_new, leaf.type);
      }
      StoreLane(leaf.state1, kF32, start, valid, m);
      StoreLane(leaf.state2, kF32, start, valid, v);
      StoreLane(leaf.out, leaf.type, start, valid, out);
      continue;
    }

    bool whole = (leaf.flags & kLeafWhole) != 0;
    float old1 = leaf.absmax1[whole ? 0 : j], old2 = leaf.absmax2[whole ? 0 : j];
    float m[kLaneElems], v[kLaneElems];
    unsigned finite;
    LaneMoments(leaf, q1, q2, s, start, valid, old1, old2, scale, !whole, m, v, &finite);
    float absmax1, absmax2;
    if (whole) {
      absmax1 = args.whole_absmax[2 * leaf.index];
      absmax2 = args.whole_absmax[2 * leaf.index + 1];
    } else {
      absmax1 = 0.0f, absmax2 = 0.0f;
#pragma unroll
      for (int k = 0; k < kLaneElems; ++k) {
        absmax1 = MaxAbs(absmax1, m[k]);
        absmax2 = MaxAbs(absmax2, v[k]);
      }
      absmax1 = WarpMax(absmax1);
      absmax2 = WarpMax(absmax2);
    }
    LoadLane(leaf.param, leaf.type, start, valid, p);
    uint8_t c1[kLaneElems], c2[kLaneElems];
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      float p_new = (finite >> k) & 1u ? StepParam(p[k], m[k], v[k], s, decay, leaf.type) : p[k];
      out[k] = args.write_params ? p_new : UpdateFor(p[k], p_new, leaf.type);
      c1[k] = QuantizeSignedTable(q1, quant.table1, m[k], absmax1);
      c2[k] = QuantizeUnsignedTable(q2, quant.table2, v[k], absmax2);
    }
    StoreLane(leaf.out, leaf.type, start, valid, out);
    StoreCodes(static_cast<uint8_t*>(leaf.state1), start, valid, c1);
    StoreCodes(static_cast<uint8_t*>(leaf.state2), start, valid, c2);
    if (!whole && lane == 0) {
      leaf.absmax1[j] = absmax1;
      leaf.absmax2[j] = absmax2;
    }
  }
}

// After the update: the whole-leaf scales replace the old ones.
__global__ void StoreWholeScalesKernel(const __grid_constant__ LeafTable table,
                                       const float* whole_absmax) {
  for (int i = threadIdx.x; i < table.num_leaves; i += blockDim.x) {
    const LeafDesc& leaf = table.leaves[i];
    if (leaf.flags & kLeafWhole) {
      leaf.absmax1[0] = whole_absmax[2 * leaf.index];
      leaf.absmax2[0] = whole_absmax[2 * leaf.index + 1];
    }
  }
}

int GridFor(int64_t num_blocks, int num_sms) {
  int64_t ctas = (num_blocks + kWarpsPerCta - 1) / kWarpsPerCta;
  int64_t cap = static_cast<int64_t>(num_sms) * 4;  // one resident wave (4 CTAs per SM)
  return static_cast<int>(std::max<int64_t>(1, std::min(ctas, cap)));
}

}  // namespace

cudaError_t LaunchBlockNormSq(const LeafTable& table, double* partials, int num_sms,
                              cudaStream_t stream) {
  BlockNormSqKernel<<<GridFor(table.num_blocks, num_sms), kThreads, 0, stream>>>(table, partials);
  return cudaGetLastError();
}

cudaError_t LaunchRingScale(const LeafTable& table, const double* partials, float* rings,
                            float* clip_scale, int64_t t, int32_t percentile, cudaStream_t stream) {
  if (table.num_leaves == 0) return cudaSuccess;
  RingScaleKernel<<<table.num_leaves, kNormThreads, 0, stream>>>(table, partials, rings, clip_scale,
                                                                 t, percentile);
  return cudaGetLastError();
}

cudaError_t LaunchWholeLeafMax(const LeafTable& table, const StepArgs& args, int num_sms,
                               cudaStream_t stream) {
  WholeLeafMaxKernel<<<GridFor(table.num_blocks, num_sms), kThreads, 0, stream>>>(table, args);
  return cudaGetLastError();
}

cudaError_t LaunchBuildTables(const float* qmaps, uint8_t* tables, cudaStream_t stream) {
  BuildTablesKernel<<<kSignedBuckets / kThreads, kThreads, 0, stream>>>(qmaps, tables);
  return cudaGetLastError();
}

cudaError_t LaunchUpdate(const LeafTable& table, const StepArgs& args, int num_sms,
                         cudaStream_t stream) {
  UpdateKernel<<<GridFor(table.num_blocks, num_sms), kThreads, 0, stream>>>(table, args);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  if (args.whole_absmax != nullptr) {
    StoreWholeScalesKernel<<<1, kThreads, 0, stream>>>(table, args.whole_absmax);
    error = cudaGetLastError();
  }
  return error;
}

}  // namespace optax_paged8bit
