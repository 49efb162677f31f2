// CPU handlers of the custom calls (see ffi_common.h for their operands).
#ifndef OPTAX_PAGED8BIT_CPU_OPS_H_
#define OPTAX_PAGED8BIT_CPU_OPS_H_

#include "xla/ffi/api/api.h"

namespace optax_paged8bit {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kUpdateCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kUpdateArraysCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kExportCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kImportCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kBlockNormsCpu);

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_CPU_OPS_H_
