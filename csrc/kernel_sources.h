// The CUDA kernels' source as text, for NVRTC (cuda_api.cc): cuda_kernels.cu
// and the two headers it includes, built into the extension from csrc/ by
// CMakeLists.txt (kernel_sources.cc.in), and the SHA-256 of the three, which
// names the compiled kernels in the on-disk cache.
#ifndef OPTAX_PAGED8BIT_KERNEL_SOURCES_H_
#define OPTAX_PAGED8BIT_KERNEL_SOURCES_H_

namespace optax_paged8bit {

extern const char kKernelSource[];
extern const char kAdam8bitHeader[];
extern const char kKernelsHeader[];
extern const char kKernelSourceHash[];

}  // namespace optax_paged8bit

#endif  // OPTAX_PAGED8BIT_KERNEL_SOURCES_H_
