#!/usr/bin/env bash
# The GPU checks as a user with JAX from pip sees them: no nvcc and no CUDA
# toolkit on PATH or the library path (only cuobjdump, for the kernels'
# resources), NVRTC from JAX's CUDA wheels, the kernels compiled at first use
# into a fresh cache. Installs WHEEL (a wheel built elsewhere with `pip wheel`)
# or builds this tree; times the first step's kernel compile, cold and warm;
# with BASELINE_SRC (a tarball of a tree whose CMake build compiles the
# kernels with nvcc), builds that with the toolkit's nvcc meanwhile, then
# benchmarks both builds' fused step against optax.adamw, alternating, and
# counts both builds' update kernels' SASS; then the collector's GPU tests
# (COLLECTOR_K selects); last, tests/test_gpu.py and tests/test_chunked_step.py.
# Usage (repo root, on the device):
#   [WHEEL=dist/x.whl] [BASELINE_SRC=src.tar.gz] bash benchmarks/no_nvcc_run.sh
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/no_nvcc_tools
# tests/test_gpu.py's check of the fast math paths compiles a host program
# with nvcc, and the baseline build needs it: they alone find it, through NVCC.
NVCC=$(command -v nvcc || true)
export NVCC
for tool in cuobjdump nvdisasm; do
  command -v $tool > /dev/null && ln -sf "$(command -v $tool)" /tmp/no_nvcc_tools/
done
no_cuda() { echo "$1" | tr ':' '\n' | grep -v -i cuda | paste -sd:; }
toolkit_path=$PATH
PATH=$(no_cuda "$PATH"):/tmp/no_nvcc_tools
LD_LIBRARY_PATH=$(no_cuda "${LD_LIBRARY_PATH:-}")
export PATH LD_LIBRARY_PATH
unset CUDA_HOME CUDA_PATH
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
export OPTAX_PAGED8BIT_CACHE_DIR=/tmp/no_nvcc_cache
rm -rf "$OPTAX_PAGED8BIT_CACHE_DIR"
if [ -n "${BASELINE_SRC:-}" ]; then
  rm -rf /tmp/baseline_src /tmp/baseline_build && mkdir -p /tmp/baseline_src
  tar -xzf "$BASELINE_SRC" -C /tmp/baseline_src
  arch_cmake=$(python3 -c "import jax; print(jax.devices('gpu')[0].compute_capability.replace('.', ''))")
  (cd /tmp/baseline_src && t0=$(date +%s) && PATH=$toolkit_path CUDACXX=$NVCC \
     python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/baseline_build \
     -C "cmake.define.OPTAX_PAGED8BIT_CUDA=ON" \
     -C "cmake.define.OPTAX_PAGED8BIT_CUDA_ARCHITECTURES=${arch_cmake}-real" . \
     && echo "baseline build: $(( $(date +%s) - t0 )) s") > "$OUT/baseline_build.log" 2>&1 &
  baseline_pid=$!
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "nvcc on PATH: $(command -v nvcc || echo none)"
  python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
if [ -n "${WHEEL:-}" ]; then
  python3 -m pip install --no-deps --force-reinstall -q "$WHEEL" > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "wheel $(basename "$WHEEL") installed: $(( $(date +%s) - t0 )) s"
else
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
(cd /tmp && python3 -c "from optax_paged8bit import _ffi; print('nvrtc:', _ffi.nvrtc_library())") \
  | tee -a "$OUT/machine.txt"
arch=$(python3 -c "import jax; print(jax.devices()[0].compute_capability.replace('.', ''))")
# The first step's kernel compile, cold and warm (fresh processes), then all
# the programs at once into another empty cache, then the update kernels'
# resources and SASS.
for dtype in float32 bfloat16; do
  python3 benchmarks/first_step.py --dtype $dtype --json "$OUT/first_step_$dtype.json" \
    | tee -a "$OUT/machine.txt"
done
(cd /tmp && OPTAX_PAGED8BIT_CACHE_DIR=/tmp/no_nvcc_all python3 -c "
import time, optax_paged8bit as op
start = time.perf_counter(); paths, compiled = op._ffi._ops.compile_kernels($arch)
print(f'all {len(paths)} programs for sm_$arch, cold: {time.perf_counter() - start:.2f} s')
start = time.perf_counter(); op._ffi._ops.compile_kernels($arch)
print(f'again, warm: {time.perf_counter() - start:.4f} s')") | tee -a "$OUT/machine.txt"
echo "kernels sm_$arch: $(bash benchmarks/kernel_resources.sh "$arch")" | tee -a "$OUT/machine.txt"
status=0
builds=nvrtc
if [ -n "${BASELINE_SRC:-}" ]; then
  wait "$baseline_pid" && builds="nvrtc nvcc"
  tail -3 "$OUT/baseline_build.log"
  so=$(ls /tmp/baseline_build/optax_paged8bit/_ops*.so)
  echo "nvcc build: $(bash /tmp/baseline_src/benchmarks/kernel_resources.sh "$so")" \
    | tee -a "$OUT/machine.txt"
fi
for round in $(seq "${AB_ROUNDS:-2}"); do
  for build in $builds; do
    path=; [ "$build" = nvcc ] && path=/tmp/baseline_build
    PYTHONPATH=$path timeout "${BENCH_LIMIT:-100}" python3 benchmarks/bench_adamw.py \
      --cases "${BENCH_CASES:-0,1}" --methods "optax.adamw,paged fused" --iters 15 \
      --json "$OUT/bench_${build}_$round.json" > "$OUT/bench_${build}_$round.log" 2>&1 || status=1
    echo "== $build, round $round"; grep -v "^[WEI][0-9]" "$OUT/bench_${build}_$round.log" | tail -6
  done
done
(cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${COLLECTOR_LIMIT:-100}" \
   python3 -m pytest -v -p no:cacheprovider test_collector.py ${COLLECTOR_K:+-k "$COLLECTOR_K"}) \
   > "$OUT/collector_tests.log" 2>&1 || status=1
tail -4 "$OUT/collector_tests.log" | cut -c1-200
(cd tests && timeout "${GPU_TESTS_LIMIT:-300}" python3 -m pytest -v -p no:cacheprovider \
   --durations=12 test_gpu.py test_chunked_step.py) > "$OUT/gpu_tests.log" 2>&1 || status=1
grep -c " PASSED" "$OUT/gpu_tests.log" | sed 's/$/ passed/'
grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -8 | cut -c1-200
exit $status
