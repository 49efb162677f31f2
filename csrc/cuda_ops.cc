// CUDA handlers of the update, export and import custom calls, the managed
// memory allocator with its oversubscription guard, and paging.
//
// Every launch goes on the stream XLA hands the handler, and its result is
// checked. The one host synchronisation of a step is the read of the 8 bytes
// of handle and count (SPEC 5.1). The GPU is reached through cuda_api.h: the
// CUDA driver API and kernels that NVRTC compiles at first use.
#include "cuda_ops.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "adam8bit.h"
#include "cuda_api.h"
#include "cuda_kernels.h"
#include "eviction_sign.h"
#include "ffi_common.h"
#include "registry.h"
#include "stream_plan.h"

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

// Runs on whichever thread drops the slot (release, the collector's thread),
// which may have no CUDA context current: it makes the device's current.
void FreeManaged(void* p, int device) {
  ForgetDevicePlacement(p);
  DeviceScope scope(device);
  cu::MemFree(p);  // waits for work in flight that may still touch it
}

// Runs where FreeManaged does. Page-locked memory is not waited for by its
// free as managed memory is, so every stream of the device is waited for
// first: a kernel or copy of a step that was dispatched but has not run may
// still read the state.
void FreePinned(void* p, int device) {
  DeviceScope scope(device);
  cu::CtxSynchronize();
  cu::MemFreeHost(p);
}

// Whether a slot with no room on the device is placed in page-locked host
// memory (copied by the copy engines) rather than managed memory homed on
// the host (copied by kernels); set_host_memory_kind.
std::atomic<bool> g_pinned_host{true};
// Tests: treat every cuMemAllocHost as refused (RefusePinnedHost).
std::atomic<bool> g_refuse_pinned{false};

// Whether free device memory (minus a reserve) can take `bytes` more.
bool FreeMemoryAllows(size_t bytes) {
  size_t free_bytes = 0, total_bytes = 0;
  if (cu::MemGetInfo(&free_bytes, &total_bytes) != cu::kSuccess) return false;
  return bytes + kDeviceReserveBytes <= free_bytes;
}

// Where device and host homes of a slot's memory meet: a multiple of the
// unified-memory driver's 2 MiB unit, so that no page is homed on both sides.
constexpr size_t kHomeUnit = size_t{2} << 20;

// Bytes of managed memory that may still be placed on `device`: within free
// memory (less a reserve) and the budget, beyond `counted` bytes that are
// placed already but ask again (paged-out memory coming back). Never
// oversubscribes.
size_t DeviceRoom(int device, size_t counted = 0) {
  size_t free_bytes = 0, total_bytes = 0;
  if (cu::MemGetInfo(&free_bytes, &total_bytes) != cu::kSuccess) return 0;
  size_t room = free_bytes > kDeviceReserveBytes ? free_bytes - kDeviceReserveBytes : 0;
  int64_t budget = g_device_budget.load();
  if (budget >= 0) {
    int64_t left = budget - g_device_bytes[device].load() + static_cast<int64_t>(counted);
    room = std::min(room, static_cast<size_t>(std::max<int64_t>(left, 0)));
  }
  return room;
}

// How many of `bytes` to home on the device when `room` bytes may be: all of
// them, or the whole 2 MiB units that fit.
size_t DevicePrefix(size_t bytes, size_t room) {
  return bytes <= room ? bytes : room / kHomeUnit * kHomeUnit;
}

// Counts `bytes` of `p` as placed on `device` (replacing what was counted).
void SetDevicePlacement(void* p, int device, size_t bytes) {
  ForgetDevicePlacement(p);
  if (bytes == 0) return;
  std::lock_guard<std::mutex> lock(g_sizes_mu);
  g_device_sizes[p] = {device, static_cast<int64_t>(bytes)};
  g_device_bytes[device] += static_cast<int64_t>(bytes);
}

// Moves the home of m's bytes from `prefix` on to the host (they no longer
// fit on the device).
cu::Result HomeRestOnHost(Memory& m, int device, size_t prefix) {
  if (prefix >= m.device_bytes) return cu::kSuccess;
  cu::Result e = cu::MemAdvisePreferredLocation(static_cast<char*>(m.data) + prefix,
                                                m.device_bytes - prefix, HostLocation());
  if (e != cu::kSuccess) return e;
  SetDevicePlacement(m.data, device, prefix);
  m.device_bytes = prefix;
  return cu::kSuccess;
}

// Managed memory homed on the owning GPU as far as it fits, the rest on the
// host (preferred location host, mapped for the GPU): a step streams what
// lies on the host (StreamedUpdate, below). A state with no room on the
// device at all is placed in page-locked host memory instead, which the copy
// engines move at the bus's speed both ways at once (managed memory homed on
// the host they move several times slower, and copy kernels move it both
// ways at about two thirds of that speed: benchmarks/RESULTS.md). Should
// the host refuse to lock that much memory, it is placed as managed memory.
class ManagedAllocator : public Allocator {
 public:
  ManagedAllocator(int device, cu::Stream stream) : device_(device), stream_(stream) {}

  Memory Allocate(size_t bytes, std::string* error) override {
    std::lock_guard<std::mutex> lock(g_placement_mu);
    Memory m;
    m.bytes = bytes;
    m.free_fn = FreeManaged;
    m.on_host = false;
    size_t prefix = DevicePrefix(bytes, DeviceRoom(device_));
    void* p = nullptr;
    if (prefix == 0 && g_pinned_host.load() && !g_refuse_pinned.load() &&
        cu::MemAllocHost(&p, bytes) == cu::kSuccess) {
      std::memset(p, 0, bytes);
      m.data = p;
      m.on_host = true;
      m.pinned = true;
      m.free_fn = FreePinned;
      return m;
    }
    cu::Result e = cu::MemAllocManaged(&p, bytes);
    if (e != cu::kSuccess) {
      *error = CudaMessage("cuMemAllocManaged", e) + " (" + std::to_string(bytes) + " bytes)";
      return m;
    }
    char* c = static_cast<char*>(p);
    e = cu::MemAdviseAccessedBy(p, bytes, DeviceLocation(device_));
    if (e == cu::kSuccess && prefix > 0) {
      e = cu::MemAdvisePreferredLocation(p, prefix, DeviceLocation(device_));
    }
    if (e == cu::kSuccess && prefix < bytes) {
      e = cu::MemAdvisePreferredLocation(c + prefix, bytes - prefix, HostLocation());
    }
    if (e == cu::kSuccess && prefix > 0) e = cu::MemsetAsync(p, 0, prefix, stream_);
    if (e == cu::kSuccess && prefix < bytes) std::memset(c + prefix, 0, bytes - prefix);
    if (e != cu::kSuccess) {
      cu::MemFree(p);
      *error = CudaMessage("placing managed memory", e);
      return m;
    }
    SetDevicePlacement(p, device_, prefix);
    m.data = p;
    m.device_bytes = prefix;
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

// -- a streamed step's write-back ----------------------------------------------

// The event that marks the end of a slot's write-back, and its device.
struct WriteBack {
  cu::Event event = nullptr;
  int device = 0;
};

void DropWriteBack(void* p) {
  auto* w = static_cast<WriteBack*>(p);
  DeviceScope scope(w->device);
  cu::EventSynchronize(w->event);
  cu::EventDestroy(w->event);
  delete w;
}

// Makes `stream` wait until the slot's last write-back has run.
cu::Result WaitForWriteBack(const Slot& slot, cu::Stream stream) {
  if (slot.write_back == nullptr) return cu::kSuccess;
  return cu::StreamWaitEvent(stream, static_cast<const WriteBack*>(slot.write_back)->event);
}

// The same in a handler, failing the call.
ffi::Error AwaitWriteBack(const char* op, const Slot& slot, cu::Stream stream) {
  RETURN_IF_CUDA_FAILED(op, "waiting for the state's write-back", WaitForWriteBack(slot, stream));
  return ffi::Error::Success();
}

// The slot's write-back event, made at its first streamed step.
ffi::Error WriteBackEvent(const char* op, Slot& slot, cu::Event* out) {
  if (slot.write_back == nullptr) {
    auto w = std::make_unique<WriteBack>();
    w->device = slot.device;
    RETURN_IF_CUDA_FAILED(op, "cuEventCreate", cu::EventCreate(&w->event));
    slot.write_back = w.release();
    slot.drop_write_back = DropWriteBack;
  }
  *out = static_cast<WriteBack*>(slot.write_back)->event;
  return ffi::Error::Success();
}

// Brings paged-out memory of a slot back before a kernel touches it, so that
// the kernel never faults pages in. What no longer fits moves its home to the
// host (and is streamed) instead of oversubscribing.
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
// memory check one cuMemGetInfo (eviction_sign.h has the sign). The eviction
// watch (below) looks for the same sign between steps.
void EnsureEvictionWatch();

// Bytes of a slot homed on its device and not paged out: what an eviction can
// take, and what the sign is measured against.
size_t PlacedOnDevice(const Slot& slot) {
  size_t placed = 0;
  for (const Memory& m : slot.memory) placed += m.on_host ? 0 : m.device_bytes;
  return placed;
}

ffi::Error MakeResident(const char* op, Slot& slot, cu::Stream stream) {
  EnsureEvictionWatch();
  if (slot.restore_pending) {
    if (auto e = AwaitWriteBack(op, slot, stream); e.failure()) return e;
    slot.restore_pending = false;
  }
  size_t free_now = 0, total = 0, placed_on_device = PlacedOnDevice(slot);
  bool evicted = false;
  if (placed_on_device > 0 && cu::MemGetInfo(&free_now, &total) == cu::kSuccess) {
    evicted = EvictionSignShows(placed_on_device, slot.device_free_seen, free_now);
    slot.evictions_seen += evicted ? 1 : 0;
  }
  bool paged_in = false;
  for (Memory& m : slot.memory) {
    if (m.device_bytes == 0 || (!m.on_host && !evicted)) continue;
    // A streamed step's write-back may still be copying into these pages.
    if (auto e = AwaitWriteBack(op, slot, stream); e.failure()) return e;
    cu::Result e = cu::kSuccess;
    if (m.on_host) {
      // Paged out: back to the device as far as it fits now; the rest is
      // homed on the host from now on (and streamed).
      std::lock_guard<std::mutex> lock(g_placement_mu);
      e = HomeRestOnHost(m, slot.device,
                         DevicePrefix(m.device_bytes, DeviceRoom(slot.device, m.device_bytes)));
      if (e == cu::kSuccess) m.on_host = false;
      paged_in = true;
    }
    if (e == cu::kSuccess && m.device_bytes > 0) {
      e = cu::MemPrefetchAsync(m.data, m.device_bytes, DeviceLocation(slot.device), stream);
    }
    if (e != cu::kSuccess) return CudaError(op, "prefetching state to the device", e);
  }
  // What the next step compares with: free memory while this slot's pages
  // are on the device (taken at the next step when pages moved in this one).
  slot.device_free_seen = evicted || paged_in ? 0 : free_now;
  slot.device_free_seen_at = Clock::now();
  return ffi::Error::Success();
}

// Splits the leaves into launch tables of at most kMaxLeavesPerLaunch, in
// their order, or with by_type, grouped by dtype (in their order within each):
// then every table's leaves have one dtype, as an update kernel takes them.
// block_offsets: where each table's blocks start, counted in table order.
// Leaves with skip[i] set are left out.
std::vector<std::unique_ptr<LeafTable>> BuildTables(
    const std::vector<LeafCall>& calls, const std::vector<LeafSpec>& layout,
    const std::vector<StepState>& states, bool block_wise, std::vector<int64_t>* block_offsets,
    bool by_type = false, const std::vector<bool>* skip = nullptr) {
  std::vector<size_t> order;
  for (size_t i = 0; i < calls.size(); ++i) {
    if (skip == nullptr || !(*skip)[i]) order.push_back(i);
  }
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

// -- streaming state that lies in host RAM ---------------------------------------
//
// A leaf whose moments lie (in part) in the host-homed bytes of its slot is
// not read by the kernel over the bus. Its moments are copied in chunks into
// a window of device memory, updated there by the update kernel, and copied
// back, on two streams of their own, so that both directions of the bus move
// at once while the update works on the chunk between them. A pinned slot's
// chunks are copied by the copy engines; managed memory homed on the host by
// copy kernels (the copy engines move it several times slower;
// cuda_kernels.h):
//
//   copy-in stream:  in 0  in 1  in 2  in 3  ......  in 4  ......  in 5
//   XLA's stream:          k 0   k 1   k 2   k 3  ...
//   copy-out stream:             out 0 out 1 out 2 out 3 ...
//
// Chunks take the window's buffers in turn; a buffer is filled again once its
// previous chunk was copied out (events order the three streams). The
// write-back of the last chunks runs after the call returns, beside whatever
// XLA runs next; the slot's write-back event marks its end, and every call
// that touches the slot's memory waits for it (the next step's copies in, an
// export, paging, freeing). Chunks split leaves at 256-element blocks, which
// the step updates independently of each other, so a streamed step is
// bit-identical to a resident one. Not streamed (read over the bus): leaves of
// block_wise=False states, whose one scale spans the leaf, and any leaf when
// the device has no room for the window.

constexpr int kMaxStreamBuffers = 8;
constexpr size_t kMinStreamChunk = size_t{1} << 20;

// The window's shape: chunk bytes, buffers, and the CTAs of each copy (0:
// the default, a quarter of the SMs up to kCopyCtas). Kept in one word (the
// chunk in units of 256 bytes, the CTAs, the buffers) so that a step never
// reads half of a change: 0 is streaming off.
struct StreamShape {
  size_t chunk_bytes = 0;
  int buffers = 0;
  int copy_ctas = 0;
};
constexpr uint64_t PackShape(size_t chunk_bytes, int buffers, int copy_ctas) {
  return static_cast<uint64_t>(chunk_bytes / kArenaAlign) << 12 |
         static_cast<uint64_t>(copy_ctas) << 4 | static_cast<uint64_t>(buffers);
}
StreamShape UnpackShape(uint64_t word) {
  return {static_cast<size_t>(word >> 12) * kArenaAlign, static_cast<int>(word & 15),
          static_cast<int>(word >> 4 & 255)};
}
std::atomic<uint64_t> g_stream_shape{PackShape(size_t{32} << 20, 4, 0)};

struct StreamWindow : WindowShape {
  std::mutex mu;  // held while a step plans and enqueues its chunks
  cu::Stream in = nullptr, out = nullptr;
  cu::Event enqueued = nullptr;                // XLA's work before the step's update
  cu::Event loaded[kMaxStreamBuffers] = {};    // a chunk's moments are in the buffer
  cu::Event computed[kMaxStreamBuffers] = {};  // the kernel has updated them
  cu::Event drained[kMaxStreamBuffers] = {};   // they are copied back: the buffer is free
};
StreamWindow g_windows[kMaxDevices];

// Makes the window's streams and events, all or none (held, device current).
std::string MakeWindowStreams(StreamWindow& w) {
  StreamWindow made;
  cu::Result e = cu::StreamCreateNonBlocking(&made.in);
  if (e == cu::kSuccess) e = cu::StreamCreateNonBlocking(&made.out);
  if (e == cu::kSuccess) e = cu::EventCreate(&made.enqueued);
  for (int b = 0; b < kMaxStreamBuffers && e == cu::kSuccess; ++b) {
    e = cu::EventCreate(&made.loaded[b]);
    if (e == cu::kSuccess) e = cu::EventCreate(&made.computed[b]);
    if (e == cu::kSuccess) e = cu::EventCreate(&made.drained[b]);
  }
  if (e != cu::kSuccess) {
    for (cu::Event* events : {made.loaded, made.computed, made.drained}) {
      for (int b = 0; b < kMaxStreamBuffers; ++b) {
        if (events[b] != nullptr) cu::EventDestroy(events[b]);
      }
    }
    if (made.enqueued != nullptr) cu::EventDestroy(made.enqueued);
    if (made.out != nullptr) cu::StreamDestroy(made.out);
    if (made.in != nullptr) cu::StreamDestroy(made.in);
    return CudaMessage("making the streaming window's streams", e);
  }
  w.in = made.in;
  w.out = made.out;
  w.enqueued = made.enqueued;
  std::copy(made.loaded, made.loaded + kMaxStreamBuffers, w.loaded);
  std::copy(made.computed, made.computed + kMaxStreamBuffers, w.computed);
  std::copy(made.drained, made.drained + kMaxStreamBuffers, w.drained);
  return "";
}

// Frees the window's buffers once the copies and kernels that use them have
// run (held, device current).
void FreeWindowBuffers(StreamWindow& w) {
  if (w.base == nullptr) return;
  for (int b = 0; b < w.buffers; ++b) {
    cu::EventSynchronize(w.loaded[b]);
    cu::EventSynchronize(w.computed[b]);
    cu::EventSynchronize(w.drained[b]);
  }
  cu::MemFree(w.base);
  w.base = nullptr;
}

// Gives the device's window (held) the configured shape, which it returns in
// *shape. False when streaming is off or free device memory has no room for
// the window now.
std::string ReadyWindow(StreamWindow& w, StreamShape* shape, bool* ready) {
  *ready = false;
  uint64_t word = g_stream_shape.load();
  *shape = UnpackShape(word);
  size_t chunk = shape->chunk_bytes;
  int buffers = shape->buffers;
  if (word == 0) {
    FreeWindowBuffers(w);
    return "";
  }
  if (w.in == nullptr) {
    if (std::string error = MakeWindowStreams(w); !error.empty()) return error;
  }
  if (w.base != nullptr && w.chunk_bytes == chunk && w.buffers == buffers) {
    *ready = true;
    return "";
  }
  FreeWindowBuffers(w);  // reshaped
  std::lock_guard<std::mutex> placement(g_placement_mu);
  if (!FreeMemoryAllows(chunk * buffers)) return "";
  void* p = nullptr;
  if (cu::MemAlloc(&p, chunk * buffers) != cu::kSuccess) return "";
  w.base = static_cast<char*>(p);
  w.chunk_bytes = chunk;
  w.buffers = buffers;
  w.next = 0;
  *ready = true;
  return "";
}

// Which leaves of a paged call lie (in part) in host RAM: those a step
// streams.
std::vector<bool> HostLeaves(const Slot& slot, const DecodedPagedUpdate& u) {
  std::vector<bool> host(u.chunk.leaves, false);
  if (slot.memory.empty()) return host;
  const Memory& m = slot.memory[0];  // the arena
  for (size_t i = 0; i < host.size(); ++i) {
    size_t leaf = u.chunk.first() + i;
    host[i] = m.HostPart(slot.arena + slot.offsets[leaf], slot.arena + slot.offsets[leaf + 1]);
  }
  return host;
}

// The update of a step whose leaves with host_leaves[i] set are streamed
// (above), the others updated where they lie; *streamed is false (and nothing
// enqueued) when the window cannot be had.
ffi::Error StreamedUpdate(const char* op, cu::Stream stream, int device,
                          const std::vector<LeafCall>& calls, const std::vector<LeafSpec>& layout,
                          const std::vector<StepState>& states,
                          const std::vector<bool>& host_leaves, StepArgs args, int num_sms,
                          Slot& slot, bool* streamed) {
  *streamed = false;
  StreamWindow& w = g_windows[device];
  std::lock_guard<std::mutex> lock(w.mu);
  StreamShape shape;
  bool ready = false;
  if (std::string error = ReadyWindow(w, &shape, &ready); !error.empty()) {
    return ffi::Error::Internal(std::string(op) + ": " + error);
  }
  if (!ready) return ffi::Error::Success();
  std::vector<StreamChunk> chunks = PlanChunks(calls, layout, states, host_leaves, w);
  if (chunks.empty()) return ffi::Error::Success();
  std::vector<int64_t> unused;
  auto resident = BuildTables(calls, layout, states, true, &unused, /*by_type=*/true, &host_leaves);
  cu::Event written;
  if (auto e = WriteBackEvent(op, slot, &written); e.failure()) return e;
  // Should a driver call fail part way, copies out already enqueued still
  // write to the slot (or to a stage's XLA buffer): `written` is recorded
  // behind them all the same, and XLA's stream waits for them, so that
  // nothing reads, reuses or frees that memory before they end.
  struct OnFailure {
    cu::Event written;
    cu::Stream out, xla;
    bool armed = true;
    ~OnFailure() {
      if (armed && cu::EventRecord(written, out) == cu::kSuccess) {
        cu::StreamWaitEvent(xla, written);
      }
    }
  } on_failure{written, w.out, stream};
  // The copies in read what the slot's previous write-back wrote, and what
  // XLA's stream wrote to the slot before this call: an import (a restored
  // checkpoint), the commit of a step of several calls, a fresh state's
  // zeros, a step that was not streamed. So they start after both.
  RETURN_IF_CUDA_FAILED(op, "ordering the copies in", cu::StreamWaitEvent(w.in, written));
  RETURN_IF_CUDA_FAILED(op, "cuEventRecord", cu::EventRecord(w.enqueued, stream));
  RETURN_IF_CUDA_FAILED(op, "ordering the copies in", cu::StreamWaitEvent(w.in, w.enqueued));
  // The SMs are shared out: an update CTA takes a whole SM's registers, so an
  // update launched on every SM would wait for SMs that copies hold, and the
  // next copies behind it. The copies in and out get a CTA each on a quarter
  // of the SMs at most, and the updates the SMs left (on an H100 the split
  // measured the same as none: benchmarks/RESULTS.md).
  // A pinned state is moved by the copy engines, and the updates get every SM.
  bool engines = slot.memory[0].pinned;
  int copy_ctas = shape.copy_ctas > 0 ? std::min(shape.copy_ctas, std::max(1, num_sms / 2 - 1))
                                      : std::max(1, std::min(kCopyCtas, num_sms / 4));
  int update_sms = engines ? num_sms : std::max(1, num_sms - 2 * copy_ctas);
  auto copy = [&](const std::vector<CopyRange>& ranges, cu::Stream on) -> ffi::Error {
    if (!engines) {
      RETURN_IF_LAUNCH_FAILED(op, cu::LaunchCopies(ranges, copy_ctas, on));
      return ffi::Error::Success();
    }
    for (const CopyRange& r : ranges) {
      RETURN_IF_CUDA_FAILED(op, "cuMemcpyAsync of a chunk",
                            cu::MemcpyAsync(r.to, r.from, r.bytes, on));
    }
    return ffi::Error::Success();
  };
  auto copy_in = [&](const StreamChunk& c) -> ffi::Error {
    RETURN_IF_CUDA_FAILED(op, "ordering a chunk's copy in",
                          cu::StreamWaitEvent(w.in, w.drained[c.buffer]));
    if (auto e = copy(c.in, w.in); e.failure()) return e;
    RETURN_IF_CUDA_FAILED(op, "cuEventRecord", cu::EventRecord(w.loaded[c.buffer], w.in));
    return ffi::Error::Success();
  };
  size_t buffers = static_cast<size_t>(w.buffers);
  for (size_t k = 0; k < std::min(chunks.size(), buffers); ++k) {
    if (auto e = copy_in(chunks[k]); e.failure()) return e;
  }
  args.write_count = false;
  for (const auto& table : resident) {
    if (table->num_leaves == 0) continue;
    RETURN_IF_LAUNCH_FAILED(op, cu::LaunchUpdate(*table, args, update_sms, stream));
  }
  size_t bytes_in = 0;
  for (size_t k = 0; k < chunks.size(); ++k) {
    const StreamChunk& c = chunks[k];
    RETURN_IF_CUDA_FAILED(op, "ordering a chunk's update",
                          cu::StreamWaitEvent(stream, w.loaded[c.buffer]));
    args.write_count = k + 1 == chunks.size();
    RETURN_IF_LAUNCH_FAILED(op, cu::LaunchUpdate(*c.table, args, update_sms, stream));
    RETURN_IF_CUDA_FAILED(op, "cuEventRecord", cu::EventRecord(w.computed[c.buffer], stream));
    RETURN_IF_CUDA_FAILED(op, "ordering a chunk's copy out",
                          cu::StreamWaitEvent(w.out, w.computed[c.buffer]));
    if (auto e = copy(c.out, w.out); e.failure()) return e;
    RETURN_IF_CUDA_FAILED(op, "cuEventRecord", cu::EventRecord(w.drained[c.buffer], w.out));
    if (k + buffers < chunks.size()) {
      if (auto e = copy_in(chunks[k + buffers]); e.failure()) return e;
    }
    bytes_in += c.bytes_in;
  }
  RETURN_IF_CUDA_FAILED(op, "cuEventRecord", cu::EventRecord(written, w.out));
  on_failure.armed = false;
  w.next = static_cast<int>((w.next + chunks.size()) % buffers);
  // A stage of a step of several calls writes to its staged result, which
  // XLA hands to the next call: XLA's stream waits for those copies.
  for (size_t i = 0; i < states.size(); ++i) {
    if (host_leaves[i] && states[i].out.state1 != states[i].in.state1) {
      RETURN_IF_CUDA_FAILED(op, "ordering the staged moments",
                            cu::StreamWaitEvent(stream, written));
      break;
    }
  }
  slot.streaming += bytes_in;
  *streamed = true;
  return ffi::Error::Success();
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
                      bool write_params, Slot* slot = nullptr,
                      const std::vector<bool>* host_leaves = nullptr) {
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
  if (slot != nullptr && host_leaves != nullptr && block_wise &&
      std::find(host_leaves->begin(), host_leaves->end(), true) != host_leaves->end()) {
    bool streamed = false;
    if (auto e = StreamedUpdate(op, stream, device, calls, layout, states, *host_leaves, args,
                                num_sms, *slot, &streamed);
        e.failure() || streamed) {
      return e;
    }
  }
  // The kernel reads every leaf where it lies (host RAM over the bus), after
  // any write-back of an earlier streamed step.
  if (slot != nullptr) {
    if (auto e = AwaitWriteBack(op, *slot, stream); e.failure()) return e;
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
  std::vector<bool> host_leaves = HostLeaves(*slot, u);
  if (u.chunk.first() == 0) slot->streaming = 0;
  if (auto e = LaunchStep(op, stream, device, scratch, u.call.leaves, u.call.layout,
                          CallStates(*slot, u), hyper, qmaps, rings, rings_out->typed_data(),
                          u.call.norms, count_out->typed_data(), u.chunk.CountAfter(host.count),
                          handle_write, t, percentile, block_wise, write_params, slot.get(),
                          &host_leaves);
      e.failure()) {
    return e;
  }
  if (!u.chunk.commit()) return ffi::Error::Success();
  if (slot->streaming > 0) {
    slot->streamed_steps += 1;
    slot->streamed_bytes = slot->streaming;
  }
  std::vector<ArenaCopy> staged = StagedCopies(*slot, u);
  if (!staged.empty()) {  // over memory the write-back may still be copying to
    if (auto e = AwaitWriteBack(op, *slot, stream); e.failure()) return e;
  }
  for (const ArenaCopy& c : staged) {
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
  if (slot) {
    if (auto e = AwaitWriteBack(op, *slot, stream); e.failure()) return e;
  }
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
    if (cu::Result e = WaitForWriteBack(*slot, stream); e != cu::kSuccess) {
      *error = CudaMessage("waiting for the state's write-back", e);
      return moved;
    }
    for (Memory& m : slot->memory) {
      if (m.device_bytes == 0 || m.on_host == to_host) continue;
      std::lock_guard<std::mutex> placement(g_placement_mu);
      if (!to_host && !FreeMemoryAllows(m.device_bytes)) {
        *error = "page_in: not enough free device memory for " + std::to_string(m.device_bytes) +
                 " more bytes of optimizer state; it stays on the host, and the next update "
                 "brings back what fits and streams the rest from host RAM rather than "
                 "oversubscribe";
        return moved;
      }
      cu::Result e = cu::MemPrefetchAsync(
          m.data, m.device_bytes, to_host ? HostLocation() : DeviceLocation(slot->device), stream);
      if (e != cu::kSuccess) {
        *error = CudaMessage("cuMemPrefetchAsync", e);
        return moved;
      }
      m.on_host = to_host;
      moved += m.device_bytes;
    }
    cu::Result e = cu::StreamSynchronize(stream);
    if (e != cu::kSuccess) {
      *error = CudaMessage("paging", e);
      return moved;
    }
  }
  return moved;
}

// -- the eviction watch ------------------------------------------------------------
//
// A spike (another process, JAX arrays under an allocator that does not
// preallocate, a plain cudaMalloc) that needs more than free memory makes the
// driver evict managed pages, and the state's are among them. The step after
// the spike finds the sign (MakeResident) and prefetches them back, but the
// driver brings evicted pages back more slowly than paged-out ones
// (benchmarks/RESULTS.md), and that step pays for it. A spike is usually gone
// well before the next step (an evaluation pass, a checkpoint's buffers), so
// a thread looks for the same sign between steps and prefetches the evicted
// pages while the device is idle or busy with other work: by the next step
// the state is on the device again.
//
// Every kWatchInterval, for each device with device-placed state: one
// cuMemGetInfo. A slot whose free memory at its last step (device_free_seen)
// is exceeded by the step's sign is prefetched back on the paging stream,
// when the device was seen full since the last look (free memory below a
// thirty-second of it: the driver evicts only then) or the slot has had no
// step for kWatchIdleSeconds (eviction_sign.h). Free memory also rises when
// XLA's allocator hands a step's buffers back; a slot stepped more often than
// that is left to its steps' own check then. A false sign costs a prefetch of
// pages already there (the driver's walk, on this thread), at most once
// between two of the slot's steps (the restore clears device_free_seen; only
// a step sets it).
// The prefetch is not waited for: the slot's write-back event marks its end,
// and the next step (restore_pending), paging and freeing wait for that. The
// slot's lock is only tried: a call holding it is left alone, and the slot
// looked at again next time. Paged-out, retired and pinned memory is never
// touched (it is not device-homed, or on the host by request).
//
// The watch's state lives on the heap and is never destroyed: a process may
// exit without stopping the thread (set_eviction_watch(False) stops and
// joins it, as Python's exit does), and a forked child, which has no thread
// and may have inherited a held lock, starts from a fresh one.
constexpr auto kWatchInterval = std::chrono::milliseconds(20);
constexpr auto kWatchIdleInterval = std::chrono::milliseconds(200);  // nothing placed

struct EvictionWatchState {
  std::mutex mu;
  std::condition_variable cv;
  bool enabled = true;
  bool stop = false;
  std::thread* thread = nullptr;  // running when not null (owned; joined by stop)
};
EvictionWatchState* g_watch = new EvictionWatchState;
std::atomic<bool> g_watch_running{false};

// Prefetches back the evicted memory of `device`'s slots that show the sign at
// `free_now` (`full`: the device was full since the last look). Returns false
// when a slot was busy (looked at again next time).
bool RestoreEvicted(int device, size_t free_now, bool full) {
  bool all_seen = true;
  Clock::time_point now = Clock::now();
  for (auto& slot : Registry::Global().AllSlots()) {
    if (slot->platform != Platform::kCuda || slot->device != device) continue;
    std::unique_lock<std::mutex> lock(slot->mu, std::try_to_lock);
    if (!lock.owns_lock()) {
      all_seen = false;
      continue;
    }
    double idle_s = std::chrono::duration<double>(now - slot->device_free_seen_at).count();
    if (!WatchRestores(PlacedOnDevice(*slot), slot->device_free_seen, free_now, full, idle_s)) {
      continue;
    }
    cu::Stream stream = PagingStream(device);
    cu::Result e = WaitForWriteBack(*slot, stream);
    for (const Memory& m : slot->memory) {
      if (e != cu::kSuccess) break;
      if (m.on_host || m.device_bytes == 0) continue;
      e = cu::MemPrefetchAsync(m.data, m.device_bytes, DeviceLocation(device), stream);
    }
    cu::Event done = nullptr;
    if (e == cu::kSuccess && WriteBackEvent("eviction watch", *slot, &done).failure()) {
      e = cu::StreamSynchronize(stream);  // no event: wait here instead
      done = nullptr;
    }
    if (e == cu::kSuccess && done != nullptr) e = cu::EventRecord(done, stream);
    // A failure leaves the pages where they are: the next step's own check
    // finds the sign and prefetches (and reports what fails).
    if (e != cu::kSuccess) continue;
    slot->restore_pending = done != nullptr;
    slot->device_free_seen = 0;
    slot->evictions_restored += 1;
  }
  return all_seen;
}

void WatchEvictions(EvictionWatchState* w) {
  bool full[kMaxDevices] = {};
  for (;;) {
    bool placed_anywhere = false;
    for (int device = 0; device < kMaxDevices; ++device) {
      if (g_device_bytes[device].load() <= 0) {
        full[device] = false;
        continue;
      }
      placed_anywhere = true;
      DeviceScope scope(device);
      size_t free_now = 0, total = 0;
      if (cu::MemGetInfo(&free_now, &total) != cu::kSuccess) continue;
      if (DeviceFull(free_now, total)) {
        full[device] = true;
      } else if (RestoreEvicted(device, free_now, full[device])) {
        full[device] = false;
      }
    }
    std::unique_lock<std::mutex> lock(w->mu);
    w->cv.wait_for(lock, placed_anywhere ? kWatchInterval : kWatchIdleInterval,
                   [w] { return w->stop; });
    if (w->stop) return;
  }
}

void ForgetWatchInChild() {
  g_watch = new EvictionWatchState;  // the parent's may be locked; its thread is not here
  g_watch_running = false;
}

void EnsureEvictionWatch() {
  if (g_watch_running.load()) return;
  static std::once_flag fork_handler;
  std::call_once(fork_handler, [] { pthread_atfork(nullptr, nullptr, ForgetWatchInChild); });
  EvictionWatchState* w = g_watch;
  std::lock_guard<std::mutex> lock(w->mu);
  if (!w->enabled || w->thread != nullptr) return;
  w->stop = false;
  w->thread = new std::thread(WatchEvictions, w);
#ifdef __linux__
  // Named for debuggers and profilers (at most 15 characters).
  pthread_setname_np(w->thread->native_handle(), "paged8bit watch");
#endif
  g_watch_running = true;
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
    if (cu::Result e = WaitForWriteBack(*slot, PagingStream(slot->device)); e != cu::kSuccess) {
      *error = CudaMessage("waiting for the state's write-back", e);
      return r;
    }
    // The probe may make the driver take device memory (SeenAfterProbe).
    size_t free_before = 0, free_after = 0, total = 0;
    bool counted = cu::MemGetInfo(&free_before, &total) == cu::kSuccess;
    SlotProbe probe;
    *error = ProbeSlot(*slot, PagingStream(slot->device), &probe);
    if (!error->empty()) return r;
    if (counted && cu::MemGetInfo(&free_after, &total) == cu::kSuccess) {
      slot->device_free_seen = SeenAfterProbe(slot->device_free_seen, free_before, free_after);
    }
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

void SetEvictionWatch(bool on) {
  EvictionWatchState* w = g_watch;
  std::thread* thread = nullptr;
  {
    std::lock_guard<std::mutex> lock(w->mu);
    w->enabled = on;
    if (!on) {
      w->stop = true;
      std::swap(thread, w->thread);
    }
  }
  w->cv.notify_all();
  if (thread != nullptr) {
    thread->join();
    delete thread;
  }
  if (!on) g_watch_running = false;
}

bool EvictionWatchEnabled() {
  std::lock_guard<std::mutex> lock(g_watch->mu);
  return g_watch->enabled;
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

void SetPinnedHost(bool pinned) { g_pinned_host = pinned; }
void RefusePinnedHost(bool refuse) { g_refuse_pinned = refuse; }
bool PinnedHost() { return g_pinned_host.load(); }

std::string SetStreamWindow(size_t chunk_bytes, int buffers, int copy_ctas) {
  bool off = chunk_bytes == 0 && buffers == 0 && copy_ctas == 0;
  if (!off && (chunk_bytes < kMinStreamChunk || chunk_bytes % kArenaAlign != 0 || buffers < 2 ||
               buffers > kMaxStreamBuffers || copy_ctas < 0 || copy_ctas > 255)) {
    return "set_stream_window: chunk_bytes must be at least 1 MiB and a multiple of 256, buffers "
           "2 to 8 and copy_ctas 0 (the default) to 255 (or all 0: streaming off), got " +
           std::to_string(chunk_bytes) + ", " + std::to_string(buffers) + " and " +
           std::to_string(copy_ctas);
  }
  g_stream_shape = PackShape(chunk_bytes, buffers, copy_ctas);
  // Windows of another shape are freed now (streaming off frees them all),
  // not at the next streamed step, which may never come.
  for (int device = 0; device < kMaxDevices; ++device) {
    StreamWindow& w = g_windows[device];
    std::lock_guard<std::mutex> lock(w.mu);
    if (w.base == nullptr || (w.chunk_bytes == chunk_bytes && w.buffers == buffers)) continue;
    DeviceScope scope(device);
    FreeWindowBuffers(w);
  }
  return "";
}

std::tuple<size_t, int, int> StreamWindowShape() {
  StreamShape shape = UnpackShape(g_stream_shape.load());
  return {shape.chunk_bytes, shape.buffers, shape.copy_ctas};
}

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
