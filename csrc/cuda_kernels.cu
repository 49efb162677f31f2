// CUDA kernels: one warp per 256-element block, lane l owning elements
// 8l..8l+7 of it, a persistent grid over the blocks of every leaf.
//
// This file is device code only. The extension carries it as text and NVRTC
// compiles it at first use for the GPU at hand (cuda_api.cc), with no system
// headers: adam8bit.h and cuda_kernels.h come with it. Its entry points are
// the extern "C" kernels at the end; cuda_api.cc launches them.
#include "adam8bit.h"
#include "cuda_kernels.h"

namespace optax_paged8bit {
namespace {

// The two pieces of <type_traits> the kernels use.
template <typename T, T v>
struct IntegralConstant {
  static constexpr T value = v;
};
template <bool kFirst, typename A, typename B>
struct Conditional {
  using type = A;
};
template <typename A, typename B>
struct Conditional<false, A, B> {
  using type = B;
};

constexpr int kWarpsPerCta = kThreads / kLanes;
// The update kernel runs one CTA of 1024 threads per SM (64 registers each:
// the whole register file) rather than 4 of 256: an SM then holds one copy of
// the quantizer tables (46 KB) instead of 4, which made the bfloat16 step 6%
// faster on an H200 (float32 1%; benchmarks/RESULTS.md).
// Staging the next block's float32 loads in the freed shared memory with
// cp.async made float32 24% slower there.
constexpr int kUpdateWarps = kUpdateThreads / kLanes;
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

// Calls f with the dtype as a compile-time constant
// (IntegralConstant<int32_t, T>), so that each body is specialised per
// dtype and no element converts through a runtime switch.
template <typename F>
__device__ __forceinline__ void WithElemType(int32_t type, F&& f) {
  switch (type) {
    case kBF16:
      f(IntegralConstant<int32_t, kBF16>{});
      break;
    case kF16:
      f(IntegralConstant<int32_t, kF16>{});
      break;
    default:
      f(IntegralConstant<int32_t, kF32>{});
  }
}

__device__ __forceinline__ bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// A lane's 8 elements of dtype T as they lie in memory: two 16-byte words of
// float32, one of 16-bit values. Loaded as raw words first and unpacked
// afterwards, so that a caller can issue all of a block's loads before it
// uses any (UnpackLane).
template <int32_t T>
struct LaneWords {
  uint4 w[T == kF32 ? 2 : 1];
};

// Element `start` of data of dtype T.
template <int32_t T>
__device__ __forceinline__ const char* ElementAt(const void* data, int64_t start) {
  return static_cast<const char*>(data) + start * (T == kF32 ? 4 : 2);
}

// A full lane of dtype T at 16-byte aligned `at` (ElementAt<T>(data, start)).
template <int32_t T>
__device__ __forceinline__ LaneWords<T> LoadLaneWords(const char* at) {
  const uint4* p = reinterpret_cast<const uint4*>(at);
  LaneWords<T> words;
#pragma unroll
  for (int k = 0; k < (T == kF32 ? 2 : 1); ++k) words.w[k] = __ldcs(p + k);
  return words;
}

template <int32_t T>
__device__ __forceinline__ void UnpackLane(const LaneWords<T>& words, float out[kLaneElems]) {
  if constexpr (T == kF32) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      out[4 * k] = BitsFloat(words.w[k].x), out[4 * k + 1] = BitsFloat(words.w[k].y);
      out[4 * k + 2] = BitsFloat(words.w[k].z), out[4 * k + 3] = BitsFloat(words.w[k].w);
    }
  } else {
    uint32_t w[4] = {words.w[0].x, words.w[0].y, words.w[0].z, words.w[0].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint16_t lo = static_cast<uint16_t>(w[k] & 0xffffu);
      uint16_t hi = static_cast<uint16_t>(w[k] >> 16);
      out[2 * k] = T == kBF16 ? Bf16ToFloat(lo) : F16ToFloat(lo);
      out[2 * k + 1] = T == kBF16 ? Bf16ToFloat(hi) : F16ToFloat(hi);
    }
  }
}

// Loads a lane's elements [start, start + valid) of dtype T as float; the
// rest are 0.
template <int32_t T>
__device__ __forceinline__ void LoadLane(const void* data, int64_t start, int valid,
                                         float out[kLaneElems]) {
  if (valid == kLaneElems && Aligned16(ElementAt<T>(data, start))) {
    UnpackLane<T>(LoadLaneWords<T>(ElementAt<T>(data, start)), out);
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) out[k] = k < valid ? LoadAsFloat(data, T, start + k) : 0.0f;
}

// Stores a full lane of a 16-bit dtype at 16-byte aligned
// ElementAt<T>(data, start) from its packed words.
__device__ __forceinline__ void StoreLaneWords(void* data, int64_t start,
                                               const uint32_t words[kLaneElems / 2]) {
  __stcs(reinterpret_cast<uint4*>(static_cast<uint16_t*>(data) + start),
         make_uint4(words[0], words[1], words[2], words[3]));
}

// Stores a full lane of dtype T at 16-byte aligned ElementAt<T>(data, start)
// in 16-byte words (a plain assignment compiles to 8 scalar stores). The
// values are of T already (RoundToType), so a bfloat16 is the high half of
// its float.
template <int32_t T>
__device__ __forceinline__ void StoreLaneWords(void* data, int64_t start,
                                               const float in[kLaneElems]) {
  if constexpr (T == kF32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(data) + start);
    __stcs(p, make_float4(in[0], in[1], in[2], in[3]));
    __stcs(p + 1, make_float4(in[4], in[5], in[6], in[7]));
  } else {
    uint32_t words[kLaneElems / 2];
#pragma unroll
    for (int k = 0; k < kLaneElems / 2; ++k) {
      if constexpr (T == kBF16) {
        words[k] = PackBf16(in[2 * k], in[2 * k + 1]);
      } else {
        words[k] = static_cast<uint32_t>(FloatToF16(in[2 * k])) |
                   (static_cast<uint32_t>(FloatToF16(in[2 * k + 1])) << 16);
      }
    }
    StoreLaneWords(data, start, words);
  }
}

// Stores a lane's elements [start, start + valid) in dtype T (values of T).
template <int32_t T>
__device__ __forceinline__ void StoreLane(void* data, int64_t start, int valid,
                                          const float in[kLaneElems]) {
  if (valid == kLaneElems && Aligned16(ElementAt<T>(data, start))) {
    StoreLaneWords<T>(data, start, in);
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    if (k < valid) StoreFromFloat(data, T, start + k, in[k]);
  }
}

// A lane's 8 codes from their 8 bytes, each into the low byte of a word (byte
// extraction by __byte_perm, one instruction each).
__device__ __forceinline__ void UnpackCodes(uint2 raw, uint32_t out[kLaneElems]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = __byte_perm(raw.x, 0, 0x4440 + k);
    out[4 + k] = __byte_perm(raw.y, 0, 0x4440 + k);
  }
}

// A lane's codes; padded lanes get `pad`.
__device__ __forceinline__ void LoadCodes(const uint8_t* codes, int64_t start, int valid,
                                          uint8_t pad, uint32_t out[kLaneElems]) {
  if (valid == kLaneElems) {
    UnpackCodes(*reinterpret_cast<const uint2*>(codes + start), out);
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) out[k] = k < valid ? codes[start + k] : pad;
}

// Stores the low bytes of a lane's 8 code words.
__device__ __forceinline__ void StoreCodes(uint8_t* codes, int64_t start, int valid,
                                           const uint32_t in[kLaneElems]) {
  if (valid == kLaneElems) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = __byte_perm(in[2 * k], in[2 * k + 1], 0x0040);
    *reinterpret_cast<uint2*>(codes + start) =
        make_uint2(__byte_perm(w[0], w[1], 0x5410), __byte_perm(w[2], w[3], 0x5410));
    return;
  }
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    if (k < valid) codes[start + k] = static_cast<uint8_t>(in[k]);
  }
}

// The warp's maximum of non-negative floats (never NaN here: MaxAbs skips
// NaN), which order like their bit patterns: one integer reduction (sm_80+)
// instead of five shuffles and maxima (6% off the bfloat16 fused step on an
// H200, benchmarks/RESULTS.md).
__device__ __forceinline__ float WarpMax(float x) {
  return BitsFloat(__reduce_max_sync(kFullMask, FloatBits(x)));
}

__device__ __forceinline__ int LaneValid(int64_t size, int64_t start) {
  int64_t rest = size - start;
  return rest <= 0 ? 0 : (rest >= kLaneElems ? kLaneElems : static_cast<int>(rest));
}

__device__ __forceinline__ void PrefetchL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// A full lane of an 8-bit leaf's block, with its data aligned (the leaf's
// kLeafAligned): its grads, both moments' codes and, when `params` is given,
// its params. Every load is issued before any is used, so that its warp waits
// for memory once per block: the codes' loads and the params' used to wait
// for their predecessors' first use (three round trips per block; Nsight
// Compute put 42% of the float32 fused step's stall samples on those three
// uses). With `prefetch_next`, it then asks L2 for the same lane of the next
// block (which must be a full block of the leaf), so that that block's loads
// wait on L2, not on DRAM: the addresses are the loads' plus a constant. (On
// an H100 the prefetch slowed the float32 step by 8% while each block's loads
// waited for one another; since they are issued together it speeds up the
// float32 step on an H200 by 2-3% (benchmarks/RESULTS.md).
// Carrying the next block's loads in registers instead was slower: 80
// registers, 3 CTAs per SM.)
template <int32_t T>
__device__ __forceinline__ void LoadFullLane8bit(const LeafDesc& leaf, int64_t start,
                                                 bool prefetch_next, float g[kLaneElems],
                                                 uint32_t c1[kLaneElems], uint32_t c2[kLaneElems],
                                                 float* params) {
  constexpr int kNextBlock = kBlockSize * (T == kF32 ? 4 : 2);  // bytes to the next block
  const char* grads = ElementAt<T>(leaf.grad, start);
  const char* codes1 = static_cast<const char*>(leaf.state1_in) + start;
  const char* codes2 = static_cast<const char*>(leaf.state2_in) + start;
  const char* at_params = params != nullptr ? ElementAt<T>(leaf.param, start) : nullptr;
  LaneWords<T> graw = LoadLaneWords<T>(grads);
  uint2 raw1 = __ldcs(reinterpret_cast<const uint2*>(codes1));
  uint2 raw2 = __ldcs(reinterpret_cast<const uint2*>(codes2));
  LaneWords<T> praw;
  if (params != nullptr) praw = LoadLaneWords<T>(at_params);
  if (prefetch_next) {
    PrefetchL2(grads + kNextBlock);
    PrefetchL2(codes1 + kBlockSize);
    PrefetchL2(codes2 + kBlockSize);
    if (params != nullptr) PrefetchL2(at_params + kNextBlock);
  }
  UnpackLane<T>(graw, g);
  UnpackCodes(raw1, c1);
  UnpackCodes(raw2, c2);
  if (params != nullptr) UnpackLane<T>(praw, params);
}

// The same for any lane of an 8-bit leaf's block (padded elements: grad 0,
// the codes LaneMoments expects).
template <int32_t T>
__device__ __forceinline__ void LoadLane8bit(const LeafDesc& leaf, int64_t start, int valid,
                                             float g[kLaneElems], uint32_t c1[kLaneElems],
                                             uint32_t c2[kLaneElems], float* params) {
  const uint8_t* codes1 = static_cast<const uint8_t*>(leaf.state1_in);
  const uint8_t* codes2 = static_cast<const uint8_t*>(leaf.state2_in);
  if (valid == kLaneElems && Aligned16(ElementAt<T>(leaf.grad, start)) &&
      (params == nullptr || Aligned16(ElementAt<T>(leaf.param, start)))) {
    LoadFullLane8bit<T>(leaf, start, false, g, c1, c2, params);
    return;
  }
  LoadLane<T>(leaf.grad, start, valid, g);
  LoadCodes(codes1, start, valid, kPadCode1, c1);
  LoadCodes(codes2, start, valid, 0, c2);
  if (params != nullptr) LoadLane<T>(leaf.param, start, valid, params);
}

// A lane's clipped grads gf = g * scale (SPEC 3.5), in place. Without
// clipping (`clip` false, scale 1) the product is skipped: g * 1 is g, but
// for a NaN's payload, which no result keeps (a non-finite gf only zeroes
// moments and keeps its param).
__device__ __forceinline__ void ClipLane(bool clip, float scale, float g[kLaneElems]) {
  if (!clip) return;
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) g[k] = Mul(g[k], scale);
}

// Dequantized moments of a lane (SPEC 3.2 step 2) from its clipped grads
// (ClipLane) and codes. Padded lanes take part with block scales (`pad`);
// with whole-leaf scales they count as zeros. Bit k of `finite` is set where
// the element steps (MomentsFinite): the moments are computed for every
// element and fixed afterwards only in a lane where one may not be finite (a
// NaN probe finds it: 0 * (m + v) is NaN where m or v is infinite or NaN, and
// where finite m and v overflow in the sum, which the exact check then lets
// pass).
__device__ __forceinline__ void LaneMoments(const QuantTables& qt, const StepScalars& s,
                                            const float gf[kLaneElems],
                                            const uint32_t c1[kLaneElems],
                                            const uint32_t c2[kLaneElems], int valid, float a1,
                                            float a2, bool pad, float m[kLaneElems],
                                            float v[kLaneElems], unsigned* finite) {
  float probe = 0.0f;
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    UnguardedBlockwiseMoments(gf[k], qt.q1[c1[k]], a1, qt.q2[c2[k]], a2, s, &m[k], &v[k]);
    probe = Fma(Add(m[k], v[k]), 0.0f, probe);  // gf is 0 in padded lanes
  }
  *finite = (1u << kLaneElems) - 1;
  if (IsNan(probe)) {
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      if (!MomentsFinite(m[k], v[k])) {
        m[k] = v[k] = 0.0f;
        *finite &= ~(1u << k);
      }
    }
  }
  if (!pad) {
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      if (k >= valid) m[k] = v[k] = 0.0f;
    }
  }
}

// Copies the quantizer tables (or only the maps) into shared memory.
__device__ __forceinline__ void LoadQuantTables(const QuantTables* global, QuantTables* shared,
                                                bool maps_only) {
  constexpr int kMapWords = 2 * kMapSize * sizeof(float) / sizeof(uint4);
  constexpr int kWords = sizeof(QuantTables) / sizeof(uint4);
  static_assert(sizeof(QuantTables) % sizeof(uint4) == 0, "copied in 16-byte words");
  const uint4* src = reinterpret_cast<const uint4*>(global);
  uint4* dst = reinterpret_cast<uint4*>(shared);
  int words = maps_only ? kMapWords : kWords;
  for (int i = threadIdx.x; i < words; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
}

// Blocks [begin, end) of the launch handled by this warp: a contiguous range,
// so that a warp (and its neighbours) stays within one leaf for long runs.
// Block indices are 32-bit (launches check BlockIndicesFit): with 64-bit loop
// bounds the update kernel spilled them to local memory, and their reloads
// took 10% of the float32 step's stall samples on an H200.
__device__ __forceinline__ void WarpRange(int64_t num_blocks, int32_t* begin, int32_t* end) {
  int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kLanes;
  int64_t per_warp = (num_blocks + num_warps - 1) / num_warps;
  int64_t first = warp * per_warp < num_blocks ? warp * per_warp : num_blocks;
  *begin = static_cast<int32_t>(first);
  *end = static_cast<int32_t>(first + per_warp < num_blocks ? first + per_warp : num_blocks);
}

// Follows a warp's blocks, taken in ascending order, through the leaves. On
// crossing into a leaf it copies the leaf's descriptor from the kernel
// parameters (constant memory, whose small cache thrashes when warps sit in
// many different leaves) into this warp's shared-memory slot; later reads are
// shared-memory broadcasts. Ascending blocks leave a leaf only past its end,
// so that is the one bound checked per block.
struct LeafCursor {
  LeafDesc* slot;              // this warp's shared-memory copy
  int32_t begin = 0, end = 0;  // the leaf's blocks: [begin, end)
  int32_t full_end = 0;        // [begin, full_end) hold 256 elements each

  __device__ __forceinline__ const LeafDesc& At(const LeafTable& table, int32_t block) {
    if (block >= end) {
      int index = FindLeaf(table, block);
      constexpr int kWords = sizeof(LeafDesc) / sizeof(uint32_t);
      static_assert(kWords <= kLanes, "a leaf descriptor is copied one word per lane");
      int lane = threadIdx.x & (kLanes - 1);
      __syncwarp();
      if (lane < kWords) {
        reinterpret_cast<uint32_t*>(slot)[lane] =
            reinterpret_cast<const uint32_t*>(&table.leaves[index])[lane];
      }
      __syncwarp();
      begin = static_cast<int32_t>(slot->block_begin);
      end = static_cast<int32_t>(begin + (slot->size + kBlockSize - 1) / kBlockSize);
      full_end = static_cast<int32_t>(begin + slot->size / kBlockSize);
    }
    return *slot;
  }
};

template <int kWarps = kWarpsPerCta>
__device__ __forceinline__ LeafDesc* WarpLeafSlot() {
  __shared__ LeafDesc slots[kWarps];
  return &slots[threadIdx.x / kLanes];
}

// The quantizer tables of adam8bit.h, one entry per thread, from the maps
// staged in shared memory; block 0 also decides whether the fast route holds.
__device__ __forceinline__ void BuildQuantTablesBody(const float* qmaps, QuantTables* t) {
  static_assert(kThreads >= kMapSize, "one thread per map entry counts the negative prefix");
  __shared__ float maps[2 * kMapSize];
  __shared__ int fast;
  for (int k = threadIdx.x; k < 2 * kMapSize; k += blockDim.x) maps[k] = qmaps[k];
  __syncthreads();
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float* q1 = maps;
  const float* q2 = maps + kMapSize;
  // NegativePrefix(q1), counted by the block at once.
  int fold = __syncthreads_count(threadIdx.x < kMapSize && SignBit(q1[threadIdx.x])) - 1;
  if (i < kMapSize) {
    t->q1[i] = q1[i];
    t->q2[i] = q2[i];
    t->edge1[i] = EdgeEntry(q1, i, fold);
    t->edge2[i] = EdgeEntry(q2, i, -1);
  }
  if (i < static_cast<int>(sizeof(t->start1))) {
    t->start1[i] = i < kSignedBuckets ? StartEntry(q1, kSignedShift, i, fold) : 0;
  }
  if (i < static_cast<int>(sizeof(t->start2))) {
    t->start2[i] = i < kUnsignedBuckets ? StartEntry(q2, kUnsignedShift, i, -1) : 0;
  }
  if (blockIdx.x != 0) return;
  if (threadIdx.x == 0) fast = SignFoldHolds(q1, fold + 1) ? 1 : 0;
  __syncthreads();
  if (i + 1 < kMapSize && !(FastRouteHoldsAt(q1, kSignedShift, -1.0f, i) &&
                            FastRouteHoldsAt(q2, kUnsignedShift, 0.0f, i))) {
    fast = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    t->fast = fast;
    t->padding[0] = t->padding[1] = t->padding[2] = 0;
  }
}

// Every kernel below walks its warp's blocks alike (WarpRange, LeafCursor,
// the lane's elements); only the body differs. The loop is written out in each
// rather than shared through a device lambda: the H200's build did not inline
// such a lambda into the update kernel (a call per block, its state on the
// stack: the fused step 16-39% slower; benchmarks/RESULTS.md), although
// this source's build on another machine did.
__device__ __forceinline__ void BlockNormSqBody(const LeafTable& table, double* partials) {
  int lane = threadIdx.x & (kLanes - 1);
  int32_t first, last;
  WarpRange(table.num_blocks, &first, &last);
  LeafCursor cursor{WarpLeafSlot()};
  for (int32_t b = first; b < last; ++b) {
    const LeafDesc& leaf = cursor.At(table, b);
    int64_t start = static_cast<int64_t>(b - cursor.begin) * kBlockSize + lane * kLaneElems;
    int valid = LaneValid(leaf.size, start);
    float g[kLaneElems];
    WithElemType(leaf.type,
                 [&](auto t) { LoadLane<decltype(t)::value>(leaf.grad, start, valid, g); });
    double sum = LaneNormSq(g, valid);
#pragma unroll
    for (int d = kLanes / 2; d >= 1; d >>= 1) sum = AddD(sum, __shfl_xor_sync(kFullMask, sum, d));
    if (lane == 0) partials[b] = sum;
  }
}

__device__ __forceinline__ void RingScaleBody(const LeafTable& table, const double* partials,
                                              float* rings, float* clip_scale, int64_t t,
                                              int32_t percentile) {
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

template <int32_t T>
__device__ __forceinline__ void LaneWholeMax(const LeafDesc& leaf, const QuantTables& qt,
                                             const StepScalars& s, int64_t start, int valid,
                                             float scale, float* max1, float* max2) {
  float g[kLaneElems], m[kLaneElems], v[kLaneElems];
  uint32_t c1[kLaneElems], c2[kLaneElems];
  unsigned finite;
  LoadLane8bit<T>(leaf, start, valid, g, c1, c2, nullptr);
  ClipLane(true, scale, g);
  LaneMoments(qt, s, g, c1, c2, valid, leaf.absmax1_in[0], leaf.absmax2_in[0], false, m, v,
              &finite);
  *max1 = 0.0f, *max2 = 0.0f;
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    *max1 = MaxAbs(*max1, m[k]);
    *max2 = MaxAbs(*max2, v[k]);
  }
}

__device__ __forceinline__ void WholeLeafMaxBody(const LeafTable& table, const StepArgs& args) {
  __shared__ QuantTables quant;  // only the maps are read
  LoadQuantTables(args.quant, &quant, /*maps_only=*/true);
  StepScalars s = ComputeStepScalars(args.hyper, args.t);
  int lane = threadIdx.x & (kLanes - 1);
  int32_t first, last;
  WarpRange(table.num_blocks, &first, &last);
  LeafCursor cursor{WarpLeafSlot()};
  for (int32_t b = first; b < last; ++b) {
    const LeafDesc& leaf = cursor.At(table, b);
    if (!(leaf.flags & kLeafWhole)) continue;
    int64_t start = static_cast<int64_t>(b - cursor.begin) * kBlockSize + lane * kLaneElems;
    int valid = LaneValid(leaf.size, start);
    float scale = args.clip_scale ? args.clip_scale[leaf.index] : 1.0f;
    float max1, max2;
    WithElemType(leaf.type, [&](auto t) {
      LaneWholeMax<decltype(t)::value>(leaf, quant, s, start, valid, scale, &max1, &max2);
    });
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

// SPEC 3.3: a lane of a leaf with float32 moments.
template <int32_t T, bool kWriteParams>
__device__ __forceinline__ void LaneFloat32(const LeafDesc& leaf, const StepScalars& s,
                                            int64_t start, int valid, float scale) {
  bool decay = (leaf.flags & kLeafDecay) != 0;
  float g[kLaneElems], m[kLaneElems], v[kLaneElems], p[kLaneElems], out[kLaneElems];
  LoadLane<T>(leaf.grad, start, valid, g);
  LoadLane<kF32>(leaf.state1_in, start, valid, m);
  LoadLane<kF32>(leaf.state2_in, start, valid, v);
  LoadLane<T>(leaf.param, start, valid, p);
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    float p_new = Float32Step(Mul(g[k], scale), p[k], &m[k], &v[k], s, decay, T);
    out[k] = kWriteParams ? p_new : UpdateFor(p[k], p_new, T);
  }
  StoreLane<kF32>(leaf.state1, start, valid, m);
  StoreLane<kF32>(leaf.state2, start, valid, v);
  StoreLane<T>(leaf.out, start, valid, out);
}

// SPEC 3.2 (3.4 with whole-leaf scales): a lane of an 8-bit leaf's block j.
// kFull: a full lane of a kLeafAligned leaf (`valid` is kLaneElems), whose
// loads and stores take whole words unchecked, and which may prefetch
// (LoadFullLane8bit); otherwise any lane.
template <int32_t T, bool kWriteParams, bool kFull>
__device__ __forceinline__ void Lane8bit(const LeafDesc& leaf, const QuantTables& qt,
                                         const StepScalars& s, const StepArgs& args, int64_t j,
                                         int64_t start, int valid, float scale, int lane,
                                         bool prefetch_next) {
  if constexpr (kFull) valid = kLaneElems;
  bool whole = (leaf.flags & kLeafWhole) != 0;
  bool decay = (leaf.flags & kLeafDecay) != 0;
  float old1 = leaf.absmax1_in[whole ? 0 : j], old2 = leaf.absmax2_in[whole ? 0 : j];
  float g[kLaneElems], p[kLaneElems], m[kLaneElems], v[kLaneElems];
  uint32_t c1[kLaneElems], c2[kLaneElems];  // the old codes, then the new ones
  unsigned finite;
  if constexpr (kFull) {
    LoadFullLane8bit<T>(leaf, start, prefetch_next, g, c1, c2, p);
  } else {
    LoadLane8bit<T>(leaf, start, valid, g, c1, c2, p);
  }
  ClipLane(args.clip_scale != nullptr, scale, g);
  LaneMoments(qt, s, g, c1, c2, valid, old1, old2, !whole, m, v, &finite);
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
  // The results (new params, or updates); a full bfloat16 lane keeps them as
  // the words it stores, as the hardware rounding packs them (RoundedEach).
  constexpr bool kWords = kFull && T == kBF16;
  typename Conditional<kWords, uint32_t, float>::type out[kWords ? kLaneElems / 2 : kLaneElems];
  float root[kLaneElems];
  bool roots_fast = SqrtEach<kLaneElems>(v, root);
  if (finite == (1u << kLaneElems) - 1) {  // the usual lane
    if constexpr (kWriteParams) {
      StepParamsEach<T, kLaneElems>(p, m, root, s, decay, roots_fast, absmax1, out);
    } else {
      float p_new[kLaneElems];
      StepParamsEach<T, kLaneElems>(p, m, root, s, decay, roots_fast, absmax1, p_new);
      UpdatesEach<T, kLaneElems>(p, p_new, out);
    }
  } else {  // a non-finite grad leaves its param unchanged (a NaN made quiet, as on the host)
    float results[kLaneElems];
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      float stepped = StepParamWithRoot(p[k], m[k], root[k], s, decay, T);
      float p_new = (finite >> k) & 1u ? stepped : RoundToType(p[k], T);
      results[k] = kWriteParams ? p_new : UpdateFor(p[k], p_new, T);
    }
    if constexpr (kWords) {
#pragma unroll
      for (int k = 0; k < kLaneElems / 2; ++k)
        out[k] = PackBf16(results[2 * k], results[2 * k + 1]);
    } else {
#pragma unroll
      for (int k = 0; k < kLaneElems; ++k) out[k] = results[k];
    }
  }
  ScaleDivisor d1(absmax1), d2(absmax2);
  // The warp's usual case: both scales positive normal floats, so that no
  // moment of the block is NaN or infinite and |m| <= absmax1, v <= absmax2.
  if (qt.fast && d1.fast && d2.fast) {
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      c1[k] = FastCode1(qt, m[k], d1.DivideForCode(m[k]));
      c2[k] = FastCode2OfUnsigned(qt, d2.DivideForCode(v[k]));  // v >= +0
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLaneElems; ++k) {
      c1[k] = Code1(qt, m[k], d1.Divide(m[k]));
      c2[k] = Code2(qt, d2.Divide(v[k]));
    }
  }
  if constexpr (kWords) {
    StoreLaneWords(leaf.out, start, out);
  } else if constexpr (kFull) {
    StoreLaneWords<T>(leaf.out, start, out);
  } else {
    StoreLane<T>(leaf.out, start, valid, out);
  }
  StoreCodes(static_cast<uint8_t*>(leaf.state1), start, valid, c1);
  StoreCodes(static_cast<uint8_t*>(leaf.state2), start, valid, c2);
  if (!whole && lane == 0) {
    leaf.absmax1[j] = absmax1;
    leaf.absmax2[j] = absmax2;
  }
}

// A step whose hyperparameters it cannot run with (StepScalars::valid): the
// lane's params stay (rounded to their dtype, as on the host), the moments
// are kept (copied to the results where those are not the operands).
template <int32_t T, bool kWriteParams>
__device__ __forceinline__ void SkipLane(const LeafDesc& leaf, int64_t j, int64_t start, int valid,
                                         int lane) {
  float p[kLaneElems], out[kLaneElems];
  LoadLane<T>(leaf.param, start, valid, p);
#pragma unroll
  for (int k = 0; k < kLaneElems; ++k) {
    float kept = RoundToType(p[k], T);
    out[k] = kWriteParams ? kept : UpdateFor(p[k], kept, T);
  }
  StoreLane<T>(leaf.out, start, valid, out);
  if (leaf.state1 == leaf.state1_in) return;
  if (leaf.flags & kLeaf8bit) {
    uint32_t c[kLaneElems];
    LoadCodes(static_cast<const uint8_t*>(leaf.state1_in), start, valid, 0, c);
    StoreCodes(static_cast<uint8_t*>(leaf.state1), start, valid, c);
    LoadCodes(static_cast<const uint8_t*>(leaf.state2_in), start, valid, 0, c);
    StoreCodes(static_cast<uint8_t*>(leaf.state2), start, valid, c);
    bool whole = (leaf.flags & kLeafWhole) != 0;
    if (lane == 0 && (!whole || j == 0)) {
      leaf.absmax1[whole ? 0 : j] = leaf.absmax1_in[whole ? 0 : j];
      leaf.absmax2[whole ? 0 : j] = leaf.absmax2_in[whole ? 0 : j];
    }
  } else {
    float m[kLaneElems];
    LoadLane<kF32>(leaf.state1_in, start, valid, m);
    StoreLane<kF32>(leaf.state1, start, valid, m);
    LoadLane<kF32>(leaf.state2_in, start, valid, m);
    StoreLane<kF32>(leaf.state2, start, valid, m);
  }
}

// A step that SkipLane's every lane of the launch (its own loop, so that the
// update's loop carries no check of it per block). A skipped step is rare:
// the warps take the blocks in turn and look each one's leaf up. Every leaf
// of the launch has dtype T (as in UpdateBody).
template <int32_t T, bool kWriteParams>
__device__ __forceinline__ void SkipBlocks(const LeafTable& table, int lane) {
  int32_t warps = static_cast<int32_t>(gridDim.x * (blockDim.x / kLanes));
  for (int32_t b = static_cast<int32_t>((blockIdx.x * blockDim.x + threadIdx.x) / kLanes);
       b < table.num_blocks; b += warps) {
    const LeafDesc& leaf = table.leaves[FindLeaf(table, b)];
    int64_t j = b - leaf.block_begin;
    int64_t start = j * kBlockSize + lane * kLaneElems;
    SkipLane<T, kWriteParams>(leaf, j, start, LaneValid(leaf.size, start), lane);
  }
}

// The update of a launch whose leaves all have dtype T (the host groups the
// leaves by dtype: one kernel per dtype compiles in a tenth of the time of a
// kernel that switches between three); kWriteParams: the fused step (new
// params) rather than the optax path (updates).
template <int32_t T, bool kWriteParams>
__device__ __forceinline__ void UpdateBody(const LeafTable& table, const StepArgs& args) {
  __shared__ QuantTables quant;
  LoadQuantTables(args.quant, &quant, /*maps_only=*/false);
  StepScalars s = ComputeStepScalars(args.hyper, args.t);
  if (args.write_count && blockIdx.x == 0 && threadIdx.x == 0) {
    *args.count_out = args.count_value;
    if (args.handle_out != nullptr) *args.handle_out = args.handle_value;
  }
  int lane = threadIdx.x & (kLanes - 1);
  if (!s.valid) {
    SkipBlocks<T, kWriteParams>(table, lane);
    return;
  }
  int32_t first, last;
  WarpRange(table.num_blocks, &first, &last);
  LeafCursor cursor{WarpLeafSlot<kUpdateWarps>()};
  for (int32_t b = first; b < last; ++b) {
    const LeafDesc& leaf = cursor.At(table, b);
    int64_t j = b - cursor.begin;
    int64_t start = j * kBlockSize + lane * kLaneElems;
    float scale = args.clip_scale ? args.clip_scale[leaf.index] : 1.0f;
    if (leaf.flags & kLeaf8bit) {
      // The usual block: full, of an aligned leaf. Such a block's lanes check
      // nothing per element or address (a third of the bfloat16 step's
      // instructions went to per-block work on an H200, RESULTS.md).
      if (b < cursor.full_end && (leaf.flags & kLeafAligned)) {
        bool prefetch_next = b + 1 < last && b + 1 < cursor.full_end;
        Lane8bit<T, kWriteParams, true>(leaf, quant, s, args, j, start, kLaneElems, scale, lane,
                                        prefetch_next);
      } else {
        Lane8bit<T, kWriteParams, false>(leaf, quant, s, args, j, start,
                                         LaneValid(leaf.size, start), scale, lane, false);
      }
    } else {
      LaneFloat32<T, kWriteParams>(leaf, s, start, LaneValid(leaf.size, start), scale);
    }
  }
}

// After the update: the whole-leaf scales replace the old ones (unless the
// step was skipped).
__device__ __forceinline__ void StoreWholeScalesBody(const LeafTable& table, const StepArgs& args) {
  const float* whole_absmax = args.whole_absmax;
  if (!ComputeStepScalars(args.hyper, args.t).valid) return;
  for (int i = threadIdx.x; i < table.num_leaves; i += blockDim.x) {
    const LeafDesc& leaf = table.leaves[i];
    if (leaf.flags & kLeafWhole) {
      leaf.absmax1[0] = whole_absmax[2 * leaf.index];
      leaf.absmax2[0] = whole_absmax[2 * leaf.index + 1];
    }
  }
}

__device__ __forceinline__ void StoreWordsBody(const WordStores& stores) {
  for (int i = 0; i < stores.count; ++i) *stores.dst[i] = stores.value[i];
}

// Copies every range of the table, all CTAs on each range in turn, in
// 16-byte words where both sides allow (the same offset from 16 bytes), else
// 4-byte words or bytes; each thread issues 4 loads before its stores, so
// that enough reads are in flight to fill the bus.
template <typename Word>
__device__ __forceinline__ void CopyWords(Word* to, const Word* from, int64_t words, int64_t me,
                                          int64_t threads) {
  int64_t i = me;
  for (; i + 3 * threads < words; i += 4 * threads) {
    Word a = from[i], b = from[i + threads], c = from[i + 2 * threads], d = from[i + 3 * threads];
    to[i] = a;
    to[i + threads] = b;
    to[i + 2 * threads] = c;
    to[i + 3 * threads] = d;
  }
  for (; i < words; i += threads) to[i] = from[i];
}

__device__ __forceinline__ void CopyRangesBody(const CopyTable& table) {
  int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t me = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int r = 0; r < table.count; ++r) {
    char* to = table.ranges[r].to;
    const char* from = table.ranges[r].from;
    int64_t n = static_cast<int64_t>(table.ranges[r].bytes);
    uintptr_t offset = reinterpret_cast<uintptr_t>(to) & 15;
    if (offset == (reinterpret_cast<uintptr_t>(from) & 15)) {
      int64_t head = min(n, static_cast<int64_t>((16 - offset) & 15));
      if (me < head) to[me] = from[me];
      int64_t words = (n - head) / 16;
      CopyWords(reinterpret_cast<uint4*>(to + head), reinterpret_cast<const uint4*>(from + head),
                words, me, threads);
      for (int64_t i = head + words * 16 + me; i < n; i += threads) to[i] = from[i];
    } else if (((reinterpret_cast<uintptr_t>(to) | reinterpret_cast<uintptr_t>(from) | n) & 3) ==
               0) {
      CopyWords(reinterpret_cast<uint32_t*>(to), reinterpret_cast<const uint32_t*>(from), n / 4, me,
                threads);
    } else {
      CopyWords(to, from, n, me, threads);
    }
  }
}

__device__ __forceinline__ void LoadLatencyBody(const uint8_t* data, int64_t bytes,
                                                uint32_t* cycles) {
  __shared__ uint32_t sink;
  int64_t chunk = blockIdx.x;
  int64_t begin = chunk * static_cast<int64_t>(kProbeChunk);
  if (threadIdx.x != 0 || begin >= bytes) return;
  // The first load warms the TLB: device memory is mapped in 2 MiB pages, so
  // a cold first touch pays a page walk whatever the residency. The timed
  // one reads 1 MiB further on, in another 64 KiB page, so that a fault the
  // first one took (a paged-out chunk, which it migrates back) does not make
  // the second one local. Both are ld.cv: a line of host memory cached in L2
  // is fetched again over the bus (a step that just wrote host-placed state
  // leaves its lines in L2).
  int64_t offset = min(static_cast<int64_t>(kProbeOffset), bytes - begin - 4) & ~int64_t{3};
  const uint32_t* warm = reinterpret_cast<const uint32_t*>(data + begin);
  const uint32_t* timed = reinterpret_cast<const uint32_t*>(data + begin + max(offset, int64_t{0}));
  uint32_t shared = static_cast<uint32_t>(__cvta_generic_to_shared(&sink));
  uint32_t value;
  long long start, stop;
  // In order: the warm load and a store of its value (which waits for it),
  // the clock, the timed load and a store of its value, the clock (volatile
  // asm with memory clobbers keeps the order; the stores make each wait).
  asm volatile("ld.global.cv.u32 %0, [%1];" : "=r"(value) : "l"(warm) : "memory");
  asm volatile("st.volatile.shared.u32 [%0], %1;" ::"r"(shared), "r"(value) : "memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(start)::"memory");
  asm volatile("ld.global.cv.u32 %0, [%1];" : "=r"(value) : "l"(timed) : "memory");
  asm volatile("st.volatile.shared.u32 [%0], %1;" ::"r"(shared), "r"(value) : "memory");
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(stop)::"memory");
  cycles[chunk] = static_cast<uint32_t>(min(stop - start, 0xffffffffLL));
}

}  // namespace

// The entry points (kernel names in cuda_api.cc's kKernelNames), each a
// __global__ over its body above. Leaf tables travel as __grid_constant__
// parameters: read in place, never copied per thread. NVRTC compiles them as
// seven programs (cuda_api.cc), OP8_PROGRAM choosing each one's entry points:
// 0 the small kernels, 1-6 one update kernel each (the bulk of the compile),
// each compiled when a step first needs it; a compile without OP8_PROGRAM
// (for tools) has them all.
extern "C" {

#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 0

__global__ void __launch_bounds__(kThreads)
    op8_build_quant_tables(const float* qmaps, QuantTables* t) {
  BuildQuantTablesBody(qmaps, t);
}

__global__ void __launch_bounds__(kThreads)
    op8_block_norm_sq(const __grid_constant__ LeafTable table, double* partials) {
  BlockNormSqBody(table, partials);
}

__global__ void __launch_bounds__(kNormThreads)
    op8_ring_scale(const __grid_constant__ LeafTable table, const double* partials, float* rings,
                   float* clip_scale, int64_t t, int32_t percentile) {
  RingScaleBody(table, partials, rings, clip_scale, t, percentile);
}

__global__ void __launch_bounds__(kThreads)
    op8_whole_leaf_max(const __grid_constant__ LeafTable table, const StepArgs args) {
  WholeLeafMaxBody(table, args);
}

#endif

// The update of the fused step (new params) and of the optax path (updates),
// one kernel per dtype of the params, each a program of its own: 1-3 the fused
// step's for float32, bfloat16 and float16, 4-6 the optax path's
// (cuda_api.cc's ProgramOf).
#define OP8_UPDATE_KERNEL(name, type, write_params)                        \
  __global__ void __launch_bounds__(kUpdateThreads, 1)                     \
      name(const __grid_constant__ LeafTable table, const StepArgs args) { \
    UpdateBody<type, write_params>(table, args);                           \
  }
#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 1
OP8_UPDATE_KERNEL(op8_update_params_f32, kF32, true)
#endif
#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 2
OP8_UPDATE_KERNEL(op8_update_params_bf16, kBF16, true)
#endif
#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 3
OP8_UPDATE_KERNEL(op8_update_params_f16, kF16, true)
#endif
#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 4
OP8_UPDATE_KERNEL(op8_update_updates_f32, kF32, false)
#endif
#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 5
OP8_UPDATE_KERNEL(op8_update_updates_bf16, kBF16, false)
#endif
#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 6
OP8_UPDATE_KERNEL(op8_update_updates_f16, kF16, false)
#endif
#undef OP8_UPDATE_KERNEL

#if !defined(OP8_PROGRAM) || OP8_PROGRAM == 0

__global__ void op8_store_whole_scales(const __grid_constant__ LeafTable table,
                                       const StepArgs args) {
  StoreWholeScalesBody(table, args);
}

__global__ void op8_store_words(const WordStores stores) { StoreWordsBody(stores); }

__global__ void __launch_bounds__(kThreads)
    op8_copy_ranges(const __grid_constant__ CopyTable table) {
  CopyRangesBody(table);
}

__global__ void op8_load_latency(const uint8_t* data, int64_t bytes, uint32_t* cycles) {
  LoadLatencyBody(data, bytes, cycles);
}
#endif

}  // extern "C"

}  // namespace optax_paged8bit
