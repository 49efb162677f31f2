#!/usr/bin/env bash
# The update kernels as NVRTC compiles them on this machine for ARCH (default
# 90), from the installed extension (compiled now, or found in the kernel
# cache): each distinct "REG STACK SHARED LOCAL" line with its count of
# kernels, and the fused and optax-path kernels' SASS instruction counts. tests/test_gpu.py
# checks the resources too. Needs cuobjdump (a CUDA toolkit, or the
# nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels).
# Usage: bash benchmarks/kernel_resources.sh [ARCH]
set -u
arch=${1:-90}
cubins=$(cd /tmp && python3 -c \
  "import optax_paged8bit as op; print(' '.join(op._ffi._ops.compile_kernels($arch)[0]))")
res() { for c in $cubins; do cuobjdump -res-usage "$c"; done; }
sass() { for c in $cubins; do cuobjdump -sass "$c"; done; }
echo "$(res | grep -A1 op8_update \
  | grep -o 'REG:[0-9]* STACK:[0-9]* SHARED:[0-9]* LOCAL:[0-9]*' | sort | uniq -c \
  | sed 's/^ *//' | paste -sd ';')," \
  "fused kernel $(sass | awk '/Function :/{f=($0 ~ /op8_update_params$/)} f' \
  | grep -c '^        /\*[0-9a-f]*\*/') SASS instructions," \
  "optax-path kernel $(sass | awk '/Function :/{f=($0 ~ /op8_update_updates$/)} f' \
  | grep -c '^        /\*[0-9a-f]*\*/')"
