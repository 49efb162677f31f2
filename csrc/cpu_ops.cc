// CPU handlers of the update, export and import custom calls: plain loops over
// the math of adam8bit.h, state in host memory from the registry.
#include "cpu_ops.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "adam8bit.h"
#include "ffi_common.h"
#include "registry.h"

namespace optax_paged8bit {
namespace {

class HostAllocator : public Allocator {
 public:
  Memory Allocate(size_t bytes, std::string* error) override {
    Memory m;
    m.bytes = bytes;
    m.on_host = true;
    m.free_fn = [](void* p, int) { std::free(p); };
    m.data = std::calloc(bytes, 1);
    if (m.data == nullptr) *error = "out of host memory (" + std::to_string(bytes) + " bytes)";
    return m;
  }
};

// The maps and their quantizer tables (adam8bit.h), as the CUDA kernel has
// them. Built once per distinct pair of maps (in practice once).
class Maps {
 public:
  static std::shared_ptr<const Maps> For(const float* qmaps) {
    static std::mutex mu;
    static std::shared_ptr<const Maps> last;
    std::lock_guard<std::mutex> lock(mu);
    if (!last || std::memcmp(last->tables_.q1, qmaps, 2 * kMapSize * sizeof(float)) != 0) {
      auto maps = std::make_shared<Maps>();
      BuildQuantTables(qmaps, &maps->tables_);
      last = std::move(maps);
    }
    return last;
  }
  const float* q1() const { return tables_.q1; }
  const float* q2() const { return tables_.q2; }
  uint8_t Code1(float m, float absmax) const {
    return optax_paged8bit::Code1(tables_, m, ScaleDivisor(absmax).Divide(m));
  }
  uint8_t Code2(float v, float absmax) const {
    return optax_paged8bit::Code2(tables_, ScaleDivisor(absmax).Divide(v));
  }

 private:
  QuantTables tables_;
};

// The squared norm of each 256-element block of a leaf's grad.
void LeafBlockNorms(const LeafCall& leaf, double* out) {
  int64_t num_blocks = (leaf.size + kBlockSize - 1) / kBlockSize;
  for (int64_t j = 0; j < num_blocks; ++j) out[j] = BlockNormSq(leaf.grad, leaf.type, j, leaf.size);
}

// Percentile clipping: leaf i's gnorm_scale for this step (1 when off), from
// its block norms: the given ones (sharded params), or its grad's.
float ClipScale(const LeafCall& leaf, size_t i, const GivenNorms& given, float* ring, int64_t t,
                int32_t percentile) {
  if (percentile >= 100) return 1.0f;
  std::vector<double> partials;
  const double* norms;
  int64_t num_blocks;
  if (given.data != nullptr) {
    norms = given.data + given.offsets[i];
    num_blocks = given.blocks[i];
  } else {
    num_blocks = (leaf.size + kBlockSize - 1) / kBlockSize;
    partials.resize(num_blocks);
    LeafBlockNorms(leaf, partials.data());
    norms = partials.data();
  }
  double scratch[kNormThreads];
  float norm_sq = ToFloat(LeafNormSq(norms, num_blocks, scratch));
  return UpdateRingAndScale(ring, norm_sq, t, percentile);
}

// Writes the new param (fused) or the update that optax.apply_updates turns
// into it.
inline void WriteOut(const LeafCall& leaf, int64_t i, float p, float p_new, bool write_params) {
  StoreFromFloat(leaf.out, leaf.type, i, write_params ? p_new : UpdateFor(p, p_new, leaf.type));
}

// SPEC 3.2: one scale per 256-element block, a partial last block padded.
void UpdateBlockwise(const LeafCall& leaf, const StepState& state, const Maps& maps,
                     const StepScalars& s, float scale, bool write_params) {
  const auto* codes1 = static_cast<const uint8_t*>(state.in.state1);
  const auto* codes2 = static_cast<const uint8_t*>(state.in.state2);
  auto* new_codes1 = static_cast<uint8_t*>(state.out.state1);
  auto* new_codes2 = static_cast<uint8_t*>(state.out.state2);
  bool decay = (leaf.flags & kLeafDecay) != 0;
  int64_t num_blocks = (leaf.size + kBlockSize - 1) / kBlockSize;
  float m[kBlockSize], v[kBlockSize];
  bool finite[kBlockSize];
  for (int64_t j = 0; j < num_blocks; ++j) {
    int64_t begin = j * kBlockSize;
    int count = static_cast<int>(std::min<int64_t>(kBlockSize, leaf.size - begin));
    float old1 = state.in.absmax1[j], old2 = state.in.absmax2[j];
    float absmax1 = 0.0f, absmax2 = 0.0f;
    for (int e = 0; e < kBlockSize; ++e) {
      float gf = 0.0f;
      uint8_t c1 = kPadCode1, c2 = 0;
      if (e < count) {
        gf = Mul(LoadAsFloat(leaf.grad, leaf.type, begin + e), scale);
        c1 = codes1[begin + e];
        c2 = codes2[begin + e];
      }
      finite[e] = BlockwiseMoments(gf, maps.q1()[c1], old1, maps.q2()[c2], old2, s, &m[e], &v[e]);
      absmax1 = MaxAbs(absmax1, m[e]);
      absmax2 = MaxAbs(absmax2, v[e]);
    }
    for (int e = 0; e < count; ++e) {
      int64_t i = begin + e;
      float p = LoadAsFloat(leaf.param, leaf.type, i);
      float p_new = finite[e] ? StepParam(p, m[e], v[e], s, decay, leaf.type) : p;
      WriteOut(leaf, i, p, p_new, write_params);
      new_codes1[i] = maps.Code1(m[e], absmax1);
      new_codes2[i] = maps.Code2(v[e], absmax2);
    }
    state.out.absmax1[j] = absmax1;
    state.out.absmax2[j] = absmax2;
  }
}

// SPEC 3.4: one scale for the whole leaf; a first pass finds it.
void UpdateWholeLeaf(const LeafCall& leaf, const StepState& state, const Maps& maps,
                     const StepScalars& s, float scale, bool write_params) {
  const auto* codes1 = static_cast<const uint8_t*>(state.in.state1);
  const auto* codes2 = static_cast<const uint8_t*>(state.in.state2);
  auto* new_codes1 = static_cast<uint8_t*>(state.out.state1);
  auto* new_codes2 = static_cast<uint8_t*>(state.out.state2);
  bool decay = (leaf.flags & kLeafDecay) != 0;
  float old1 = state.in.absmax1[0], old2 = state.in.absmax2[0];
  // Whether the element steps (BlockwiseMoments), and its moments.
  auto moments = [&](int64_t i, float* m, float* v) {
    float gf = Mul(LoadAsFloat(leaf.grad, leaf.type, i), scale);
    return BlockwiseMoments(gf, maps.q1()[codes1[i]], old1, maps.q2()[codes2[i]], old2, s, m, v);
  };
  float absmax1 = 0.0f, absmax2 = 0.0f;
  for (int64_t i = 0; i < leaf.size; ++i) {
    float m, v;
    moments(i, &m, &v);
    absmax1 = MaxAbs(absmax1, m);
    absmax2 = MaxAbs(absmax2, v);
  }
  for (int64_t i = 0; i < leaf.size; ++i) {
    float m, v;
    bool steps = moments(i, &m, &v);
    float p = LoadAsFloat(leaf.param, leaf.type, i);
    float p_new = steps ? StepParam(p, m, v, s, decay, leaf.type) : p;
    WriteOut(leaf, i, p, p_new, write_params);
    new_codes1[i] = maps.Code1(m, absmax1);
    new_codes2[i] = maps.Code2(v, absmax2);
  }
  state.out.absmax1[0] = absmax1;
  state.out.absmax2[0] = absmax2;
}

// SPEC 3.3: float32 moments (small leaves, or optim_bits=32 through args).
void UpdateFloat32(const LeafCall& leaf, const StepState& state, const StepScalars& s, float scale,
                   bool write_params) {
  const auto* m1 = static_cast<const float*>(state.in.state1);
  const auto* m2 = static_cast<const float*>(state.in.state2);
  auto* new_m1 = static_cast<float*>(state.out.state1);
  auto* new_m2 = static_cast<float*>(state.out.state2);
  bool decay = (leaf.flags & kLeafDecay) != 0;
  for (int64_t i = 0; i < leaf.size; ++i) {
    float g = Mul(LoadAsFloat(leaf.grad, leaf.type, i), scale);
    float p = LoadAsFloat(leaf.param, leaf.type, i);
    float m = m1[i], v = m2[i];
    WriteOut(leaf, i, p, Float32Step(g, p, &m, &v, s, decay, leaf.type), write_params);
    new_m1[i] = m;
    new_m2[i] = v;
  }
}

// A step with hyperparameters it cannot run with (StepScalars::valid): the
// params stay (rounded to their dtype, as a skipped element of the step is),
// the moments are kept (copied to the results where those are not the operands).
void SkipLeaf(const LeafCall& leaf, const LeafSpec& spec, const StepState& state,
              bool write_params) {
  for (int64_t i = 0; i < leaf.size; ++i) {
    float p = LoadAsFloat(leaf.param, leaf.type, i);
    WriteOut(leaf, i, p, RoundToType(p, leaf.type), write_params);
  }
  auto keep = [](void* out, const void* in, size_t bytes) {
    if (bytes > 0 && out != in) std::memcpy(out, in, bytes);
  };
  keep(state.out.state1, state.in.state1, spec.state_bytes());
  keep(state.out.state2, state.in.state2, spec.state_bytes());
  keep(state.out.absmax1, state.in.absmax1, spec.scale_bytes());
  keep(state.out.absmax2, state.in.absmax2, spec.scale_bytes());
}

// XLA runs CPU computations with subnormals flushed to zero (MXCSR FTZ and
// DAZ on x86, FPCR.FZ on Arm). The algorithm, like the CUDA kernels, keeps
// IEEE subnormals, so the update turns flushing off for its duration.
class IeeeSubnormals {
 public:
  IeeeSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~(kFlushToZero | kDenormalsAreZero));
#elif defined(__aarch64__)
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    asm volatile("msr fpcr, %0" : : "r"(saved_ & ~kFpcrFlushToZero));
#endif
  }
  ~IeeeSubnormals() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  IeeeSubnormals(const IeeeSubnormals&) = delete;
  IeeeSubnormals& operator=(const IeeeSubnormals&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr unsigned kFlushToZero = 1u << 15;
  static constexpr unsigned kDenormalsAreZero = 1u << 6;
  unsigned saved_;
#elif defined(__aarch64__)
  static constexpr uint64_t kFpcrFlushToZero = uint64_t{1} << 24;
  uint64_t saved_;
#endif
};

// One step over every leaf, on the states given (a registry slot's, or the
// arrays of an arrays-state call).
void RunStep(const std::vector<LeafCall>& leaves, const std::vector<LeafSpec>& layout,
             const std::vector<StepState>& states, const float* hyper, const float* qmaps,
             const ffi::Buffer<ffi::F32>& rings, float* rings_out, const GivenNorms& norms,
             int64_t t, int32_t percentile, bool block_wise, bool write_params) {
  if (rings_out != rings.typed_data()) {
    std::memcpy(rings_out, rings.typed_data(), rings.element_count() * sizeof(float));
  }
  IeeeSubnormals ieee;
  StepScalars s = ComputeStepScalars(hyper, t);
  std::shared_ptr<const Maps> maps = Maps::For(qmaps);
  for (size_t i = 0; i < leaves.size(); ++i) {
    const LeafCall& leaf = leaves[i];
    float scale = ClipScale(leaf, i, norms, rings_out + i * kRingSize, t, percentile);
    const StepState& state = states[i];
    if (!s.valid) {
      SkipLeaf(leaf, layout[i], state, write_params);
    } else if (!layout[i].is_8bit) {
      UpdateFloat32(leaf, state, s, scale, write_params);
    } else if (block_wise) {
      UpdateBlockwise(leaf, state, *maps, s, scale, write_params);
    } else {
      UpdateWholeLeaf(leaf, state, *maps, s, scale, write_params);
    }
  }
}

// The count and structure operands of a CPU call are on the host: checks
// them (a CUDA handler copies them first, ReadHostScalars).
ffi::Error CheckHostScalars(const char* op, const ffi::Buffer<ffi::S32>& count,
                            const ffi::Buffer<ffi::S32>& structure, const StructureAttrs& attrs,
                            int64_t* step) {
  *step = count.typed_data()[0];
  return CheckUpdateScalars(op, structure.typed_data(), structure.element_count(), attrs, *step);
}

// The update handlers' signatures repeat their binding (ffi_common.h's
// BindUpdate and BindUpdateArrays) on each backend, as XLA FFI decodes a call
// into the handler's parameters; what they do with them is shared
// (DecodePagedUpdate or DecodeUpdate, CheckUpdateScalars, the registry, the step's math).
ffi::Error UpdateCpu(int32_t device, HandleBuffer handle, HandleResult handle_out,
                     ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::S32> structure,
                     ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> qmaps,
                     ffi::Buffer<ffi::F32> rings, ffi::Buffer<ffi::U32> norms,
                     ffi::RemainingArgs leaf_args, ffi::Result<ffi::Buffer<ffi::S32>> count_out,
                     ffi::Result<ffi::Buffer<ffi::F32>> rings_out, ffi::RemainingRets leaf_rets,
                     ffi::Span<const int32_t> leaf_flags, bool block_wise, int32_t percentile,
                     bool write_params, int32_t optim_bits, int64_t min_8bit_size,
                     ffi::Span<const int64_t> norm_blocks, int64_t layout_key, int64_t first_leaf,
                     ffi::Span<const int64_t> chunk_starts, ffi::Span<const int32_t> layout_flags,
                     ffi::Span<const int64_t> layout_sizes) {
  CallScope call_scope;  // before the handle is read (registry.h)
  const char* op = kUpdateTarget;
  if (auto e = CheckScalarOperands(op, handle, count); e.failure()) return e;
  DecodedPagedUpdate u;
  if (auto e = DecodePagedUpdate(op, count, structure, hyper, qmaps, rings, norms, norm_blocks,
                                 leaf_args, leaf_rets, leaf_flags, block_wise, percentile,
                                 first_leaf, chunk_starts, layout_flags, layout_sizes, &u);
      e.failure()) {
    return e;
  }
  int64_t step = 0;
  if (auto e = CheckHostScalars(op, count, structure,
                                {optim_bits, min_8bit_size, percentile, block_wise}, &step);
      e.failure()) {
    return e;
  }
  uint32_t handle_bits = handle.typed_data()[0];
  if (auto e = CheckChunkHandle(op, u.chunk, handle_bits); e.failure()) return e;
  HostAllocator allocator;
  std::shared_ptr<Slot> slot;
  int32_t handle_value = 0;
  std::string error = Registry::Global().AcquireForUpdate(
      MakeRequest(handle_bits, layout_key, Platform::kCpu, device, u.state_layout()), step,
      allocator, &slot, &handle_value);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::lock_guard<std::mutex> lock(slot->mu);
  if (slot->step != step) {  // another call advanced it since the lookup
    return ffi::Error::InvalidArgument("stale optimizer state: concurrent updates of handle " +
                                       std::to_string(handle_value));
  }
  RunStep(u.call.leaves, u.call.layout, CallStates(*slot, u), hyper.typed_data(),
          qmaps.typed_data(), rings, rings_out->typed_data(), u.call.norms, step + 1, percentile,
          block_wise, write_params);
  if (u.chunk.commit()) {
    for (const ArenaCopy& c : StagedCopies(*slot, u)) std::memcpy(c.to, c.from, c.bytes);
    slot->step = step + 1;
  }
  count_out->typed_data()[0] = u.chunk.CountAfter(step);
  handle_out->typed_data()[0] = static_cast<uint32_t>(handle_value);
  return ffi::Error::Success();
}

// adamw8bit: the same step with the state as operands, updated in place in
// the aliased results (copied first when XLA did not alias them).
ffi::Error UpdateArraysCpu(ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::S32> structure,
                           ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> qmaps,
                           ffi::Buffer<ffi::F32> rings, ffi::Buffer<ffi::U32> norms,
                           ffi::RemainingArgs args, ffi::Result<ffi::Buffer<ffi::S32>> count_out,
                           ffi::Result<ffi::Buffer<ffi::F32>> rings_out, ffi::RemainingRets rets,
                           ffi::Span<const int32_t> leaf_flags, bool block_wise, int32_t percentile,
                           bool write_params, int32_t optim_bits, int64_t min_8bit_size,
                           ffi::Span<const int64_t> norm_blocks) {
  const char* op = kUpdateArraysTarget;
  DecodedUpdate call;
  if (auto e = DecodeUpdate(op, count, structure, hyper, qmaps, rings, norms, norm_blocks, args,
                            rets, leaf_flags, block_wise, percentile, true, &call);
      e.failure()) {
    return e;
  }
  int64_t step = 0;
  if (auto e = CheckHostScalars(op, count, structure,
                                {optim_bits, min_8bit_size, percentile, block_wise}, &step);
      e.failure()) {
    return e;
  }
  RunStep(call.leaves, call.layout, ArrayStates(call), hyper.typed_data(), qmaps.typed_data(),
          rings, rings_out->typed_data(), call.norms, step + 1, percentile, block_wise,
          write_params);
  count_out->typed_data()[0] = static_cast<int32_t>(step + 1);
  return ffi::Error::Success();
}

ffi::Error BlockNormsCpu(ffi::RemainingArgs args, ffi::Result<ffi::Buffer<ffi::U32>> norms) {
  const char* op = kBlockNormsTarget;
  std::vector<LeafCall> leaves;
  std::vector<LeafSpec> layout;
  if (auto e = DecodeBlockNormsCall(op, args, norms->element_count(), &leaves, &layout);
      e.failure()) {
    return e;
  }
  double* out = reinterpret_cast<double*>(norms->typed_data());
  for (const LeafCall& leaf : leaves) {
    LeafBlockNorms(leaf, out);
    out += (leaf.size + kBlockSize - 1) / kBlockSize;
  }
  return ffi::Error::Success();
}

ffi::Error ExportCpu(int32_t device, HandleBuffer handle, ffi::Buffer<ffi::S32> count,
                     ffi::Result<ffi::Buffer<ffi::S32>> step_out,
                     ffi::Result<ffi::Buffer<ffi::U8>> codes,
                     ffi::Result<ffi::Buffer<ffi::F32>> floats, ffi::Span<const int32_t> leaf_flags,
                     bool block_wise, int64_t layout_key, ffi::Span<const int64_t> leaf_sizes) {
  CallScope call_scope;  // before the handle is read (registry.h)
  if (auto e = CheckScalarOperands(kExportTarget, handle, count); e.failure()) return e;
  std::vector<LeafArrays> leaves;
  std::vector<LeafSpec> layout;
  if (auto e = DecodeFlatState(kExportTarget, leaf_flags, leaf_sizes, block_wise,
                               codes->typed_data(), codes->element_count(), floats->typed_data(),
                               floats->element_count(), &leaves, &layout);
      e.failure()) {
    return e;
  }
  std::shared_ptr<Slot> slot;
  int64_t step = 0;
  std::string error = Registry::Global().AcquireForRead(
      MakeRequest(handle.typed_data()[0], layout_key, Platform::kCpu, device, layout),
      count.typed_data()[0], &slot, &step);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::unique_lock<std::mutex> lock;
  if (slot) lock = std::unique_lock<std::mutex>(slot->mu);
  for (size_t i = 0; i < leaves.size(); ++i) {
    const LeafArrays& leaf = leaves[i];
    const LeafSpec& spec = layout[i];
    auto copy = [&](void* dst, const void* src, size_t bytes) {
      if (bytes == 0) return;
      if (src == nullptr) {
        std::memset(dst, 0, bytes);
      } else {
        std::memcpy(dst, src, bytes);
      }
    };
    const LeafState* state = slot ? &slot->leaves[i] : nullptr;
    copy(leaf.state1, state ? state->state1 : nullptr, spec.state_bytes());
    copy(leaf.state2, state ? state->state2 : nullptr, spec.state_bytes());
    copy(leaf.absmax1, state ? state->absmax1 : nullptr, spec.scale_bytes());
    copy(leaf.absmax2, state ? state->absmax2 : nullptr, spec.scale_bytes());
  }
  step_out->typed_data()[0] = static_cast<int32_t>(slot ? slot->step : step);
  return ffi::Error::Success();
}

ffi::Error ImportCpu(int32_t device, ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::U8> codes,
                     ffi::Buffer<ffi::F32> floats, HandleResult handle_out,
                     ffi::Result<ffi::Buffer<ffi::S32>> count_out,
                     ffi::Span<const int32_t> leaf_flags, bool block_wise, int64_t layout_key,
                     ffi::Span<const int64_t> leaf_sizes) {
  CallScope call_scope;  // before the handle is read (registry.h)
  const char* op = kImportTarget;
  if (count.element_count() != 1) return InvalidArgument(op, "count must be an int32 scalar");
  int64_t step = count.typed_data()[0];
  if (auto e = CheckImportCount(op, step); e.failure()) return e;
  std::vector<LeafArrays> leaves;
  std::vector<LeafSpec> layout;
  if (auto e = DecodeFlatState(op, leaf_flags, leaf_sizes, block_wise, codes.typed_data(),
                               codes.element_count(), floats.typed_data(), floats.element_count(),
                               &leaves, &layout);
      e.failure()) {
    return e;
  }
  HostAllocator allocator;
  std::shared_ptr<Slot> slot;
  int32_t handle_value = 0;
  std::string error = Registry::Global().AcquireForImport(
      MakeRequest(0, layout_key, Platform::kCpu, device, layout), allocator, &slot, &handle_value);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::lock_guard<std::mutex> lock(slot->mu);
  for (size_t i = 0; i < leaves.size(); ++i) {
    const LeafArrays& leaf = leaves[i];
    LeafState& state = slot->leaves[i];
    size_t state_bytes = layout[i].state_bytes(), scale_bytes = layout[i].scale_bytes();
    if (state_bytes > 0) {
      std::memcpy(state.state1, leaf.state1, state_bytes);
      std::memcpy(state.state2, leaf.state2, state_bytes);
    }
    if (scale_bytes > 0) {
      std::memcpy(state.absmax1, leaf.absmax1, scale_bytes);
      std::memcpy(state.absmax2, leaf.absmax2, scale_bytes);
    }
  }
  slot->step = step;
  count_out->typed_data()[0] = static_cast<int32_t>(step);
  handle_out->typed_data()[0] = static_cast<uint32_t>(handle_value);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kUpdateCpu, UpdateCpu,
                              BindUpdate(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kUpdateArraysCpu, UpdateArraysCpu,
                              BindUpdateArrays(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBlockNormsCpu, BlockNormsCpu, BindBlockNorms(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kExportCpu, ExportCpu,
                              BindExport(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kImportCpu, ImportCpu,
                              BindImport(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>()));

}  // namespace optax_paged8bit
