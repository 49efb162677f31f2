// What the CUDA kernels (cuda_kernels.cu, compiled at run time by NVRTC) and
// their launchers on the host (cuda_api.cc) share: the kernel parameters and
// constants. One warp per 256-element block, 8 elements per lane, every leaf
// of the tree in one launch (the leaf table travels as a kernel parameter).
// The host compiler and NVRTC lay these structs out alike: plain fields of
// fixed-size types.
#ifndef OPTAX_PAGED8BIT_CUDA_KERNELS_H_
#define OPTAX_PAGED8BIT_CUDA_KERNELS_H_

#include "adam8bit.h"

namespace optax_paged8bit {

// Extra flags of a launch's leaf: an 8-bit leaf with one scale for the whole
// leaf (block_wise=False); a leaf whose every full lane can move in whole
// words (AlignmentFlag).
constexpr int32_t kLeafWhole = 4;
constexpr int32_t kLeafAligned = 8;

struct LeafDesc {
  const void* grad;
  const void* param;
  void* out;     // updates, or the new params (may alias param)
  void* state1;  // written: uint8 codes or float32 moment
  void* state2;
  float* absmax1;  // written: block scales (8-bit leaves)
  float* absmax2;
  const void* state1_in;  // read: the previous step's (the same memory for a registry
  const void* state2_in;  // slot; adamw8bit's operands, maybe not aliased to its results)
  const float* absmax1_in;
  const float* absmax2_in;
  int64_t size;         // elements
  int64_t block_begin;  // index of the leaf's first block among the launch's blocks
  int32_t type;         // ElemType
  int32_t flags;        // LeafFlag bits | kLeafWhole | kLeafAligned
  int32_t index;        // leaf index in the call (clip scales, whole-leaf scales)
};

// Leaves per launch: the table must fit the 32 KiB kernel-parameter limit.
constexpr int kMaxLeavesPerLaunch = 256;

struct LeafTable {
  LeafDesc leaves[kMaxLeavesPerLaunch];
  int32_t num_leaves;
  int64_t num_blocks;  // blocks of all leaves together
};
static_assert(sizeof(LeafTable) <= 32764, "a launch's leaf table is a kernel parameter");

// Per-call scalars and scratch (device pointers).
struct StepArgs {
  const float* hyper;        // float32[5]
  const QuantTables* quant;  // the maps and their tables (LaunchBuildQuantTables)
  const float* clip_scale;   // float32[num leaves in the call] or null (no clipping)
  float* whole_absmax;       // float32[2 * leaves]: new scales of whole-leaf leaves
  int32_t* count_out;        // written with count_value by the launch that has write_count
  int32_t count_value;       // t, or t - 1 for a stage of a chunked step (ffi_common.h)
  uint32_t* handle_out;      // written with handle_value by that launch (null: no handle)
  uint32_t handle_value;
  int64_t t;  // 1-based step
  bool write_params;
  bool write_count;
};

// The residency probe's unit: one timed load per 2 MiB (the unified-memory
// driver's migration and eviction unit), kProbeOffset bytes into it.
constexpr size_t kProbeChunk = size_t{2} << 20;
constexpr size_t kProbeOffset = (size_t{1} << 20) + 128;

// cycles[i]: the clock cycles of one uncached load in chunk i (of
// kProbeChunk bytes) of data[0, bytes), after an untimed load of the chunk's
// first word; each chunk by its own warp's lane 0 (a warp's load waits for its
// slowest lane, so chunks never share one). A device-resident chunk answers
// from HBM or L2, a host-resident one over the bus or through a page fault,
// several times slower. Touching a chunk that is not mapped for the GPU
// faults in the pages it touches (and may migrate them back).

// Up to 4 words written on the stream (a call's scalar results that the host
// decided: a new handle, a count), carried in the kernel's parameters.
struct WordStores {
  uint32_t* dst[4];
  uint32_t value[4];
  int count;
};

// One copy of a streamed chunk's moments between the state's memory (host
// RAM, or a stage's XLA buffer) and the device window (cuda_ops.cc). A
// pinned state's copies go to the copy engines (cuMemcpyAsync); the host
// part of a managed state is copied by a kernel: SMs read and write managed
// memory mapped for the GPU at the bus's speed while the copy engines move
// it several times slower (benchmarks/bus_copies.py).
struct CopyRange {
  char* to;
  const char* from;
  uint64_t bytes;
};

// Ranges per copy launch (a chunk has at most 4 per launch-table leaf), and
// the most CTAs that move them (a quarter of the SMs at most): enough loads
// in flight to fill the bus in one direction, few enough SMs to leave the
// rest to the update.
constexpr int kMaxCopyRanges = 1024;
constexpr int kCopyCtas = 32;

struct CopyTable {
  CopyRange ranges[kMaxCopyRanges];
  int32_t count;
};
static_assert(sizeof(CopyTable) <= 32764, "a copy launch's table is a kernel parameter");

// Threads per CTA of the kernels (the update's: one CTA of 1024 per SM).
constexpr int kThreads = 256;
constexpr int kUpdateThreads = 1024;

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_CUDA_KERNELS_H_
