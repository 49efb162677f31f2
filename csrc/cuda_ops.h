// CUDA handlers of the custom calls and the host-side paging controls.
#ifndef OPTAX_PAGED8BIT_CUDA_OPS_H_
#define OPTAX_PAGED8BIT_CUDA_OPS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "xla/ffi/api/api.h"

namespace optax_paged8bit {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kUpdateArraysCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kExportCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kImportCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kBlockNormsCuda);

// Move every CUDA slot of a handle to host RAM / back to its GPU; return the
// bytes moved, and set *error (leaving the rest in place) on failure.
size_t PageOut(int32_t handle, std::string* error);
size_t PageIn(int32_t handle, std::string* error);
// The collector's page_out of a retired state: not a use of it.
size_t Retire(int32_t handle, std::string* error);

// Where a handle's CUDA slots really are: one load per kProbeChunk (2 MiB, the
// driver's migration unit) timed on the GPU and compared with loads of device
// and pinned host memory (their median cycles are returned too). Sets *error
// when the two references are too close to tell apart.
struct ResidencyMeasure {
  size_t bytes_on_device = 0;
  size_t bytes_on_host = 0;
  uint32_t device_cycles = 0;
  uint32_t host_cycles = 0;
};
ResidencyMeasure MeasureResidency(int32_t handle, std::string* error);

// Holds plain cudaMalloc chunks of `chunk_bytes` until one fails (then gives
// the last one back, leaving the driver room to service page faults) or
// `limit_bytes` are held: a memory spike for tests and benchmarks. Returns
// the bytes held; FreeDeviceFill frees them all.
size_t FillDeviceMemory(int device, size_t chunk_bytes, size_t limit_bytes);
void FreeDeviceFill();

// Caps the managed bytes placed on each GPU (-1: free memory is the only
// limit); what does not fit is placed on the host.
void SetDeviceBudget(int64_t bytes);
int64_t DeviceBudget();
// Managed bytes placed on a GPU now.
int64_t ManagedDeviceBytes(int device);

// Whether a thread restores state that the driver evicted from a GPU (a
// memory spike) between steps (cuda_ops.cc, "the eviction watch"); on by
// default. Turning it off stops and joins the thread.
void SetEvictionWatch(bool on);
bool EvictionWatchEnabled();

// Whether a state allocated with no room on its GPU goes to page-locked host
// memory (true, the default) or to managed memory homed on the host.
void SetPinnedHost(bool pinned);
bool PinnedHost();
// Tests: act as if the host refused to lock memory (cuMemAllocHost failed),
// which places such a state in managed memory instead.
void RefusePinnedHost(bool refuse);

// The device window through which a step streams state that lies in host RAM
// (cuda_ops.cc): `buffers` buffers of `chunk_bytes` each. 0 and 0 turns
// streaming off (the kernel then reads such state over the bus); otherwise
// chunk_bytes is at least 1 MiB and a multiple of 256, buffers 2 to 8.
// Returns "" or what is wrong with the arguments. For benchmarks and tests.
std::string SetStreamWindow(size_t chunk_bytes, int buffers, int copy_ctas);
std::tuple<size_t, int, int> StreamWindowShape();

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_CUDA_OPS_H_
