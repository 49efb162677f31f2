#!/usr/bin/env bash
# The update kernels as NVRTC compiles them on this machine for ARCH (default
# 90), from the installed extension (compiled now, or found in the kernel
# cache): each distinct "REG STACK SHARED LOCAL" line with its count of
# kernels, and the SASS instruction count of each update kernel (one per
# dtype of the params: float32, bfloat16, float16) of the fused step and of
# the optax path. tests/test_gpu.py checks the resources too. Needs cuobjdump
# (a CUDA toolkit, or the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
# wheels).
# Usage: bash benchmarks/kernel_resources.sh [ARCH]
set -u
arch=${1:-90}
cubins=$(cd /tmp && python3 -c \
  "import optax_paged8bit as op; print(' '.join(op._ffi._ops.compile_kernels($arch)[0]))")
res() { for c in $cubins; do cuobjdump -res-usage "$c"; done; }
sass=$(for c in $cubins; do cuobjdump -sass "$c"; done)
count() {  # SASS instructions of each kernel named $1<dtype>, as "f32/bf16/f16"
  for t in f32 bf16 f16; do
    echo "$sass" | awk -v k="$1$t" '/Function :/{f=($NF == k)} f' | grep -c '^        /\*[0-9a-f]*\*/'
  done | paste -sd/
}
echo "$(res | grep -A1 op8_update \
  | grep -o 'REG:[0-9]* STACK:[0-9]* SHARED:[0-9]* LOCAL:[0-9]*' | sort | uniq -c \
  | sed 's/^ *//' | paste -sd ';')," \
  "fused kernels (f32/bf16/f16) $(count op8_update_params_) SASS instructions," \
  "optax-path kernels $(count op8_update_updates_)"
