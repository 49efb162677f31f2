#!/usr/bin/env bash
# Whether the working tree's CUDA kernels compile to the same SASS as a
# revision's, without a GPU: both versions of csrc/cuda_kernels.cu compiled by
# NVRTC with the extension's own options (benchmarks/nvrtc_cubin.py), then the
# update kernels' SASS compared with the code addresses masked. A change that
# leaves the SASS identical needs no device A/B; one that does not (register
# allocation moves with small edits) does. The revision must have the kernels
# NVRTC compiles (device code only in cuda_kernels.cu).
# Needs NVRTC (the nvidia-cuda-nvrtc wheel) and cuobjdump; without a CUDA
# toolkit's, the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels have them:
#   pip download --no-deps -d /tmp/cuobjdump nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
#   (cd /tmp/cuobjdump && for w in *.whl; do python -m zipfile -e $w x; done)
#   PATH=$(dirname $(find /tmp/cuobjdump/x -name nvdisasm)):$PATH \
#     CUOBJDUMP=$(find /tmp/cuobjdump/x -name cuobjdump -type f) bash benchmarks/sass_same.sh
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
python3 benchmarks/nvrtc_cubin.py "$work/rev/csrc" "$arch" "$work/rev.cubin" &
python3 benchmarks/nvrtc_cubin.py csrc "$arch" "$work/tree.cubin"
wait
same=yes
for kernel in 'op8_update_params$' 'op8_update_updates$'; do
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
