// CUDA handlers of the custom calls and the host-side paging controls.
#ifndef OPTAX_PAGED8BIT_CUDA_OPS_H_
#define OPTAX_PAGED8BIT_CUDA_OPS_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "xla/ffi/api/api.h"

namespace optax_paged8bit {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kUpdateCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kUpdateArraysCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kExportCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kImportCuda);

// Move every CUDA slot of a handle to host RAM / back to its GPU; return the
// bytes moved, and set *error (leaving the rest in place) on failure.
size_t PageOut(int32_t handle, std::string* error);
size_t PageIn(int32_t handle, std::string* error);

// Caps the managed bytes placed on each GPU (-1: free memory is the only
// limit); what does not fit is placed on the host.
void SetDeviceBudget(int64_t bytes);
int64_t DeviceBudget();
// Managed bytes placed on a GPU now.
int64_t ManagedDeviceBytes(int device);

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_CUDA_OPS_H_
