#!/usr/bin/env bash
# The update kernels of a built extension as this machine's compiler made them
# (its SASS can differ from a build of the same source elsewhere;
# benchmarks/RESULTS.md, twelfth session): each distinct "REG STACK SHARED
# LOCAL" line with its count of kernels, and the fused kernel's SASS
# instruction count (summed over the architectures the .so holds: one in the
# builds of device_run.sh and kernel_ab.sh). tests/test_gpu.py checks the
# resources too.
# Usage: bash benchmarks/kernel_resources.sh path/to/_ops*.so
set -u
so=$1
echo "$(cuobjdump -res-usage "$so" | grep -A1 UpdateKernel \
  | grep -o 'REG:[0-9]* STACK:[0-9]* SHARED:[0-9]* LOCAL:[0-9]*' | sort | uniq -c \
  | sed 's/^ *//' | paste -sd ';')," \
  "fused kernel $(cuobjdump -sass "$so" | awk '/Function :/{f=($0 ~ /UpdateKernelILb1/)} f' \
  | grep -c '^        /\*[0-9a-f]*\*/') SASS instructions"
