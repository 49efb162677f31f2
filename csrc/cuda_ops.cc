// CUDA handlers of the update, export and import custom calls, the managed
// memory allocator with its oversubscription guard, and paging.
//
// Every launch goes on the stream XLA hands the handler, and its result is
// checked. The one host synchronisation of a step is the read of the 8 bytes
// of handle and count (SPEC 5.1). The GPU is reached through cuda_api.h: the
// CUDA driver API and kernels that NVRTC compiles at first use.
#include "cuda_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "adam8bit.h"
#include "cuda_api.h"
#include "cuda_kernels.h"
#include "ffi_common.h"
#include "registry.h"

namespace optax_paged8bit {
namespace {

constexpr int kMaxDevices = 64;
// Free device memory left alone when placing state (XLA's scratch, the driver).
constexpr size_t kDeviceReserveBytes = size_t{256} << 20;

using cu::DeviceLocation;
using cu::DeviceScope;
using cu::HostLocation;

std::string CudaMessage(const char* what, cu::Result error) { return cu::Message(what, error); }

ffi::Error CudaError(const char* op, const char* what, cu::Result error) {
  return ffi::Error::Internal(std::string(op) + ": " + CudaMessage(what, error));
}

// The GPU's driver, loaded at the first CUDA call (an error that says why it
// is not there otherwise).
ffi::Error CheckDriver(const char* op) {
  std::string error = cu::Init();
  if (error.empty()) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": " + error);
}

// A launcher's failure (cuda_api.h), named after the call.
#define RETURN_IF_LAUNCH_FAILED(op, expr)                                 \
  do {                                                                    \
    std::string launch_error = (expr);                                    \
    if (!launch_error.empty()) {                                          \
      return ffi::Error::Internal(std::string(op) + ": " + launch_error); \
    }                                                                     \
  } while (0)

// A driver call's failure, named after what it did.
#define RETURN_IF_CUDA_FAILED(op, what, expr)                               \
  do {                                                                      \
    cu::Result cuda_error = (expr);                                         \
    if (cuda_error != cu::kSuccess) return CudaError(op, what, cuda_error); \
  } while (0)

// Bytes of managed memory placed on each device, and the budget for them.
std::atomic<int64_t> g_device_bytes[kMaxDevices];
std::atomic<int64_t> g_device_budget{-1};  // -1: no budget beyond free memory
std::mutex g_placement_mu;                 // placement decisions, one at a time
std::mutex g_sizes_mu;
std::map<void*, std::pair<int, int64_t>> g_device_sizes;  // device-placed allocations

// Stops counting a device-placed allocation against its device.
void ForgetDevicePlacement(void* p) {
  std::lock_guard<std::mutex> lock(g_sizes_mu);
  auto it = g_device_sizes.find(p);
  if (it != g_device_sizes.end()) {
    g_device_bytes[it->second.first] -= it->second.second;
    g_device_sizes.erase(it);
  }
}

void FreeManaged(void* p) {
  ForgetDevicePlacement(p);
  cu::MemFree(p);  // waits for work in flight that may still touch it
}

// Whether free device memory (minus a reserve) can take `bytes` more.
bool FreeMemoryAllows(size_t bytes) {
  size_t free_bytes = 0, total_bytes = 0;
  if (cu::MemGetInfo(&free_bytes, &total_bytes) != cu::kSuccess) return false;
  return bytes + kDeviceReserveBytes <= free_bytes;
}

// Whether `bytes` more may be placed on `device`: within free memory and under
// the budget. Never oversubscribes.
bool FitsOnDevice(int device, size_t bytes) {
  int64_t budget = g_device_budget.load();
  return FreeMemoryAllows(bytes) &&
         (budget < 0 || g_device_bytes[device].load() + static_cast<int64_t>(bytes) <= budget);
}

// Managed memory homed on the owning GPU when it fits, else on the host
// (preferred location host, mapped for the GPU, read over the bus).
class ManagedAllocator : public Allocator {
 public:
  ManagedAllocator(int device, cu::Stream stream) : device_(device), stream_(stream) {}

  Memory Allocate(size_t bytes, std::string* error) override {
    std::lock_guard<std::mutex> lock(g_placement_mu);
    Memory m;
    m.bytes = bytes;
    m.free_fn = FreeManaged;
    bool on_device = FitsOnDevice(device_, bytes);
    void* p = nullptr;
    cu::Result e = cu::MemAllocManaged(&p, bytes);
    if (e != cu::kSuccess) {
      *error = CudaMessage("cuMemAllocManaged", e) + " (" + std::to_string(bytes) + " bytes)";
      return m;
    }
    cu::MemLocation home = on_device ? DeviceLocation(device_) : HostLocation();
    e = cu::MemAdvisePreferredLocation(p, bytes, home);
    if (e == cu::kSuccess) {
      e = cu::MemAdviseAccessedBy(p, bytes, DeviceLocation(device_));
    }
    if (e == cu::kSuccess) {
      e = on_device ? cu::MemsetAsync(p, 0, bytes, stream_)
                    : (std::memset(p, 0, bytes), cu::kSuccess);
    }
    if (e != cu::kSuccess) {
      cu::MemFree(p);
      *error = CudaMessage("placing managed memory", e);
      return m;
    }
    if (on_device) {
      std::lock_guard<std::mutex> sizes(g_sizes_mu);
      g_device_sizes[p] = {device_, static_cast<int64_t>(bytes)};
      g_device_bytes[device_] += static_cast<int64_t>(bytes);
    }
    m.data = p;
    m.on_host = !on_device;
    m.host_home = !on_device;
    return m;
  }

 private:
  int device_;
  cu::Stream stream_;
};

int NumSms(int device) {
  static std::atomic<int> cache[kMaxDevices];
  int n = cache[device].load();
  if (n == 0) {
    cu::MultiProcessorCount(device, &n);
    cache[device] = n = std::max(n, 1);
  }
  return n;
}

// What a call reads on the host: the state's handle and count, and the
// traced layout-fixing arguments when there are any.
struct HostScalars {
  uint32_t handle = 0;
  int32_t count = 0;
  int32_t structure[kStructureValues] = {};
  size_t structure_size = 0;
};

// The call's one synchronisation: `handle` (may be null), `count` and
// `structure` (may be empty) to the host, in one wait.
ffi::Error ReadHostScalars(const char* op, cu::Stream stream, const void* handle, const void* count,
                           const ffi::Buffer<ffi::S32>* structure, HostScalars* out) {
  static thread_local int32_t* pinned = nullptr;
  constexpr size_t kWords = 2 + kStructureValues;
  if (pinned == nullptr) {
    cu::Result e = cu::MemAllocHost(reinterpret_cast<void**>(&pinned), kWords * sizeof(int32_t));
    if (e != cu::kSuccess) return CudaError(op, "cuMemAllocHost", e);
  }
  out->structure_size = structure == nullptr ? 0 : structure->element_count();
  cu::Result e = cu::kSuccess;
  if (handle != nullptr) {
    e = cu::MemcpyAsync(pinned, handle, sizeof(int32_t), stream);
  }
  if (e == cu::kSuccess) {
    e = cu::MemcpyAsync(pinned + 1, count, sizeof(int32_t), stream);
  }
  if (e == cu::kSuccess && out->structure_size > 0) {
    e = cu::MemcpyAsync(pinned + 2, structure->typed_data(), out->structure_size * sizeof(int32_t),
                        stream);
  }
  if (e == cu::kSuccess) e = cu::StreamSynchronize(stream);
  if (e != cu::kSuccess) return CudaError(op, "reading the state's handle and count", e);
  out->handle = handle != nullptr ? static_cast<uint32_t>(pinned[0]) : 0;
  out->count = pinned[1];
  for (size_t i = 0; i < out->structure_size; ++i) out->structure[i] = pinned[2 + i];
  return ffi::Error::Success();
}

// The update handlers' scalars: read to the host, then checked as a CPU
// handler checks them where they already are.
ffi::Error ReadUpdateScalars(const char* op, cu::Stream stream, const void* handle,
                             const ffi::Buffer<ffi::S32>& count,
                             const ffi::Buffer<ffi::S32>& structure, const StructureAttrs& attrs,
                             HostScalars* out) {
  if (auto e = ReadHostScalars(op, stream, handle, count.untyped_data(), &structure, out);
      e.failure()) {
    return e;
  }
  return CheckUpdateScalars(op, out->structure, out->structure_size, attrs, out->count);
}

// The residency probe (LaunchLoadLatency) of a slot's memory, with device
// and pinned host memory as references measured in the same call
// (MeasureResidency, below).
constexpr int kCalibrationChunks = 4;
struct Calibration {
  void* device = nullptr;
  void* host = nullptr;
};

// The reference buffers of a device (kCalibrationChunks chunks each), made
// at first use and kept.
std::string CalibrationBuffers(int device, Calibration* out) {
  static std::mutex mu;
  static Calibration buffers[kMaxDevices];
  std::lock_guard<std::mutex> lock(mu);
  Calibration& c = buffers[device];
  constexpr size_t kBytes = kProbeChunk * kCalibrationChunks;
  if (c.device == nullptr) {
    if (cu::Result e = cu::MemAlloc(&c.device, kBytes); e != cu::kSuccess) {
      c.device = nullptr;
      return CudaMessage("cuMemAlloc of the residency probe's reference", e);
    }
  }
  if (c.host == nullptr) {
    if (cu::Result e = cu::MemAllocHost(&c.host, kBytes); e != cu::kSuccess) {
      c.host = nullptr;
      return CudaMessage("cuMemAllocHost of the residency probe's reference", e);
    }
  }
  *out = c;
  return "";
}

uint32_t Median(std::vector<uint32_t> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int64_t Chunks(size_t bytes) {
  return static_cast<int64_t>((bytes + kProbeChunk - 1) / kProbeChunk);
}

struct SlotProbe {
  uint32_t device_cycles = 0, host_cycles = 0;
  // The references are apart enough to tell the two (host at least twice
  // device); otherwise no chunk is called host-resident and
  // MeasureResidency says it cannot tell.
  bool separated = false;
  std::vector<std::vector<bool>> on_host;  // per Memory of the slot, per chunk
};

// Probes every Memory of `slot` on `stream` (one synchronisation).
std::string ProbeSlot(const Slot& slot, cu::Stream stream, SlotProbe* out) {
  Calibration c;
  if (std::string error = CalibrationBuffers(slot.device, &c); !error.empty()) return error;
  int64_t total = 2 * kCalibrationChunks;
  for (const Memory& m : slot.memory) total += Chunks(m.bytes);
  uint32_t* cycles = nullptr;
  if (cu::Result e = cu::MemAllocHost(reinterpret_cast<void**>(&cycles), total * sizeof(uint32_t));
      e != cu::kSuccess) {
    return CudaMessage("cuMemAllocHost of the residency probe's results", e);
  }
  std::unique_ptr<uint32_t, cu::Result (*)(void*)> owned(cycles, cu::MemFreeHost);
  constexpr int64_t kRefBytes = kProbeChunk * kCalibrationChunks;
  std::string error =
      cu::LaunchLoadLatency(static_cast<const uint8_t*>(c.device), kRefBytes, cycles, stream);
  if (error.empty()) {
    error = cu::LaunchLoadLatency(static_cast<const uint8_t*>(c.host), kRefBytes,
                                  cycles + kCalibrationChunks, stream);
  }
  int64_t at = 2 * kCalibrationChunks;
  for (const Memory& m : slot.memory) {
    if (error.empty()) {
      error = cu::LaunchLoadLatency(static_cast<const uint8_t*>(m.data),
                                    static_cast<int64_t>(m.bytes), cycles + at, stream);
    }
    at += Chunks(m.bytes);
  }
  if (!error.empty()) return "the residency probe: " + error;
  if (cu::Result e = cu::StreamSynchronize(stream); e != cu::kSuccess) {
    return CudaMessage("the residency probe", e);
  }
  out->device_cycles = Median({cycles, cycles + kCalibrationChunks});
  out->host_cycles = Median({cycles + kCalibrationChunks, cycles + 2 * kCalibrationChunks});
  out->separated = out->host_cycles >= 2 * out->device_cycles;
  // Above the geometric mean of the references: over the bus.
  double threshold = std::sqrt(static_cast<double>(out->device_cycles) * out->host_cycles);
  out->on_host.clear();
  at = 2 * kCalibrationChunks;
  for (const Memory& m : slot.memory) {
    std::vector<bool> flags(Chunks(m.bytes));
    for (size_t i = 0; i < flags.size(); ++i)
      flags[i] = out->separated && cycles[at + i] > threshold;
    out->on_host.push_back(std::move(flags));
    at += Chunks(m.bytes);
  }
  return "";
}

// Brings paged-out memory of a slot back before a kernel touches it, so that
// the kernel never faults pages in. Memory that no longer fits moves its home
// to the host (read over the bus) instead of oversubscribing.
//
// Memory placed on the device can also be evicted by the driver when
// something else allocates beyond free memory (a spike); nothing tells us.
// The sign we use is free device memory: evicted pages leave free memory
// higher once the spike is gone, so a rise since the slot's last step by
// more than a sixteenth of its device bytes prefetches the slot's memory
// before the kernel runs (resident pages cost the driver a walk, about 1 ms
// per GiB, so a false sign costs one step a little). Measured on an H200
// (benchmarks/RESULTS.md): letting the kernel fault evicted pages
// back costs 3-5x a step after page_out, and so did a timed probe of the
// pages; a prefetch every step costs 27% of each resident step, the free
// memory check one cuMemGetInfo.
constexpr size_t kEvictionSignMinBytes = size_t{2} << 20;

ffi::Error MakeResident(const char* op, Slot& slot, cu::Stream stream) {
  size_t free_now = 0, total = 0, placed_on_device = 0;
  for (const Memory& m : slot.memory) {
    if (!m.on_host && !m.host_home) placed_on_device += m.bytes;
  }
  bool evicted = false;
  if (placed_on_device > 0 && cu::MemGetInfo(&free_now, &total) == cu::kSuccess) {
    size_t sign = std::max(kEvictionSignMinBytes, placed_on_device / 16);
    evicted = slot.device_free_seen > 0 && free_now > slot.device_free_seen + sign;
    slot.evictions_seen += evicted ? 1 : 0;
  }
  bool paged_in = false;
  for (Memory& m : slot.memory) {
    if (m.host_home) continue;
    cu::Result e = cu::kSuccess;
    if (!m.on_host) {
      if (evicted) {
        e = cu::MemPrefetchAsync(m.data, m.bytes, DeviceLocation(slot.device), stream);
      }
    } else {
      std::lock_guard<std::mutex> lock(g_placement_mu);
      if (FreeMemoryAllows(m.bytes)) {
        e = cu::MemPrefetchAsync(m.data, m.bytes, DeviceLocation(slot.device), stream);
        m.on_host = false;
        paged_in = true;
      } else {
        e = cu::MemAdvisePreferredLocation(m.data, m.bytes, HostLocation());
        ForgetDevicePlacement(m.data);
        m.host_home = true;
      }
    }
    if (e != cu::kSuccess) return CudaError(op, "prefetching state to the device", e);
  }
  // What the next step compares with: free memory while this slot's pages
  // are on the device (taken at the next step when pages moved in this one).
  slot.device_free_seen = evicted || paged_in ? 0 : free_now;
  return ffi::Error::Success();
}

// kLeafAligned when grad, param and out start on 16 bytes and an 8-bit leaf's
// codes (read and written) on 8: then every lane of 8 elements (which starts
// 16 or 32 bytes after the previous one) loads and stores in 16- and 8-byte
// words, and the update kernel checks no address per block.
int32_t AlignmentFlag(const LeafDesc& d) {
  auto aligned = [](const void* p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
  };
  bool words = aligned(d.grad, 16) && aligned(d.param, 16) && aligned(d.out, 16);
  bool codes = !(d.flags & kLeaf8bit) || (aligned(d.state1, 8) && aligned(d.state2, 8) &&
                                          aligned(d.state1_in, 8) && aligned(d.state2_in, 8));
  return words && codes ? kLeafAligned : 0;
}

// Splits the leaves into launch tables of at most kMaxLeavesPerLaunch, in
// their order, or with by_type, grouped by dtype (in their order within each):
// then every table's leaves have one dtype, as an update kernel takes them.
// block_offsets: where each table's blocks start, counted in table order.
std::vector<std::unique_ptr<LeafTable>> BuildTables(const std::vector<LeafCall>& calls,
                                                    const std::vector<LeafSpec>& layout,
                                                    const std::vector<StepState>& states,
                                                    bool block_wise,
                                                    std::vector<int64_t>* block_offsets,
                                                    bool by_type = false) {
  std::vector<size_t> order(calls.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (by_type) {
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return calls[a].type < calls[b].type; });
  }
  std::vector<std::unique_ptr<LeafTable>> tables;
  int64_t offset = 0;
  for (size_t n = 0; n < std::max<size_t>(order.size(), 1); ++n) {
    bool other_type = by_type && n < order.size() && !tables.empty() &&
                      tables.back()->num_leaves > 0 &&
                      tables.back()->leaves[0].type != calls[order[n]].type;
    if (tables.empty() || tables.back()->num_leaves == kMaxLeavesPerLaunch || other_type) {
      tables.push_back(std::make_unique<LeafTable>());
      tables.back()->num_leaves = 0;
      tables.back()->num_blocks = 0;
      block_offsets->push_back(offset);
    }
    if (n == order.size()) break;  // no leaves: one empty table still writes the count
    size_t i = order[n];
    LeafTable& table = *tables.back();
    const LeafCall& call = calls[i];
    const StepState& state = states[i];
    LeafDesc& d = table.leaves[table.num_leaves++];
    d.grad = call.grad;
    d.param = call.param;
    d.out = call.out;
    d.state1 = state.out.state1;
    d.state2 = state.out.state2;
    d.absmax1 = state.out.absmax1;
    d.absmax2 = state.out.absmax2;
    d.state1_in = state.in.state1;
    d.state2_in = state.in.state2;
    d.absmax1_in = state.in.absmax1;
    d.absmax2_in = state.in.absmax2;
    d.size = call.size;
    d.block_begin = table.num_blocks;
    d.type = call.type;
    d.flags = call.flags | (layout[i].is_8bit && !block_wise ? kLeafWhole : 0);
    d.flags |= AlignmentFlag(d);
    d.index = static_cast<int32_t>(i);
    int64_t blocks = (call.size + kBlockSize - 1) / kBlockSize;
    table.num_blocks += blocks;
    offset += blocks;
  }
  return tables;
}

// Where an update writes the state's handle (nowhere for adamw8bit).
struct HandleWrite {
  uint32_t* out = nullptr;
  uint32_t value = 0;
};

// One step over every leaf on the states given (a registry slot's, or the
// arrays of an arrays-state call): all launches on `stream`.
ffi::Error LaunchStep(const char* op, cu::Stream stream, int device, ffi::ScratchAllocator& scratch,
                      const std::vector<LeafCall>& calls, const std::vector<LeafSpec>& layout,
                      const std::vector<StepState>& states, const ffi::Buffer<ffi::F32>& hyper,
                      const ffi::Buffer<ffi::F32>& qmaps, const ffi::Buffer<ffi::F32>& rings,
                      float* ring, const GivenNorms& norms, int32_t* count_out, int32_t count_value,
                      HandleWrite handle, int64_t t, int32_t percentile, bool block_wise,
                      bool write_params) {
  if (ring != rings.typed_data() && rings.element_count() > 0) {
    RETURN_IF_CUDA_FAILED(
        op, "copying the clipping rings",
        cu::MemcpyAsync(ring, rings.typed_data(), rings.element_count() * sizeof(float), stream));
  }
  uint32_t types = calls.empty() ? 1u << kF32 : 0u;
  for (const LeafCall& call : calls) types |= 1u << call.type;
  // The step's kernels compile together the first time (each launch would
  // load what it needs, one program after another).
  RETURN_IF_LAUNCH_FAILED(op, cu::LoadUpdateKernels(types, write_params));
  std::vector<int64_t> block_offsets;
  auto tables = BuildTables(calls, layout, states, block_wise, &block_offsets, /*by_type=*/true);
  int64_t total_blocks = 0;
  for (const auto& table : tables) total_blocks += table->num_blocks;
  bool clipping = percentile < 100;
  bool any_whole = !block_wise && std::any_of(layout.begin(), layout.end(),
                                              [](const LeafSpec& s) { return s.is_8bit; });
  size_t num_leaves = calls.size();

  StepArgs args = {};
  args.hyper = hyper.typed_data();
  args.count_out = count_out;
  args.count_value = count_value;
  args.handle_out = handle.out;
  args.handle_value = handle.value;
  args.t = t;
  args.write_params = write_params;
  int num_sms = NumSms(device);
  auto allocate = [&](size_t bytes) -> void* {
    return scratch.Allocate(std::max<size_t>(bytes, 16), 16).value_or(nullptr);
  };
  auto* quant = static_cast<QuantTables*>(allocate(sizeof(QuantTables)));
  if (quant == nullptr) {
    return ffi::Error::Internal(std::string(op) + ": out of scratch memory");
  }
  RETURN_IF_LAUNCH_FAILED(op, cu::LaunchBuildQuantTables(qmaps.typed_data(), quant, stream));
  args.quant = quant;
  if (clipping && norms.data != nullptr) {
    // Given block norms (sharded params): each leaf's run of them stands in
    // for its own blocks in the per-leaf reduction (RingScaleKernel reads
    // partials[block_begin + j] for the blocks of `size` elements).
    auto* clip_scale = static_cast<float*>(allocate(num_leaves * sizeof(float)));
    if (clip_scale == nullptr) {
      return ffi::Error::Internal(std::string(op) + ": out of scratch memory for clipping");
    }
    for (const auto& table : tables) {
      auto given = std::make_unique<LeafTable>(*table);
      for (int i = 0; i < given->num_leaves; ++i) {
        LeafDesc& d = given->leaves[i];
        d.block_begin = norms.offsets[d.index];
        d.size = norms.blocks[d.index] * kBlockSize;
      }
      RETURN_IF_LAUNCH_FAILED(op, cu::LaunchRingScale(*given, norms.data, ring, clip_scale, args.t,
                                                      percentile, stream));
    }
    args.clip_scale = clip_scale;
  } else if (clipping) {
    auto* partials = static_cast<double*>(allocate(total_blocks * sizeof(double)));
    auto* clip_scale = static_cast<float*>(allocate(num_leaves * sizeof(float)));
    if (partials == nullptr || clip_scale == nullptr) {
      return ffi::Error::Internal(std::string(op) + ": out of scratch memory for clipping");
    }
    for (size_t k = 0; k < tables.size(); ++k) {
      RETURN_IF_LAUNCH_FAILED(
          op, cu::LaunchBlockNormSq(*tables[k], partials + block_offsets[k], num_sms, stream));
    }
    for (size_t k = 0; k < tables.size(); ++k) {
      RETURN_IF_LAUNCH_FAILED(op, cu::LaunchRingScale(*tables[k], partials + block_offsets[k], ring,
                                                      clip_scale, args.t, percentile, stream));
    }
    args.clip_scale = clip_scale;
  }
  if (any_whole) {
    args.whole_absmax = static_cast<float*>(allocate(2 * num_leaves * sizeof(float)));
    if (args.whole_absmax == nullptr) {
      return ffi::Error::Internal(std::string(op) + ": out of scratch memory");
    }
    RETURN_IF_CUDA_FAILED(
        op, "zeroing scales",
        cu::MemsetAsync(args.whole_absmax, 0, 2 * num_leaves * sizeof(float), stream));
    for (const auto& table : tables) {
      RETURN_IF_LAUNCH_FAILED(op, cu::LaunchWholeLeafMax(*table, args, num_sms, stream));
    }
  }
  for (size_t k = 0; k < tables.size(); ++k) {
    args.write_count = k + 1 == tables.size();
    RETURN_IF_LAUNCH_FAILED(op, cu::LaunchUpdate(*tables[k], args, num_sms, stream));
  }
  return ffi::Error::Success();
}

// The update handlers' signatures repeat their binding (ffi_common.h's
// BindUpdate and BindUpdateArrays) on each backend, as XLA FFI decodes a call
// into the handler's parameters; what they do with them is shared
// (DecodePagedUpdate or DecodeUpdate, CheckUpdateScalars, the registry, the step's math).
ffi::Error UpdateCuda(cu::Stream stream, int32_t device, ffi::ScratchAllocator scratch,
                      HandleBuffer handle, HandleResult handle_out, ffi::Buffer<ffi::S32> count,
                      ffi::Buffer<ffi::S32> structure, ffi::Buffer<ffi::F32> hyper,
                      ffi::Buffer<ffi::F32> qmaps, ffi::Buffer<ffi::F32> rings,
                      ffi::Buffer<ffi::U32> norms, ffi::RemainingArgs leaf_args,
                      ffi::Result<ffi::Buffer<ffi::S32>> count_out,
                      ffi::Result<ffi::Buffer<ffi::F32>> rings_out, ffi::RemainingRets leaf_rets,
                      ffi::Span<const int32_t> leaf_flags, bool block_wise, int32_t percentile,
                      bool write_params, int32_t optim_bits, int64_t min_8bit_size,
                      ffi::Span<const int64_t> norm_blocks, int64_t layout_key, int64_t first_leaf,
                      ffi::Span<const int64_t> chunk_starts, ffi::Span<const int32_t> layout_flags,
                      ffi::Span<const int64_t> layout_sizes) {
  CallScope call_scope;  // before the handle is read (registry.h)
  const char* op = kUpdateTarget;
  if (auto e = CheckDriver(op); e.failure()) return e;
  if (auto e = CheckScalarOperands(op, handle, count); e.failure()) return e;
  DecodedPagedUpdate u;
  if (auto e = DecodePagedUpdate(op, count, structure, hyper, qmaps, rings, norms, norm_blocks,
                                 leaf_args, leaf_rets, leaf_flags, block_wise, percentile,
                                 first_leaf, chunk_starts, layout_flags, layout_sizes, &u);
      e.failure()) {
    return e;
  }
  DeviceScope scope(device);
  HostScalars host;
  if (auto e = ReadUpdateScalars(op, stream, handle.untyped_data(), count, structure,
                                 {optim_bits, min_8bit_size, percentile, block_wise}, &host);
      e.failure()) {
    return e;
  }
  if (auto e = CheckChunkHandle(op, u.chunk, host.handle); e.failure()) return e;
  ManagedAllocator allocator(device, stream);
  std::shared_ptr<Slot> slot;
  int32_t handle_value = 0;
  std::string error = Registry::Global().AcquireForUpdate(
      MakeRequest(host.handle, layout_key, Platform::kCuda, device, u.state_layout()), host.count,
      allocator, &slot, &handle_value);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::lock_guard<std::mutex> lock(slot->mu);
  if (slot->step != host.count) {
    return ffi::Error::InvalidArgument("stale optimizer state: concurrent updates of handle " +
                                       std::to_string(handle_value));
  }
  if (auto e = MakeResident(op, *slot, stream); e.failure()) return e;
  int64_t t = static_cast<int64_t>(host.count) + 1;
  HandleWrite handle_write{handle_out->typed_data(), static_cast<uint32_t>(handle_value)};
  if (auto e = LaunchStep(op, stream, device, scratch, u.call.leaves, u.call.layout,
                          CallStates(*slot, u), hyper, qmaps, rings, rings_out->typed_data(),
                          u.call.norms, count_out->typed_data(), u.chunk.CountAfter(host.count),
                          handle_write, t, percentile, block_wise, write_params);
      e.failure()) {
    return e;
  }
  if (!u.chunk.commit()) return ffi::Error::Success();
  for (const ArenaCopy& c : StagedCopies(*slot, u)) {
    RETURN_IF_CUDA_FAILED(op, "copying the staged moments in",
                          cu::MemcpyAsync(c.to, c.from, c.bytes, stream));
  }
  slot->step = t;
  return ffi::Error::Success();
}

// adamw8bit: the same step with the state as operands, updated in place in
// the aliased results (copied first when XLA did not alias them). The count
// is read like the paged update's (the kernels take the step from the host).
ffi::Error UpdateArraysCuda(cu::Stream stream, int32_t device, ffi::ScratchAllocator scratch,
                            ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::S32> structure,
                            ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> qmaps,
                            ffi::Buffer<ffi::F32> rings, ffi::Buffer<ffi::U32> norms,
                            ffi::RemainingArgs args, ffi::Result<ffi::Buffer<ffi::S32>> count_out,
                            ffi::Result<ffi::Buffer<ffi::F32>> rings_out, ffi::RemainingRets rets,
                            ffi::Span<const int32_t> leaf_flags, bool block_wise,
                            int32_t percentile, bool write_params, int32_t optim_bits,
                            int64_t min_8bit_size, ffi::Span<const int64_t> norm_blocks) {
  const char* op = kUpdateArraysTarget;
  if (auto e = CheckDriver(op); e.failure()) return e;
  DecodedUpdate call;
  if (auto e = DecodeUpdate(op, count, structure, hyper, qmaps, rings, norms, norm_blocks, args,
                            rets, leaf_flags, block_wise, percentile, true, &call);
      e.failure()) {
    return e;
  }
  DeviceScope scope(device);
  HostScalars host;
  if (auto e = ReadUpdateScalars(op, stream, nullptr, count, structure,
                                 {optim_bits, min_8bit_size, percentile, block_wise}, &host);
      e.failure()) {
    return e;
  }
  int64_t t = static_cast<int64_t>(host.count) + 1;
  return LaunchStep(op, stream, device, scratch, call.leaves, call.layout, ArrayStates(call), hyper,
                    qmaps, rings, rings_out->typed_data(), call.norms, count_out->typed_data(),
                    static_cast<int32_t>(t), HandleWrite{}, t, percentile, block_wise,
                    write_params);
}

ffi::Error BlockNormsCuda(cu::Stream stream, int32_t device, ffi::RemainingArgs args,
                          ffi::Result<ffi::Buffer<ffi::U32>> norms) {
  const char* op = kBlockNormsTarget;
  if (auto e = CheckDriver(op); e.failure()) return e;
  std::vector<LeafCall> leaves;
  std::vector<LeafSpec> layout;
  if (auto e = DecodeBlockNormsCall(op, args, norms->element_count(), &leaves, &layout);
      e.failure()) {
    return e;
  }
  DeviceScope scope(device);
  std::vector<StepState> states(leaves.size());
  std::vector<int64_t> block_offsets;
  auto tables = BuildTables(leaves, layout, states, true, &block_offsets);
  auto* out = reinterpret_cast<double*>(norms->typed_data());
  int num_sms = NumSms(device);
  for (size_t k = 0; k < tables.size(); ++k) {
    if (tables[k]->num_blocks == 0) continue;
    RETURN_IF_LAUNCH_FAILED(
        op, cu::LaunchBlockNormSq(*tables[k], out + block_offsets[k], num_sms, stream));
  }
  return ffi::Error::Success();
}

// Copies between a slot and the call's buffers (export: slot -> buffers).
ffi::Error CopyStateArrays(const char* op, const std::vector<LeafArrays>& leaves,
                           const std::vector<LeafSpec>& layout, Slot* slot, bool to_slot,
                           cu::Stream stream) {
  for (size_t i = 0; i < leaves.size(); ++i) {
    const LeafArrays& leaf = leaves[i];
    const LeafState* state = slot ? &slot->leaves[i] : nullptr;
    void* buffers[4] = {leaf.state1, leaf.state2, leaf.absmax1, leaf.absmax2};
    void* stored[4] = {state ? state->state1 : nullptr, state ? state->state2 : nullptr,
                       state ? static_cast<void*>(state->absmax1) : nullptr,
                       state ? static_cast<void*>(state->absmax2) : nullptr};
    size_t bytes[4] = {layout[i].state_bytes(), layout[i].state_bytes(), layout[i].scale_bytes(),
                       layout[i].scale_bytes()};
    for (int k = 0; k < 4; ++k) {
      if (bytes[k] == 0) continue;
      cu::Result e;
      if (stored[k] == nullptr) {
        e = cu::MemsetAsync(buffers[k], 0, bytes[k], stream);
      } else if (to_slot) {
        e = cu::MemcpyAsync(stored[k], buffers[k], bytes[k], stream);
      } else {
        e = cu::MemcpyAsync(buffers[k], stored[k], bytes[k], stream);
      }
      if (e != cu::kSuccess) return CudaError(op, "copying state", e);
    }
  }
  return ffi::Error::Success();
}

ffi::Error ExportCuda(cu::Stream stream, int32_t device, HandleBuffer handle,
                      ffi::Buffer<ffi::S32> count, ffi::Result<ffi::Buffer<ffi::S32>> step_out,
                      ffi::Result<ffi::Buffer<ffi::U8>> codes,
                      ffi::Result<ffi::Buffer<ffi::F32>> floats,
                      ffi::Span<const int32_t> leaf_flags, bool block_wise, int64_t layout_key,
                      ffi::Span<const int64_t> leaf_sizes) {
  CallScope call_scope;  // before the handle is read (registry.h)
  const char* op = kExportTarget;
  if (auto e = CheckDriver(op); e.failure()) return e;
  if (auto e = CheckScalarOperands(op, handle, count); e.failure()) return e;
  std::vector<LeafArrays> leaves;
  std::vector<LeafSpec> layout;
  if (auto e = DecodeFlatState(op, leaf_flags, leaf_sizes, block_wise, codes->typed_data(),
                               codes->element_count(), floats->typed_data(),
                               floats->element_count(), &leaves, &layout);
      e.failure()) {
    return e;
  }
  DeviceScope scope(device);
  HostScalars host;
  if (auto e =
          ReadHostScalars(op, stream, handle.untyped_data(), count.untyped_data(), nullptr, &host);
      e.failure()) {
    return e;
  }
  std::shared_ptr<Slot> slot;
  int64_t step = 0;
  std::string error = Registry::Global().AcquireForRead(
      MakeRequest(host.handle, layout_key, Platform::kCuda, device, layout), host.count, &slot,
      &step);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::unique_lock<std::mutex> lock;
  if (slot) lock = std::unique_lock<std::mutex>(slot->mu);
  if (auto e = CopyStateArrays(op, leaves, layout, slot.get(), /*to_slot=*/false, stream);
      e.failure()) {
    return e;
  }
  WordStores stores = {};
  stores.dst[0] = reinterpret_cast<uint32_t*>(step_out->typed_data());
  stores.value[0] = static_cast<uint32_t>(slot ? slot->step : step);
  stores.count = 1;
  RETURN_IF_LAUNCH_FAILED(op, cu::LaunchStoreWords(stores, stream));
  return ffi::Error::Success();
}

ffi::Error ImportCuda(cu::Stream stream, int32_t device, ffi::Buffer<ffi::S32> count,
                      ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> floats,
                      HandleResult handle_out, ffi::Result<ffi::Buffer<ffi::S32>> count_out,
                      ffi::Span<const int32_t> leaf_flags, bool block_wise, int64_t layout_key,
                      ffi::Span<const int64_t> leaf_sizes) {
  CallScope call_scope;  // before the handle is read (registry.h)
  const char* op = kImportTarget;
  if (auto e = CheckDriver(op); e.failure()) return e;
  if (count.element_count() != 1) return InvalidArgument(op, "count must be an int32 scalar");
  std::vector<LeafArrays> leaves;
  std::vector<LeafSpec> layout;
  if (auto e = DecodeFlatState(op, leaf_flags, leaf_sizes, block_wise, codes.typed_data(),
                               codes.element_count(), floats.typed_data(), floats.element_count(),
                               &leaves, &layout);
      e.failure()) {
    return e;
  }
  DeviceScope scope(device);
  HostScalars host;
  if (auto e = ReadHostScalars(op, stream, nullptr, count.untyped_data(), nullptr, &host);
      e.failure()) {
    return e;
  }
  if (auto e = CheckImportCount(op, host.count); e.failure()) return e;
  ManagedAllocator allocator(device, stream);
  std::shared_ptr<Slot> slot;
  int32_t handle_value = 0;
  std::string error = Registry::Global().AcquireForImport(
      MakeRequest(0, layout_key, Platform::kCuda, device, layout), allocator, &slot, &handle_value);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::lock_guard<std::mutex> lock(slot->mu);
  if (auto e = MakeResident(op, *slot, stream); e.failure()) return e;
  if (auto e = CopyStateArrays(op, leaves, layout, slot.get(), /*to_slot=*/true, stream);
      e.failure()) {
    return e;
  }
  WordStores stores = {};
  stores.dst[0] = handle_out->typed_data();
  stores.value[0] = static_cast<uint32_t>(handle_value);
  stores.dst[1] = reinterpret_cast<uint32_t*>(count_out->typed_data());
  stores.value[1] = static_cast<uint32_t>(host.count);
  stores.count = 2;
  RETURN_IF_LAUNCH_FAILED(op, cu::LaunchStoreWords(stores, stream));
  slot->step = host.count;
  return ffi::Error::Success();
}

cu::Stream PagingStream(int device) {
  static std::mutex mu;
  static cu::Stream streams[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (streams[device] == nullptr) cu::StreamCreateNonBlocking(&streams[device]);
  return streams[device];
}

// Moves every CUDA slot of `handle` to the host (to_host) or back; `touch`
// counts it as a use of the state (a user's page_out or page_in).
size_t Move(int32_t handle, bool to_host, std::string* error, bool touch = true) {
  std::vector<std::shared_ptr<Slot>> slots;
  *error = Registry::Global().SlotsOf(handle, &slots, touch);
  if (!error->empty()) return 0;
  size_t moved = 0;
  for (auto& slot : slots) {
    if (slot->platform != Platform::kCuda) continue;
    std::lock_guard<std::mutex> lock(slot->mu);
    DeviceScope scope(slot->device);
    cu::Stream stream = PagingStream(slot->device);
    for (Memory& m : slot->memory) {
      if (m.host_home || m.on_host == to_host) continue;
      std::lock_guard<std::mutex> placement(g_placement_mu);
      if (!to_host && !FreeMemoryAllows(m.bytes)) {
        *error = "page_in: not enough free device memory for " + std::to_string(m.bytes) +
                 " more bytes of optimizer state; the rest stays on the host and the next "
                 "update moves its home there (read over the bus) rather than oversubscribe";
        return moved;
      }
      cu::Result e = cu::MemPrefetchAsync(
          m.data, m.bytes, to_host ? HostLocation() : DeviceLocation(slot->device), stream);
      if (e != cu::kSuccess) {
        *error = CudaMessage("cuMemPrefetchAsync", e);
        return moved;
      }
      m.on_host = to_host;
      moved += m.bytes;
    }
    cu::Result e = cu::StreamSynchronize(stream);
    if (e != cu::kSuccess) {
      *error = CudaMessage("paging", e);
      return moved;
    }
  }
  return moved;
}

}  // namespace

ResidencyMeasure MeasureResidency(int32_t handle, std::string* error) {
  ResidencyMeasure r;
  std::vector<std::shared_ptr<Slot>> slots;
  *error = Registry::Global().SlotsOf(handle, &slots);
  if (!error->empty()) return r;
  for (auto& slot : slots) {
    if (slot->platform != Platform::kCuda) {
      r.bytes_on_host += slot->bytes();
      continue;
    }
    std::lock_guard<std::mutex> lock(slot->mu);
    DeviceScope scope(slot->device);
    SlotProbe probe;
    *error = ProbeSlot(*slot, PagingStream(slot->device), &probe);
    if (!error->empty()) return r;
    if (!probe.separated) {
      *error = "measure_residency: device and host loads took " +
               std::to_string(probe.device_cycles) + " and " + std::to_string(probe.host_cycles) +
               " cycles, too close to tell where the state is";
      return r;
    }
    r.device_cycles = std::max(r.device_cycles, probe.device_cycles);
    r.host_cycles = std::max(r.host_cycles, probe.host_cycles);
    for (size_t k = 0; k < slot->memory.size(); ++k) {
      const Memory& m = slot->memory[k];
      for (size_t i = 0; i < probe.on_host[k].size(); ++i) {
        size_t chunk = std::min(kProbeChunk, m.bytes - i * kProbeChunk);
        (probe.on_host[k][i] ? r.bytes_on_host : r.bytes_on_device) += chunk;
      }
    }
  }
  return r;
}

size_t PageOut(int32_t handle, std::string* error) { return Move(handle, true, error); }
size_t PageIn(int32_t handle, std::string* error) { return Move(handle, false, error); }
size_t Retire(int32_t handle, std::string* error) { return Move(handle, true, error, false); }

// Plain device allocations that tests and benchmarks hold to make a memory
// spike (FillDeviceMemory).
std::mutex g_fill_mu;
std::vector<void*> g_fill;

size_t FillDeviceMemory(int device, size_t chunk_bytes, size_t limit_bytes) {
  std::lock_guard<std::mutex> lock(g_fill_mu);
  DeviceScope scope(device);
  size_t filled = 0;
  while (chunk_bytes > 0 && filled + chunk_bytes <= limit_bytes) {
    void* p = nullptr;
    if (cu::MemAlloc(&p, chunk_bytes) != cu::kSuccess) {
      // Give the last chunk back: a GPU filled to its last byte leaves the
      // driver no room to service page faults of managed memory.
      if (!g_fill.empty()) {
        cu::MemFree(g_fill.back());
        g_fill.pop_back();
        filled -= chunk_bytes;
      }
      break;
    }
    g_fill.push_back(p);
    filled += chunk_bytes;
  }
  return filled;
}

void FreeDeviceFill() {
  std::lock_guard<std::mutex> lock(g_fill_mu);
  for (void* p : g_fill) cu::MemFree(p);
  g_fill.clear();
}

void SetDeviceBudget(int64_t bytes) { g_device_budget = bytes; }
int64_t DeviceBudget() { return g_device_budget.load(); }

int64_t ManagedDeviceBytes(int device) {
  return device >= 0 && device < kMaxDevices ? g_device_bytes[device].load() : 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(kUpdateCuda, UpdateCuda,
                              BindUpdate(ffi::Ffi::Bind()
                                             .Ctx<ffi::PlatformStream<cu::Stream>>()
                                             .Ctx<ffi::DeviceOrdinal>()
                                             .Ctx<ffi::ScratchAllocator>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kUpdateArraysCuda, UpdateArraysCuda,
                              BindUpdateArrays(ffi::Ffi::Bind()
                                                   .Ctx<ffi::PlatformStream<cu::Stream>>()
                                                   .Ctx<ffi::DeviceOrdinal>()
                                                   .Ctx<ffi::ScratchAllocator>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBlockNormsCuda, BlockNormsCuda,
                              BindBlockNorms(ffi::Ffi::Bind()
                                                 .Ctx<ffi::PlatformStream<cu::Stream>>()
                                                 .Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kExportCuda, ExportCuda,
    BindExport(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cu::Stream>>().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kImportCuda, ImportCuda,
    BindImport(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cu::Stream>>().Ctx<ffi::DeviceOrdinal>()));

}  // namespace optax_paged8bit
