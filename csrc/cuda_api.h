// The CUDA backend's access to the GPU: the CUDA driver API (libcuda, which
// every NVIDIA driver installs) and NVRTC (from JAX's CUDA wheels or a CUDA
// toolkit), both loaded at run time, so that the extension builds with a C++
// compiler alone and imports on any machine. The kernels of cuda_kernels.cu
// are compiled by NVRTC at first use for the GPU at hand and cached on disk.
//
// Only the declarations this backend uses are written here, with the types
// and values of the driver API (cuda.h, CUDA 12.2 and later: managed memory
// advice and prefetch take a CUmemLocation).
#ifndef OPTAX_PAGED8BIT_CUDA_API_H_
#define OPTAX_PAGED8BIT_CUDA_API_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_kernels.h"

namespace optax_paged8bit {
namespace cu {

using Result = int;  // CUresult
constexpr Result kSuccess = 0;
constexpr Result kErrorInvalidValue = 1;
using Device = int;                    // CUdevice
using DevicePtr = unsigned long long;  // CUdeviceptr
struct Context_st;
using Context = Context_st*;  // CUcontext
struct Stream_st;
using Stream = Stream_st*;  // CUstream: XLA's stream as the FFI hands it over
struct Event_st;
using Event = Event_st*;  // CUevent
struct Module_st;
using Module = Module_st*;  // CUmodule
struct Function_st;
using Function = Function_st*;  // CUfunction

struct MemLocation {  // CUmemLocation
  int type;
  int id;
};
MemLocation DeviceLocation(int device);
MemLocation HostLocation();

// The GPU's state of this process, set up at the first use of a device. Every
// function returns "" on success or a message that names the call and the
// driver's reason.
std::string Init();

// The driver functions the backend calls, each with the driver's result.
Result MemAllocManaged(void** p, size_t bytes);
Result MemAlloc(void** p, size_t bytes);
Result MemFree(void* p);  // waits for work in flight that may still touch it
// Page-locked host memory. Under unified addressing (every GPU the backend
// runs on) the GPU reads and writes it at the same address as the host, and
// the copy engines move it at the bus's speed.
Result MemAllocHost(void** p, size_t bytes);
Result MemFreeHost(void* p);
// Waits for all work of the current context (every stream).
Result CtxSynchronize();
Result MemcpyAsync(void* dst, const void* src, size_t bytes, Stream stream);
Result MemsetAsync(void* p, uint8_t value, size_t bytes, Stream stream);
Result MemGetInfo(size_t* free_bytes, size_t* total_bytes);
Result MemAdvisePreferredLocation(void* p, size_t bytes, MemLocation where);
Result MemAdviseAccessedBy(void* p, size_t bytes, MemLocation by);
Result MemPrefetchAsync(void* p, size_t bytes, MemLocation to, Stream stream);
Result StreamSynchronize(Stream stream);
Result StreamCreateNonBlocking(Stream* stream);
Result StreamDestroy(Stream stream);
// Events order work across streams: `stream` waits until `event`'s latest
// record has run. Created without timing.
Result StreamWaitEvent(Stream stream, Event event);
Result EventCreate(Event* event);
Result EventDestroy(Event event);
Result EventRecord(Event event, Stream stream);
Result EventSynchronize(Event event);
Result MultiProcessorCount(int device, int* count);
std::string Message(const char* what, Result result);  // "what failed: reason"

// Makes the primary context of `device` current for the scope (XLA's threads
// have it already; a host call such as page_out may not).
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  Context pushed_ = nullptr;
};

// Where NVRTC is (a path of libnvrtc, or a name the dynamic linker finds) and
// where compiled kernels are cached; set by the Python side at import.
void Configure(const std::string& nvrtc_library, const std::string& cache_dir);

// Compiles the kernels' programs for sm_<arch> (or loads them from the
// cache) without a GPU: all of them, or those in `programs` (their numbers,
// cuda_kernels.cu's OP8_PROGRAM). `paths`: one per program, the CUBIN's path
// ("" for one not asked for or that the cache could not keep); `compiled`:
// whether this call compiled any (false: all found in the cache). For the
// tests and tools.
std::string CompileKernels(int arch, const std::vector<int>* programs,
                           std::vector<std::string>* paths, bool* compiled);

// Compiles or loads at once, on the current device, the kernels a step over
// params of the dtypes in `types` (bit 1 << ElemType each) needs: the update
// kernels of those dtypes and the small kernels. Launches load what they need
// by themselves; this only lets one step's programs compile together.
std::string LoadUpdateKernels(uint32_t types, bool write_params);

// Why the NVRTC in `library` (a path of libnvrtc, or a name the dynamic
// linker finds) cannot compile the kernels, or "" when it can.
std::string NvrtcProblem(const std::string& library);

// "" when a driver of `driver_version` (cuDriverGetVersion's 1000 * major +
// 10 * minor) loads what the configured NVRTC compiles (a driver of NVRTC's
// CUDA major or later), else what to install. Checked before the first compile
// on a device.
std::string DriverProblem(int driver_version);

// The kernel launchers (cuda_kernels.cu's entry points), on `stream`; the
// kernels are compiled or loaded at the first launch on a device. Each
// returns "" or what failed.
std::string LaunchBlockNormSq(const LeafTable& table, double* partials, int num_sms, Stream stream);
std::string LaunchRingScale(const LeafTable& table, const double* partials, float* rings,
                            float* clip_scale, int64_t t, int32_t percentile, Stream stream);
std::string LaunchWholeLeafMax(const LeafTable& table, const StepArgs& args, int num_sms,
                               Stream stream);
std::string LaunchBuildQuantTables(const float* qmaps, QuantTables* tables, Stream stream);
std::string LaunchUpdate(const LeafTable& table, const StepArgs& args, int num_sms, Stream stream);
std::string LaunchLoadLatency(const uint8_t* data, int64_t bytes, uint32_t* cycles, Stream stream);
std::string LaunchStoreWords(const WordStores& stores, Stream stream);
// Copies the ranges (device pointers, or managed memory mapped for the GPU)
// with a kernel of `ctas` CTAs, in launches of kMaxCopyRanges.
std::string LaunchCopies(const std::vector<CopyRange>& ranges, int ctas, Stream stream);

}  // namespace cu
}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_CUDA_API_H_
