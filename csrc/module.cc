// The extension module `optax_paged8bit._ops`: the FFI handlers of every
// backend that was built, and the registry's host-side controls.
//
// One module holds both backends so that they share one registry. The CUDA
// backend needs no CUDA library to import: it loads the driver and NVRTC when
// a GPU first runs one of its calls (cuda_api.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "cpu_ops.h"
#include "cuda_api.h"
#include "cuda_ops.h"
#include "ffi_common.h"
#include "registry.h"
#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

namespace optax_paged8bit {
namespace {

template <typename T>
py::capsule EncapsulateHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "Encapsulated function must be an XLA FFI handler");
  return py::capsule(reinterpret_cast<void*>(fn));
}

py::dict CpuRegistrations() {
  py::dict d;
  d[kUpdateTarget] = EncapsulateHandler(kUpdateCpu);
  d[kUpdateArraysTarget] = EncapsulateHandler(kUpdateArraysCpu);
  d[kExportTarget] = EncapsulateHandler(kExportCpu);
  d[kImportTarget] = EncapsulateHandler(kImportCpu);
  d[kBlockNormsTarget] = EncapsulateHandler(kBlockNormsCpu);
  return d;
}

py::dict CudaRegistrations() {
  py::dict d;
  d[kUpdateTarget] = EncapsulateHandler(kUpdateCuda);
  d[kUpdateArraysTarget] = EncapsulateHandler(kUpdateArraysCuda);
  d[kExportTarget] = EncapsulateHandler(kExportCuda);
  d[kImportTarget] = EncapsulateHandler(kImportCuda);
  d[kBlockNormsTarget] = EncapsulateHandler(kBlockNormsCuda);
  return d;
}

// Bytes of every slot of a handle, one dict per (platform, device).
py::list SlotInfo(int32_t handle) {
  std::vector<std::shared_ptr<Slot>> slots;
  std::string error = Registry::Global().SlotsOf(handle, &slots);
  if (!error.empty()) throw py::value_error(error);
  py::list out;
  for (const auto& slot : slots) {
    py::dict d;
    d["platform"] = PlatformName(slot->platform);
    d["device"] = slot->device;
    d["step"] = slot->step;
    d["layout_key"] = slot->layout_key;
    size_t on_host = 0, pinned = 0;
    for (const Memory& m : slot->memory) {
      on_host += m.bytes_on_host();
      pinned += m.pinned ? m.bytes : 0;
    }
    d["bytes"] = slot->bytes();
    d["bytes_on_host"] = on_host;
    d["bytes_on_device"] = slot->bytes() - on_host;
    d["evictions_seen"] = slot->evictions_seen;
    d["evictions_restored"] = slot->evictions_restored;
    d["streamed_steps"] = slot->streamed_steps;
    d["streamed_bytes"] = slot->streamed_bytes;
    d["bytes_pinned"] = pinned;
    out.append(d);
  }
  return out;
}

}  // namespace
}  // namespace optax_paged8bit

PYBIND11_MODULE(_ops, m) {
  using namespace optax_paged8bit;
  m.doc() = "XLA FFI handlers and state registry of optax_paged8bit.";
  m.def("cpu_registrations", &CpuRegistrations, "FFI target name -> CPU handler capsule.");
  m.def("cuda_registrations", &CudaRegistrations, "FFI target name -> CUDA handler capsule.");
  m.attr("built_with_cuda") = true;
  // The XLA FFI API version of the headers this was built against: XLA runs
  // handlers of its own major version and of its minor version or older.
  m.attr("ffi_api_version") = pybind11::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.def(
      "configure_cuda",
      [](const std::string& nvrtc_library, const std::string& cache_dir) {
        cu::Configure(nvrtc_library, cache_dir);
      },
      "Where NVRTC is and where compiled kernels are cached (before any GPU call).");
  m.def(
      "compile_kernels",
      [](int arch, std::optional<std::vector<int>> programs) {
        std::vector<std::string> paths;
        bool compiled = false;
        std::string error;
        {
          py::gil_scoped_release unlocked;
          error = cu::CompileKernels(arch, programs ? &*programs : nullptr, &paths, &compiled);
        }
        if (!error.empty()) throw std::runtime_error(error);
        return py::make_tuple(py::cast(paths), compiled);
      },
      py::arg("arch"), py::arg("programs") = py::none(),
      "Compiles the CUDA kernels for sm_<arch> with NVRTC, or finds them in the cache, with no "
      "GPU needed: all programs, or those listed (0: the small kernels; 1-3 the fused step's "
      "update for float32, bfloat16, float16; 4-6 the optax path's); returns (the CUBINs' "
      "paths, one per program, '' for one not asked for or that the cache could not keep; "
      "whether this call compiled any).");
  m.def("nvrtc_problem", &cu::NvrtcProblem,
        "Why the NVRTC at this path could not compile the kernels, or ''.");
  m.def(
      "driver_problem",
      [](int driver_version) {
        py::gil_scoped_release unlocked;
        return cu::DriverProblem(driver_version);
      },
      "Why a driver of this version (1000 * major + 10 * minor) could not run the kernels the "
      "configured NVRTC compiles, or ''.");
  m.def(
      "release",
      [](int32_t handle) {
        py::gil_scoped_release unlocked;  // waits for a call using the state
        return Registry::Global().Release(handle);
      },
      "Frees every slot of a handle and tombstones it; returns the bytes freed.");
  m.def("is_released", [](int32_t handle) { return Registry::Global().IsReleased(handle); });
  m.def(
      "epoch", [] { return Registry::Global().Epoch(); },
      "Marks the start of the collector's scan for held handles.");
  m.def(
      "collect",
      [](const std::vector<int32_t>& held, const std::vector<int32_t>& candidates, uint64_t mark,
         int mode, double grace_min_s, double grace_intervals) {
        Registry::Outcome outcome;
        {
          py::gil_scoped_release unlocked;  // freeing waits for calls using the slots
          Registry::Decision decision{static_cast<Registry::Mode>(mode), grace_min_s,
                                      grace_intervals};
          outcome = Registry::Global().Collect(held, candidates, mark, decision);
        }
        return py::make_tuple(outcome.freed, outcome.busy, outcome.retired, outcome.due,
                              outcome.calls_running);
      },
      "Decides on the candidate handles that are not held (mode 0: free them; 1: retire "
      "them; 2: retire them and free the retired ones whose grace is over); returns (bytes "
      "freed, candidates in use, handles newly retired, retired handles due, whether a call "
      "was in progress).");
  m.def(
      "idle_handles",
      [](double idle_s, double idle_intervals, double recheck_s, double grace_min_s,
         double grace_intervals) {
        double next_s = -1;
        Registry::Decision decision{Registry::Mode::kRetire, grace_min_s, grace_intervals};
        std::vector<int32_t> idle =
            Registry::Global().IdleHandles(idle_s, idle_intervals, recheck_s, decision, &next_s);
        return py::make_tuple(idle, next_s);
      },
      "(handles worth a scan now, seconds until another one is or -1).");
  m.def(
      "call_begins", [] { return Registry::Global().CallBegins(); },
      "Marks a call in progress (tests; handlers use CallScope).");
  m.def(
      "call_ends", [](uint64_t begun) { Registry::Global().CallEnds(begun); },
      "Ends what call_begins marked.");
  m.def(
      "is_retired", [](int32_t handle) { return Registry::Global().IsRetired(handle); },
      "Whether the collector retired a handle (found unheld, not yet freed).");
  m.def(
      "request_scan", [] { Registry::Global().RequestScan(); },
      "Wakes the collector's thread (safe from a garbage-collector callback).");
  m.def(
      "wait_for_scan_request",
      [](double timeout_s) {
        py::gil_scoped_release unlocked;
        return Registry::Global().WaitForScanRequest(timeout_s);
      },
      "Waits for request_scan or the timeout (forever when negative); returns whether asked.");
  m.def(
      "handles_with_slots", [] { return Registry::Global().HandlesWithSlots(); },
      "Handles that hold memory now.");
  m.def("slot_info", &SlotInfo, "Per-slot bytes and step of a handle.");
  m.def(
      "check_call",
      [](const std::string& call, uint32_t handle_bits, int64_t layout_key,
         const std::string& platform, int device, int64_t count, const std::vector<int64_t>& sizes,
         const std::vector<int32_t>& flags, bool block_wise) {
        std::vector<LeafSpec> layout;
        for (size_t i = 0; i < sizes.size(); ++i) {
          bool is_8bit = (flags[i] & kLeaf8bit) != 0;
          layout.push_back(LeafSpec{sizes[i], is_8bit, NumScales(sizes[i], is_8bit, block_wise)});
        }
        Platform p = platform == "cpu" ? Platform::kCpu : Platform::kCuda;
        Registry::Request request = MakeRequest(handle_bits, layout_key, p, device, layout);
        if (call == "update") return Registry::Global().CheckUpdate(request, count);
        if (call == "export") return Registry::Global().CheckRead(request, count);
        throw std::invalid_argument("check_call: call must be 'update' or 'export', got " + call);
      },
      "The error an update or export of this state would fail with, or '' (host-side "
      "pre-check).");
  m.def(
      "total_bytes", [] { return Registry::Global().TotalBytes(); },
      "Bytes held by all live slots.");
  auto paging = [](size_t (*move)(int32_t, std::string*)) {
    return [move](int32_t handle) {
      std::string error;
      size_t moved;
      {
        py::gil_scoped_release release;
        moved = move(handle, &error);
      }
      if (!error.empty()) throw py::value_error(error);
      return moved;
    };
  };
  m.def("page_out", paging(&PageOut), "Moves a handle's GPU slots to host RAM; returns bytes.");
  m.def("page_in", paging(&PageIn),
        "Moves a handle's GPU slots back to their GPUs; returns bytes.");
  m.def("retire", paging(&Retire),
        "The collector's page_out of a retired handle (not a use of it); returns bytes.");
  m.def(
      "measure_residency",
      [](int32_t handle) {
        std::string error;
        ResidencyMeasure r;
        {
          py::gil_scoped_release release;
          r = MeasureResidency(handle, &error);
        }
        if (!error.empty()) throw py::value_error(error);
        return py::make_tuple(r.bytes_on_device, r.bytes_on_host, r.device_cycles, r.host_cycles);
      },
      "(bytes on device, bytes on host, device and host load cycles) of a handle's CUDA slots, "
      "measured by timed loads.");
  m.def(
      "fill_device_memory",
      [](int device, size_t chunk_bytes, size_t limit_bytes) {
        py::gil_scoped_release release;
        return FillDeviceMemory(device, chunk_bytes, limit_bytes);
      },
      "Holds plain device allocations until one fails or the limit is reached (tests and "
      "benchmarks: a memory spike); returns the bytes held.");
  m.def("free_device_fill", &FreeDeviceFill, "Frees what fill_device_memory holds.");
  m.def("set_device_budget", &SetDeviceBudget, "Caps managed bytes placed per GPU (-1: none).");
  m.def("device_budget", &DeviceBudget);
  m.def("managed_device_bytes", &ManagedDeviceBytes, "Managed bytes placed on a GPU now.");
  m.def("set_pinned_host", &SetPinnedHost,
        "Whether states with no room on their GPU go to page-locked host memory (else managed).");
  m.def("pinned_host", &PinnedHost);
  m.def("refuse_pinned_host", &RefusePinnedHost,
        "Tests: act as if cuMemAllocHost failed (the state falls back to managed memory).");
  m.def("set_eviction_watch", &SetEvictionWatch, py::call_guard<py::gil_scoped_release>(),
        "Whether a thread restores GPU state evicted by a memory spike between steps; off "
        "stops and joins it.");
  m.def("eviction_watch", &EvictionWatchEnabled);
  m.def(
      "set_stream_window",
      [](size_t chunk_bytes, int buffers, int copy_ctas) {
        std::string error = SetStreamWindow(chunk_bytes, buffers, copy_ctas);
        if (!error.empty()) throw py::value_error(error);
      },
      py::arg("chunk_bytes"), py::arg("buffers"), py::arg("copy_ctas") = 0,
      "Shapes the device window that streams state in host RAM: buffers x chunk_bytes, and "
      "the CTAs of each copy kernel (0: a quarter of the SMs up to 32) (0, 0: streaming off, "
      "the kernel reads such state over the bus).");
  m.def(
      "stream_window", [] { return StreamWindowShape(); },
      "(chunk_bytes, buffers, copy_ctas) of the streaming window.");
  m.def(
      "device_memory_info",
      [](int device) {
        std::string error = cu::Init();
        if (!error.empty()) throw std::runtime_error(error);
        size_t free_bytes = 0, total_bytes = 0;
        cu::Result e;
        {
          cu::DeviceScope scope(device);
          e = cu::MemGetInfo(&free_bytes, &total_bytes);
        }
        if (e != cu::kSuccess) throw std::runtime_error(cu::Message("cuMemGetInfo", e));
        return py::make_tuple(free_bytes, total_bytes);
      },
      "(free, total) bytes of a GPU, as cuMemGetInfo reports them.");
}
