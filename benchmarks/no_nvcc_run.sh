#!/usr/bin/env bash
# The GPU checks as a user with JAX from pip sees them: no nvcc and no CUDA
# toolkit on PATH (only cuobjdump, for the kernels' resources), the kernels
# compiled by NVRTC at first use into a fresh cache. Builds the extension,
# times the first compile, benchmarks the fused step against optax.adamw,
# runs tests/test_gpu.py and tests/test_chunked_step.py, then the collector's
# GPU tests. Usage (repo root, on the device): bash benchmarks/no_nvcc_run.sh
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/no_nvcc_tools
# tests/test_gpu.py's check of the fast math paths compiles a host program
# with nvcc: it alone finds nvcc, through NVCC.
NVCC=$(command -v nvcc || true)
export NVCC
for tool in cuobjdump nvdisasm; do
  command -v $tool > /dev/null && ln -sf "$(command -v $tool)" /tmp/no_nvcc_tools/
done
PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd:):/tmp/no_nvcc_tools
export PATH
unset CUDA_HOME CUDA_PATH
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
export OPTAX_PAGED8BIT_CACHE_DIR=/tmp/no_nvcc_cache
rm -rf "$OPTAX_PAGED8BIT_CACHE_DIR"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "nvcc on PATH: $(command -v nvcc || echo none)"
  python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
(cd /tmp && python3 -c "from optax_paged8bit import _ffi; print('nvrtc:', _ffi.nvrtc_library())") \
  | tee -a "$OUT/machine.txt"
arch=$(python3 -c "import jax; print(jax.devices()[0].compute_capability.replace('.', ''))")
for run in cold warm; do
  t0=$(date +%s.%N)
  res=$(bash benchmarks/kernel_resources.sh "$arch")
  echo "kernels sm_$arch, $run: $(echo "$(date +%s.%N) - $t0" | bc) s; $res" | tee -a "$OUT/machine.txt"
done
status=0
timeout "${BENCH_LIMIT:-120}" python3 benchmarks/bench_adamw.py --cases "${BENCH_CASES:-0,1}" \
  --methods "optax.adamw,paged fused" --iters 15 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1 \
  || status=1
grep -v "^[WEI][0-9]" "$OUT/bench.log" | tail -10
(cd tests && timeout "${GPU_TESTS_LIMIT:-300}" python3 -m pytest -v -p no:cacheprovider \
   test_gpu.py test_chunked_step.py) > "$OUT/gpu_tests.log" 2>&1 || status=1
grep -c " PASSED" "$OUT/gpu_tests.log" | sed 's/$/ passed/'
grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -8 | cut -c1-200
(cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${COLLECTOR_LIMIT:-100}" \
   python3 -m pytest -v -p no:cacheprovider test_collector.py ${COLLECTOR_K:+-k "$COLLECTOR_K"}) \
   > "$OUT/collector_tests.log" 2>&1 || status=1
tail -4 "$OUT/collector_tests.log" | cut -c1-200
exit $status
