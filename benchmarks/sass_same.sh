#!/usr/bin/env bash
# Whether the working tree's CUDA kernels compile to the same SASS as a
# revision's, without a GPU: both builds of csrc/cuda_kernels.cu for one
# architecture with the extension's own nvcc flags (CMakeLists.txt, Release),
# then the update kernels' SASS compared with the code addresses masked. A
# change that leaves the SASS identical needs no device A/B; one that does
# not (register allocation moves with small edits) does. Compare on one
# machine: another machine's build of the same source can differ (this 2-core
# machine's fused kernel is 35520 instructions, the H200 machine's 33696, with
# the same nvcc 13.0.88; RESULTS.md, fifteenth session).
# Needs nvcc and cuobjdump; without a CUDA toolkit's cuobjdump, the
# nvidia-cuda-cuobjdump wheel has one:
#   pip download --no-deps -d /tmp/cuobjdump nvidia-cuda-cuobjdump
#   (cd /tmp/cuobjdump && python -m zipfile -e nvidia_cuda_cuobjdump-*.whl x)
#   CUOBJDUMP=$(find /tmp/cuobjdump/x -name cuobjdump -type f) bash benchmarks/sass_same.sh
# Usage (repo root): bash benchmarks/sass_same.sh [REV (HEAD)] [ARCH (90)]
set -eu
rev=${1:-HEAD}
arch=${2:-90}
cuobjdump=${CUOBJDUMP:-cuobjdump}
chmod +x "$cuobjdump" 2>/dev/null || true
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rev"
git archive "$rev" csrc | tar -x -C "$work/rev"
flags=(-std=c++17 -O3 -DNDEBUG -DOPTAX_PAGED8BIT_WITH_CUDA --fmad=false
       -Xcompiler=-ffp-contract=off -cubin -arch=sm_$arch)
nvcc "${flags[@]}" -I"$work/rev/csrc" "$work/rev/csrc/cuda_kernels.cu" -o "$work/rev.cubin" &
nvcc "${flags[@]}" -Icsrc csrc/cuda_kernels.cu -o "$work/tree.cubin"
wait
same=yes
for kernel in 'UpdateKernelILb1' 'UpdateKernelILb0'; do
  for side in rev tree; do
    "$cuobjdump" -sass "$work/$side.cubin" | awk -v k="$kernel" '/Function :/{f=($0 ~ k)} f' \
      | grep '^        /\*[0-9a-f]*\*/' | sed -E 's|/\*[0-9a-f]+\*/||; s/0x[0-9a-f]+/ADDR/g' \
      > "$work/$side.sass"
  done
  changed=$(diff "$work/rev.sass" "$work/tree.sass" | grep -c '^[<>]' || true)
  echo "$kernel: $rev $(wc -l < "$work/rev.sass") SASS instructions, working tree" \
    "$(wc -l < "$work/tree.sass"), $changed lines differ (addresses masked)"
  [ "$changed" -eq 0 ] || same=no
done
echo "same SASS: $same"
