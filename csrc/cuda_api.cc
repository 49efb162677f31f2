// The CUDA driver API and NVRTC, loaded at run time (cuda_api.h), and the
// kernels: compiled by NVRTC for the GPU at hand, cached on disk, launched.
#include "cuda_api.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kernel_sources.h"

namespace optax_paged8bit {
namespace cu {
namespace {

// -- the driver --------------------------------------------------------------------

// The values of cuda.h this file uses.
constexpr int kMemAttachGlobal = 1;                // CU_MEM_ATTACH_GLOBAL
constexpr int kAdviseSetPreferredLocation = 3;     // CU_MEM_ADVISE_SET_PREFERRED_LOCATION
constexpr int kAdviseSetAccessedBy = 5;            // CU_MEM_ADVISE_SET_ACCESSED_BY
constexpr int kMemLocationTypeDevice = 1;          // CU_MEM_LOCATION_TYPE_DEVICE
constexpr int kMemLocationTypeHost = 2;            // CU_MEM_LOCATION_TYPE_HOST
constexpr int kStreamNonBlocking = 1;              // CU_STREAM_NON_BLOCKING
constexpr int kEventDisableTiming = 2;             // CU_EVENT_DISABLE_TIMING
constexpr int kAttributeMultiprocessorCount = 16;  // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
constexpr int kAttributeComputeCapabilityMajor = 75;
constexpr int kAttributeComputeCapabilityMinor = 76;

// Each entry: the symbol libcuda exports (the versioned one where cuda.h maps
// a name to it) and the function's type.
struct Driver {
  Result (*cuInit)(unsigned);
  Result (*cuDriverGetVersion)(int*);
  Result (*cuGetErrorString)(Result, const char**);
  Result (*cuDeviceGet)(Device*, int);
  Result (*cuDeviceGetAttribute)(int*, int, Device);
  Result (*cuDevicePrimaryCtxRetain)(Context*, Device);
  Result (*cuCtxGetCurrent)(Context*);
  Result (*cuCtxPushCurrent)(Context);
  Result (*cuCtxPopCurrent)(Context*);
  Result (*cuCtxGetDevice)(Device*);
  Result (*cuCtxSynchronize)();
  Result (*cuMemAllocManaged)(DevicePtr*, size_t, unsigned);
  Result (*cuMemAlloc)(DevicePtr*, size_t);
  Result (*cuMemFree)(DevicePtr);
  Result (*cuMemAllocHost)(void**, size_t);
  Result (*cuMemFreeHost)(void*);
  Result (*cuMemcpyAsync)(DevicePtr, DevicePtr, size_t, Stream);
  Result (*cuMemsetD8Async)(DevicePtr, unsigned char, size_t, Stream);
  Result (*cuMemGetInfo)(size_t*, size_t*);
  Result (*cuMemAdvise)(DevicePtr, size_t, int, MemLocation);
  Result (*cuMemPrefetchAsync)(DevicePtr, size_t, MemLocation, unsigned, Stream);
  Result (*cuStreamSynchronize)(Stream);
  Result (*cuStreamCreate)(Stream*, unsigned);
  Result (*cuStreamDestroy)(Stream);
  Result (*cuStreamWaitEvent)(Stream, Event, unsigned);
  Result (*cuEventCreate)(Event*, unsigned);
  Result (*cuEventDestroy)(Event);
  Result (*cuEventRecord)(Event, Stream);
  Result (*cuEventSynchronize)(Event);
  Result (*cuModuleLoadData)(Module*, const void*);
  Result (*cuModuleGetFunction)(Function*, Module, const char*);
  Result (*cuLaunchKernel)(Function, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           unsigned, Stream, void**, void**);
};

template <typename F>
bool Bind(void* library, const char* symbol, F* fn, std::string* missing) {
  *fn = reinterpret_cast<F>(dlsym(library, symbol));
  if (*fn == nullptr) *missing += std::string(missing->empty() ? "" : ", ") + symbol;
  return *fn != nullptr;
}

// libcuda's functions, or why they are not there (loaded once).
const Driver* LoadDriver(std::string* error) {
  static std::once_flag once;
  static Driver driver;
  static std::string failure;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      failure = std::string("the NVIDIA driver's libcuda.so.1 could not be loaded (") + dlerror() +
                "); the CUDA backend needs an NVIDIA GPU and its driver";
      return;
    }
    std::string missing;
    Bind(lib, "cuInit", &driver.cuInit, &missing);
    Bind(lib, "cuDriverGetVersion", &driver.cuDriverGetVersion, &missing);
    Bind(lib, "cuGetErrorString", &driver.cuGetErrorString, &missing);
    Bind(lib, "cuDeviceGet", &driver.cuDeviceGet, &missing);
    Bind(lib, "cuDeviceGetAttribute", &driver.cuDeviceGetAttribute, &missing);
    Bind(lib, "cuDevicePrimaryCtxRetain", &driver.cuDevicePrimaryCtxRetain, &missing);
    Bind(lib, "cuCtxGetCurrent", &driver.cuCtxGetCurrent, &missing);
    Bind(lib, "cuCtxPushCurrent_v2", &driver.cuCtxPushCurrent, &missing);
    Bind(lib, "cuCtxPopCurrent_v2", &driver.cuCtxPopCurrent, &missing);
    Bind(lib, "cuCtxGetDevice", &driver.cuCtxGetDevice, &missing);
    Bind(lib, "cuCtxSynchronize", &driver.cuCtxSynchronize, &missing);
    Bind(lib, "cuMemAllocManaged", &driver.cuMemAllocManaged, &missing);
    Bind(lib, "cuMemAlloc_v2", &driver.cuMemAlloc, &missing);
    Bind(lib, "cuMemFree_v2", &driver.cuMemFree, &missing);
    Bind(lib, "cuMemAllocHost_v2", &driver.cuMemAllocHost, &missing);
    Bind(lib, "cuMemFreeHost", &driver.cuMemFreeHost, &missing);
    Bind(lib, "cuMemcpyAsync", &driver.cuMemcpyAsync, &missing);
    Bind(lib, "cuMemsetD8Async", &driver.cuMemsetD8Async, &missing);
    Bind(lib, "cuMemGetInfo_v2", &driver.cuMemGetInfo, &missing);
    Bind(lib, "cuMemAdvise_v2", &driver.cuMemAdvise, &missing);
    Bind(lib, "cuMemPrefetchAsync_v2", &driver.cuMemPrefetchAsync, &missing);
    Bind(lib, "cuStreamSynchronize", &driver.cuStreamSynchronize, &missing);
    Bind(lib, "cuStreamCreate", &driver.cuStreamCreate, &missing);
    Bind(lib, "cuStreamDestroy_v2", &driver.cuStreamDestroy, &missing);
    Bind(lib, "cuStreamWaitEvent", &driver.cuStreamWaitEvent, &missing);
    Bind(lib, "cuEventCreate", &driver.cuEventCreate, &missing);
    Bind(lib, "cuEventDestroy_v2", &driver.cuEventDestroy, &missing);
    Bind(lib, "cuEventRecord", &driver.cuEventRecord, &missing);
    Bind(lib, "cuEventSynchronize", &driver.cuEventSynchronize, &missing);
    Bind(lib, "cuModuleLoadData", &driver.cuModuleLoadData, &missing);
    Bind(lib, "cuModuleGetFunction", &driver.cuModuleGetFunction, &missing);
    Bind(lib, "cuLaunchKernel", &driver.cuLaunchKernel, &missing);
    if (!missing.empty()) {
      failure = "the NVIDIA driver's libcuda.so.1 lacks " + missing +
                " (managed memory placement needs a driver for CUDA 12.2 or later)";
      return;
    }
    Result r = driver.cuInit(0);
    if (r != kSuccess) failure = "cuInit failed with CUDA error " + std::to_string(r);
  });
  if (!failure.empty()) {
    if (error != nullptr) *error = failure;
    return nullptr;
  }
  return &driver;
}

// The driver for the functions below.
const Driver* D() { return LoadDriver(nullptr); }

// Calls a driver function; without a driver, the result says it is not
// initialized (Init says why; the handlers call it first).
constexpr Result kErrorNotInitialized = 3;  // CUDA_ERROR_NOT_INITIALIZED
template <typename F, typename... Args>
Result Call(F Driver::* fn, Args... args) {
  const Driver* d = D();
  return d == nullptr ? kErrorNotInitialized : (d->*fn)(args...);
}

DevicePtr Ptr(const void* p) { return static_cast<DevicePtr>(reinterpret_cast<uintptr_t>(p)); }

constexpr int kMaxDevices = 64;

// -- NVRTC ----------------------------------------------------------------------

using NvrtcResult = int;
using Program = struct Program_st*;

struct Nvrtc {
  NvrtcResult (*nvrtcVersion)(int*, int*);
  const char* (*nvrtcGetErrorString)(NvrtcResult);
  NvrtcResult (*nvrtcCreateProgram)(Program*, const char*, const char*, int, const char* const*,
                                    const char* const*);
  NvrtcResult (*nvrtcCompileProgram)(Program, int, const char* const*);
  NvrtcResult (*nvrtcGetProgramLogSize)(Program, size_t*);
  NvrtcResult (*nvrtcGetProgramLog)(Program, char*);
  NvrtcResult (*nvrtcGetCUBINSize)(Program, size_t*);
  NvrtcResult (*nvrtcGetCUBIN)(Program, char*);
  NvrtcResult (*nvrtcDestroyProgram)(Program*);
  NvrtcResult (*nvrtcGetNumSupportedArchs)(int*);
  NvrtcResult (*nvrtcGetSupportedArchs)(int*);
  int major = 0, minor = 0;
};

std::mutex g_config_mu;
std::string g_nvrtc_library = "libnvrtc.so";  // set by Configure
std::string g_cache_dir;

// NVRTC's functions in `library`, or why it cannot serve (loaded anew).
std::unique_ptr<Nvrtc> OpenNvrtc(const std::string& library, std::string* error) {
  void* lib = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    *error =
        "optax_paged8bit compiles its CUDA kernels at first use with NVRTC, which it could "
        "not load (" +
        library + ": " + dlerror() +
        "). Install JAX with its CUDA wheels (pip install \"jax[cuda13]\" or "
        "\"jax[cuda12]\", which bring nvidia-cuda-nvrtc), or point OPTAX_PAGED8BIT_NVRTC at "
        "a libnvrtc.so.";
    return nullptr;
  }
  auto n = std::make_unique<Nvrtc>();
  std::string missing;
  Bind(lib, "nvrtcVersion", &n->nvrtcVersion, &missing);
  Bind(lib, "nvrtcGetErrorString", &n->nvrtcGetErrorString, &missing);
  Bind(lib, "nvrtcCreateProgram", &n->nvrtcCreateProgram, &missing);
  Bind(lib, "nvrtcCompileProgram", &n->nvrtcCompileProgram, &missing);
  Bind(lib, "nvrtcGetProgramLogSize", &n->nvrtcGetProgramLogSize, &missing);
  Bind(lib, "nvrtcGetProgramLog", &n->nvrtcGetProgramLog, &missing);
  Bind(lib, "nvrtcGetCUBINSize", &n->nvrtcGetCUBINSize, &missing);
  Bind(lib, "nvrtcGetCUBIN", &n->nvrtcGetCUBIN, &missing);
  Bind(lib, "nvrtcDestroyProgram", &n->nvrtcDestroyProgram, &missing);
  Bind(lib, "nvrtcGetNumSupportedArchs", &n->nvrtcGetNumSupportedArchs, &missing);
  Bind(lib, "nvrtcGetSupportedArchs", &n->nvrtcGetSupportedArchs, &missing);
  if (!missing.empty()) {
    *error = library + " is no NVRTC this backend can use (it lacks " + missing +
             "); NVRTC 12.0 or later is needed";
    return nullptr;
  }
  n->nvrtcVersion(&n->major, &n->minor);
  // NVRTC loads its builtins library (libnvrtc-builtins.so.MAJOR.MINOR) by
  // name when it compiles; some of NVIDIA's wheels leave that to the library
  // path, which pip does not set. Loaded here from NVRTC's own folder, it is
  // found by name later.
  size_t slash = library.rfind('/');
  if (slash != std::string::npos) {
    std::string builtins = library.substr(0, slash + 1) + "libnvrtc-builtins.so." +
                           std::to_string(n->major) + "." + std::to_string(n->minor);
    dlopen(builtins.c_str(), RTLD_NOW | RTLD_GLOBAL);  // absent: NVRTC searches as usual
  }
  return n;
}

// The configured NVRTC (Configure), loaded once it loads.
const Nvrtc* LoadNvrtc(std::string* error) {
  static std::mutex mu;
  static std::unique_ptr<Nvrtc> loaded;
  std::lock_guard<std::mutex> lock(mu);
  if (!loaded) {
    std::string library;
    {
      std::lock_guard<std::mutex> config(g_config_mu);
      library = g_nvrtc_library;
    }
    loaded = OpenNvrtc(library, error);
  }
  return loaded.get();
}

// The options NVRTC compiles the kernels with: the results bit-identical to
// the CPU backend need float32 operations exactly as written (no contraction
// into fma) and correctly rounded division and square root (NVRTC's
// defaults, spelled out). -default-device: NVRTC 13.0 takes the kernels'
// generic lambdas for host functions unless told otherwise (13.2 and later
// need no flag, and make the same SASS with it). kOptionsTag names them in the
// cache's file names.
const char* const kOptions[] = {"-std=c++17",       "--fmad=false", "--prec-div=true",
                                "--prec-sqrt=true", "--ftz=false",  "-default-device"};
constexpr char kOptionsTag[] = "o2";

// The oldest GPUs the kernels compile for: sm_80 (Ampere) brought the bfloat16
// conversions they use.
constexpr int kMinArch = 80;

// The kernels compile as kNumPrograms NVRTC programs (cuda_kernels.cu's
// OP8_PROGRAM picks each program's entry points): 0 the small kernels, 1-6 one
// update kernel each (fused step, then optax path; float32, bfloat16,
// float16). A device compiles or loads only the programs its steps need, those
// of one step at once, each on a thread of its own (a program's compile uses
// one core).
constexpr int kNumPrograms = 7;

std::string CachePath(int arch, const Nvrtc& nvrtc, int program) {
  std::lock_guard<std::mutex> lock(g_config_mu);
  return g_cache_dir + "/kernels-" + std::string(kKernelSourceHash).substr(0, 16) + "-sm" +
         std::to_string(arch) + "-nvrtc" + std::to_string(nvrtc.major) + "." +
         std::to_string(nvrtc.minor) + "-" + kOptionsTag + "-p" + std::to_string(program) +
         ".cubin";
}

bool ReadFile(const std::string& path, std::string* data) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  data->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return in.good() || in.eof();
}

// Creates `dir` and its parents; "" or why not.
std::string MakeDirs(const std::string& dir) {
  for (size_t at = 1; at <= dir.size(); ++at) {
    if (at != dir.size() && dir[at] != '/') continue;
    std::string part = dir.substr(0, at);
    if (mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
      return "cannot create " + part + ": " + std::strerror(errno);
    }
  }
  return "";
}

// Writes `data` to `path` so that no reader ever sees part of it: a file of
// its own in the same folder, renamed onto `path` (processes that compile at
// once each rename a whole file). "" or why not.
std::string WriteAtomically(const std::string& path, const std::string& data) {
  static std::atomic<int> counter{0};
  std::string dir = path.substr(0, path.rfind('/'));
  std::string error = MakeDirs(dir);
  if (!error.empty()) return error;
  std::string temp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(++counter);
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) return "cannot write in " + dir + ": " + std::strerror(errno);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!out.good()) {
      std::remove(temp.c_str());
      return "cannot write " + temp;
    }
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    error = "cannot rename a file into " + dir + ": " + std::strerror(errno);
    std::remove(temp.c_str());
    return error;
  }
  return "";
}

// An unwritable cache costs a compile in each process, nothing more: said once
// a process, on stderr.
void WarnCacheUnwritable(const std::string& why) {
  static std::once_flag once;
  std::call_once(once, [&] {
    std::fprintf(stderr,
                 "optax_paged8bit: the compiled CUDA kernels cannot be cached (%s); they were "
                 "compiled in memory and each new process compiles them again. Set "
                 "OPTAX_PAGED8BIT_CACHE_DIR to a writable folder to keep them.\n",
                 why.c_str());
  });
}

// Compiles program `program` for sm_<arch> into `cubin`; "" or what failed.
std::string CompileProgram(const Nvrtc& nvrtc, int arch, int program_index, std::string* cubin) {
  const char* headers[] = {kAdam8bitHeader, kKernelsHeader};
  const char* names[] = {"adam8bit.h", "cuda_kernels.h"};
  Program program = nullptr;
  NvrtcResult r =
      nvrtc.nvrtcCreateProgram(&program, kKernelSource, "cuda_kernels.cu", 2, headers, names);
  if (r != 0) return std::string("nvrtcCreateProgram failed: ") + nvrtc.nvrtcGetErrorString(r);
  std::vector<const char*> options(std::begin(kOptions), std::end(kOptions));
  std::string arch_option = "-arch=sm_" + std::to_string(arch);
  std::string program_option = "-DOP8_PROGRAM=" + std::to_string(program_index);
  options.push_back(arch_option.c_str());
  options.push_back(program_option.c_str());
  r = nvrtc.nvrtcCompileProgram(program, static_cast<int>(options.size()), options.data());
  if (r != 0) {
    size_t size = 0;
    nvrtc.nvrtcGetProgramLogSize(program, &size);
    std::string log(size, '\0');
    if (size > 0) nvrtc.nvrtcGetProgramLog(program, log.data());
    nvrtc.nvrtcDestroyProgram(&program);
    return std::string("NVRTC could not compile the CUDA kernels for ") + arch_option + " (" +
           program_option + "): " + nvrtc.nvrtcGetErrorString(r) + "\n" + log;
  }
  size_t size = 0;
  nvrtc.nvrtcGetCUBINSize(program, &size);
  cubin->assign(size, '\0');
  nvrtc.nvrtcGetCUBIN(program, cubin->data());
  nvrtc.nvrtcDestroyProgram(&program);
  return "";
}

// The CUBINs of the programs in `wanted` for sm_<arch> (cubins and paths hold
// kNumPrograms entries, "" for the others): from the cache, else compiled,
// all missing ones at once (and cached when the cache can be written).
// `compiled`: whether any was compiled.
std::string KernelsCubins(int arch, const std::vector<int>& wanted,
                          std::vector<std::string>* cubins, std::vector<std::string>* paths,
                          bool* compiled) {
  std::string error;
  const Nvrtc* nvrtc = LoadNvrtc(&error);
  if (nvrtc == nullptr) return error;
  if (arch < kMinArch) {
    return "optax_paged8bit's CUDA kernels need a GPU of compute capability " +
           std::to_string(kMinArch / 10) + "." + std::to_string(kMinArch % 10) +
           " (Ampere) or newer; this one is " + std::to_string(arch / 10) + "." +
           std::to_string(arch % 10) +
           ". Keep the optimizer state on the CPU (jax.devices('cpu')) "
           "or use optax.adamw on this GPU.";
  }
  cubins->assign(kNumPrograms, "");
  paths->assign(kNumPrograms, "");
  *compiled = false;
  std::vector<int> missing;
  for (int p : wanted) {
    (*paths)[p] = CachePath(arch, *nvrtc, p);
    if (!ReadFile((*paths)[p], &(*cubins)[p]) || (*cubins)[p].empty()) missing.push_back(p);
  }
  if (missing.empty()) return "";
  int num_archs = 0;
  nvrtc->nvrtcGetNumSupportedArchs(&num_archs);
  std::vector<int> archs(std::max(num_archs, 0));
  if (num_archs > 0) nvrtc->nvrtcGetSupportedArchs(archs.data());
  if (std::find(archs.begin(), archs.end(), arch) == archs.end()) {
    return "NVRTC " + std::to_string(nvrtc->major) + "." + std::to_string(nvrtc->minor) +
           " cannot compile for sm_" + std::to_string(arch) +
           " (this GPU): install JAX's CUDA wheels of a CUDA version that supports it";
  }
  std::vector<std::string> errors(kNumPrograms);
  std::vector<std::thread> threads;
  for (int p : missing) {
    threads.emplace_back([&, p] { errors[p] = CompileProgram(*nvrtc, arch, p, &(*cubins)[p]); });
  }
  for (std::thread& thread : threads) thread.join();
  for (int p : missing) {
    if (!errors[p].empty()) return errors[p];
  }
  *compiled = true;
  for (int p : missing) {
    std::string why = WriteAtomically((*paths)[p], (*cubins)[p]);
    if (!why.empty()) {
      WarnCacheUnwritable(why);
      (*paths)[p].clear();  // not on disk
    }
  }
  return "";
}

// -- the kernels of each device ------------------------------------------------------

enum Kernel : int {
  kBuildQuantTables,
  kBlockNormSq,
  kRingScale,
  kWholeLeafMax,
  kUpdateParamsF32,
  kUpdateParamsBF16,
  kUpdateParamsF16,
  kUpdateUpdatesF32,
  kUpdateUpdatesBF16,
  kUpdateUpdatesF16,
  kStoreWholeScales,
  kStoreWords,
  kLoadLatency,
  kCopyRanges,
  kNumKernels
};
const char* const kKernelNames[kNumKernels] = {
    "op8_build_quant_tables", "op8_block_norm_sq",      "op8_ring_scale",
    "op8_whole_leaf_max",     "op8_update_params_f32",  "op8_update_params_bf16",
    "op8_update_params_f16",  "op8_update_updates_f32", "op8_update_updates_bf16",
    "op8_update_updates_f16", "op8_store_whole_scales", "op8_store_words",
    "op8_load_latency",       "op8_copy_ranges"};
// The program (OP8_PROGRAM) that holds each kernel.
constexpr int kProgramOf[kNumKernels] = {0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0};

// The update kernel for params of `type`.
Kernel UpdateKernel(bool write_params, int32_t type) {
  return static_cast<Kernel>((write_params ? kUpdateParamsF32 : kUpdateUpdatesF32) + type);
}

// A device's loaded programs (null: not yet) and their kernels.
struct Kernels {
  Module modules[kNumPrograms] = {};
  Function functions[kNumKernels] = {};
};

// The current context's device (the caller made it current).
int CurrentDevice() {
  Device device = 0;
  Call(&Driver::cuCtxGetDevice, &device);
  return device;
}

}  // namespace

std::string DriverProblem(int driver_version) {
  std::string error;
  const Nvrtc* nvrtc = LoadNvrtc(&error);
  if (nvrtc == nullptr) return error;
  int major = driver_version / 1000, minor = driver_version % 1000 / 10;
  if (major >= nvrtc->major) return "";
  return "the NVIDIA driver supports CUDA " + std::to_string(major) + "." + std::to_string(minor) +
         ", older than the NVRTC " + std::to_string(nvrtc->major) + "." +
         std::to_string(nvrtc->minor) +
         " that compiles optax_paged8bit's kernels (the CUDA version JAX was installed for). "
         "Install a driver for CUDA " +
         std::to_string(nvrtc->major) + " (CUDA 13 needs driver 580 or newer), or JAX for CUDA " +
         std::to_string(major) + " (pip install \"jax[cuda" + std::to_string(major) + "]\").";
}

namespace {

// Makes the programs in `wanted` (and program 0) loaded in the current
// context: compiled or read from the cache at once, those that are missing,
// when a launch on its device first needs them. `out`: the device's kernels.
std::string LoadPrograms(std::vector<int> wanted, const Kernels** out) {
  static std::mutex mu;
  static std::map<int, Kernels> loaded;
  std::string error = Init();
  if (!error.empty()) return error;
  int device = CurrentDevice();
  std::lock_guard<std::mutex> lock(mu);
  Kernels& kernels = loaded[device];
  *out = &kernels;
  wanted.push_back(0);
  std::vector<int> missing;
  for (int p : wanted) {
    if (kernels.modules[p] == nullptr &&
        std::find(missing.begin(), missing.end(), p) == missing.end()) {
      missing.push_back(p);
    }
  }
  if (missing.empty()) return "";
  const Driver* d = D();
  int driver_version = 0;  // 1000 * major + 10 * minor
  if (d->cuDriverGetVersion(&driver_version) == kSuccess) {
    error = DriverProblem(driver_version);
    if (!error.empty()) return error;
  }
  int major = 0, minor = 0;
  d->cuDeviceGetAttribute(&major, kAttributeComputeCapabilityMajor, device);
  d->cuDeviceGetAttribute(&minor, kAttributeComputeCapabilityMinor, device);
  std::vector<std::string> cubins, paths;
  bool compiled = false;
  error = KernelsCubins(10 * major + minor, missing, &cubins, &paths, &compiled);
  if (!error.empty()) return error;
  for (int p : missing) {
    Module module = nullptr;
    Result r = d->cuModuleLoadData(&module, cubins[p].data());
    if (r != kSuccess) return Message("loading the CUDA kernels (cuModuleLoadData)", r);
    for (int k = 0; k < kNumKernels; ++k) {
      if (kProgramOf[k] != p) continue;
      r = d->cuModuleGetFunction(&kernels.functions[k], module, kKernelNames[k]);
      if (r != kSuccess) return Message(kKernelNames[k], r);
    }
    kernels.modules[p] = module;  // last: a program is loaded once its kernels are found
  }
  return "";
}

// Launches kernel k with `params` (pointers to each parameter's value).
std::string Launch(Kernel k, unsigned grid, unsigned threads, void** params, Stream stream) {
  const Kernels* kernels = nullptr;
  std::string error = LoadPrograms({kProgramOf[k]}, &kernels);
  if (!error.empty()) return error;
  Result r = Call(&Driver::cuLaunchKernel, kernels->functions[k], grid, 1u, 1u, threads, 1u, 1u, 0u,
                  stream, params, static_cast<void**>(nullptr));
  return r == kSuccess ? "" : Message(kKernelNames[k], r);
}

// 2^31 blocks are 5.5e11 elements, more than any device holds.
bool BlockIndicesFit(const LeafTable& table) { return table.num_blocks <= INT32_MAX; }

constexpr int kWarpsPerCta = kThreads / kLanes;
constexpr int kUpdateWarps = kUpdateThreads / kLanes;

// CTAs of `warps` warps for num_blocks blocks: at most one resident wave of
// `per_sm` CTAs per SM.
unsigned GridFor(int64_t num_blocks, int num_sms, int warps = kWarpsPerCta, int per_sm = 4) {
  int64_t ctas = (num_blocks + warps - 1) / warps;
  int64_t cap = static_cast<int64_t>(num_sms) * per_sm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ctas, cap)));
}

const char kTooManyBlocks[] = "a launch of more than 2^31 blocks";

}  // namespace

MemLocation DeviceLocation(int device) { return {kMemLocationTypeDevice, device}; }
MemLocation HostLocation() { return {kMemLocationTypeHost, 0}; }

std::string Init() {
  std::string error;
  return LoadDriver(&error) == nullptr ? error : "";
}

std::string Message(const char* what, Result result) {
  const char* reason = nullptr;
  const Driver* d = D();
  if (d != nullptr) d->cuGetErrorString(result, &reason);
  return std::string(what) +
         " failed: " + (reason != nullptr ? reason : "CUDA error " + std::to_string(result));
}

Result MemAllocManaged(void** p, size_t bytes) {
  DevicePtr ptr = 0;
  Result r = Call(&Driver::cuMemAllocManaged, &ptr, bytes, static_cast<unsigned>(kMemAttachGlobal));
  *p = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
  return r;
}
Result MemAlloc(void** p, size_t bytes) {
  DevicePtr ptr = 0;
  Result r = Call(&Driver::cuMemAlloc, &ptr, bytes);
  *p = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
  return r;
}
Result MemFree(void* p) { return Call(&Driver::cuMemFree, Ptr(p)); }
Result MemAllocHost(void** p, size_t bytes) { return Call(&Driver::cuMemAllocHost, p, bytes); }
Result MemFreeHost(void* p) { return Call(&Driver::cuMemFreeHost, p); }
Result CtxSynchronize() { return Call(&Driver::cuCtxSynchronize); }
Result MemcpyAsync(void* dst, const void* src, size_t bytes, Stream stream) {
  return Call(&Driver::cuMemcpyAsync, Ptr(dst), Ptr(src), bytes, stream);
}
Result MemsetAsync(void* p, uint8_t value, size_t bytes, Stream stream) {
  return Call(&Driver::cuMemsetD8Async, Ptr(p), static_cast<unsigned char>(value), bytes, stream);
}
Result MemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  return Call(&Driver::cuMemGetInfo, free_bytes, total_bytes);
}
Result MemAdvisePreferredLocation(void* p, size_t bytes, MemLocation where) {
  return Call(&Driver::cuMemAdvise, Ptr(p), bytes, kAdviseSetPreferredLocation, where);
}
Result MemAdviseAccessedBy(void* p, size_t bytes, MemLocation by) {
  return Call(&Driver::cuMemAdvise, Ptr(p), bytes, kAdviseSetAccessedBy, by);
}
Result MemPrefetchAsync(void* p, size_t bytes, MemLocation to, Stream stream) {
  return Call(&Driver::cuMemPrefetchAsync, Ptr(p), bytes, to, 0u, stream);
}
Result StreamSynchronize(Stream stream) { return Call(&Driver::cuStreamSynchronize, stream); }
Result StreamCreateNonBlocking(Stream* stream) {
  return Call(&Driver::cuStreamCreate, stream, static_cast<unsigned>(kStreamNonBlocking));
}
Result StreamDestroy(Stream stream) { return Call(&Driver::cuStreamDestroy, stream); }
Result StreamWaitEvent(Stream stream, Event event) {
  return Call(&Driver::cuStreamWaitEvent, stream, event, 0u);
}
Result EventCreate(Event* event) {
  return Call(&Driver::cuEventCreate, event, static_cast<unsigned>(kEventDisableTiming));
}
Result EventDestroy(Event event) { return Call(&Driver::cuEventDestroy, event); }
Result EventRecord(Event event, Stream stream) {
  return Call(&Driver::cuEventRecord, event, stream);
}
Result EventSynchronize(Event event) { return Call(&Driver::cuEventSynchronize, event); }
Result MultiProcessorCount(int device, int* count) {
  Device handle = 0;
  Result r = Call(&Driver::cuDeviceGet, &handle, device);
  if (r != kSuccess) return r;
  return Call(&Driver::cuDeviceGetAttribute, count, kAttributeMultiprocessorCount, handle);
}

DeviceScope::DeviceScope(int device) {
  static std::mutex mu;
  static Context primary[kMaxDevices] = {};
  const Driver* d = D();
  if (d == nullptr || device < 0 || device >= kMaxDevices) return;
  Context want = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (primary[device] == nullptr) {
      Device dev = 0;
      if (d->cuDeviceGet(&dev, device) != kSuccess ||
          d->cuDevicePrimaryCtxRetain(&primary[device], dev) != kSuccess) {
        return;
      }
    }
    want = primary[device];
  }
  Context current = nullptr;
  d->cuCtxGetCurrent(&current);
  if (current != want && d->cuCtxPushCurrent(want) == kSuccess) pushed_ = want;
}

DeviceScope::~DeviceScope() {
  if (pushed_ == nullptr) return;
  Context popped = nullptr;
  Call(&Driver::cuCtxPopCurrent, &popped);
}

void Configure(const std::string& nvrtc_library, const std::string& cache_dir) {
  std::lock_guard<std::mutex> lock(g_config_mu);
  g_nvrtc_library = nvrtc_library;
  g_cache_dir = cache_dir;
}

std::string CompileKernels(int arch, const std::vector<int>* programs,
                           std::vector<std::string>* paths, bool* compiled) {
  if (programs != nullptr) {
    for (int p : *programs) {
      if (p < 0 || p >= kNumPrograms) {
        return "compile_kernels: no program " + std::to_string(p) + " (0.." +
               std::to_string(kNumPrograms - 1) + ")";
      }
    }
  }
  std::vector<int> wanted;  // in order, each once
  for (int p = 0; p < kNumPrograms; ++p) {
    if (programs == nullptr ||
        std::find(programs->begin(), programs->end(), p) != programs->end()) {
      wanted.push_back(p);
    }
  }
  std::vector<std::string> cubins;
  return KernelsCubins(arch, wanted, &cubins, paths, compiled);
}

std::string NvrtcProblem(const std::string& library) {
  std::string error;
  OpenNvrtc(library, &error);
  return error;
}

std::string LoadUpdateKernels(uint32_t types, bool write_params) {
  std::vector<int> wanted;
  for (int32_t type : {kF32, kBF16, kF16}) {
    if (types & (1u << type)) wanted.push_back(kProgramOf[UpdateKernel(write_params, type)]);
  }
  const Kernels* kernels = nullptr;
  return LoadPrograms(wanted, &kernels);
}

std::string LaunchBlockNormSq(const LeafTable& table, double* partials, int num_sms,
                              Stream stream) {
  if (!BlockIndicesFit(table)) return kTooManyBlocks;
  void* params[] = {const_cast<LeafTable*>(&table), &partials};
  return Launch(kBlockNormSq, GridFor(table.num_blocks, num_sms), kThreads, params, stream);
}

std::string LaunchRingScale(const LeafTable& table, const double* partials, float* rings,
                            float* clip_scale, int64_t t, int32_t percentile, Stream stream) {
  if (table.num_leaves == 0) return "";
  void* params[] = {
      const_cast<LeafTable*>(&table), &partials, &rings, &clip_scale, &t, &percentile};
  return Launch(kRingScale, static_cast<unsigned>(table.num_leaves), kNormThreads, params, stream);
}

std::string LaunchWholeLeafMax(const LeafTable& table, const StepArgs& args, int num_sms,
                               Stream stream) {
  if (!BlockIndicesFit(table)) return kTooManyBlocks;
  void* params[] = {const_cast<LeafTable*>(&table), const_cast<StepArgs*>(&args)};
  return Launch(kWholeLeafMax, GridFor(table.num_blocks, num_sms), kThreads, params, stream);
}

std::string LaunchBuildQuantTables(const float* qmaps, QuantTables* tables, Stream stream) {
  constexpr int kEntries =
      static_cast<int>(std::max(sizeof(QuantTables::start1), sizeof(QuantTables::start2)));
  void* params[] = {&qmaps, &tables};
  return Launch(kBuildQuantTables, (kEntries + kThreads - 1) / kThreads, kThreads, params, stream);
}

std::string LaunchUpdate(const LeafTable& table, const StepArgs& args, int num_sms, Stream stream) {
  if (!BlockIndicesFit(table)) return kTooManyBlocks;
  void* params[] = {const_cast<LeafTable*>(&table), const_cast<StepArgs*>(&args)};
  unsigned grid = GridFor(table.num_blocks, num_sms, kUpdateWarps, 1);
  // Every leaf of a table has one dtype (the caller groups them); an empty
  // table (a step of no leaves still writes the count) takes float32's.
  int32_t type = table.num_leaves > 0 ? table.leaves[0].type : kF32;
  std::string error =
      Launch(UpdateKernel(args.write_params, type), grid, kUpdateThreads, params, stream);
  if (error.empty() && args.whole_absmax != nullptr) {
    error = Launch(kStoreWholeScales, 1, kThreads, params, stream);
  }
  return error;
}

std::string LaunchLoadLatency(const uint8_t* data, int64_t bytes, uint32_t* cycles, Stream stream) {
  int64_t chunks = (bytes + static_cast<int64_t>(kProbeChunk) - 1) / kProbeChunk;
  if (chunks == 0) return "";
  if (chunks > 0x7fffffff) return "a residency probe of more than 2^31 chunks";
  void* params[] = {&data, &bytes, &cycles};
  return Launch(kLoadLatency, static_cast<unsigned>(chunks), kLanes, params, stream);
}

std::string LaunchCopies(const std::vector<CopyRange>& ranges, int ctas, Stream stream) {
  auto table = std::make_unique<CopyTable>();
  for (size_t first = 0; first < ranges.size(); first += kMaxCopyRanges) {
    size_t count = std::min(ranges.size() - first, static_cast<size_t>(kMaxCopyRanges));
    std::copy(ranges.begin() + first, ranges.begin() + first + count, table->ranges);
    table->count = static_cast<int32_t>(count);
    void* params[] = {table.get()};
    if (std::string error =
            Launch(kCopyRanges, static_cast<unsigned>(std::max(ctas, 1)), kThreads, params, stream);
        !error.empty()) {
      return error;
    }
  }
  return "";
}

std::string LaunchStoreWords(const WordStores& stores, Stream stream) {
  void* params[] = {const_cast<WordStores*>(&stores)};
  return Launch(kStoreWords, 1, 1, params, stream);
}

}  // namespace cu
}  // namespace optax_paged8bit
