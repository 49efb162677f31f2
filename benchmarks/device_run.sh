#!/usr/bin/env bash
# The GPU checks on a GPU machine: build the CUDA extension against the machine's
# own jax, run the GPU tests, the benchmark and (optionally) the CPU suite.
# Usage (from the repo root on the device):
#   bash benchmarks/device_run.sh [gpu] [host] [multi] [bench] [cases] [chunked] [count] [pressure] [capacity]
#                                 [same_size] [trace] [ncu] [stalls] [diag] [collector] [cpu]
# gpu: tests/test_gpu.py and tests/test_chunked_step.py (GPU_TESTS_K selects with pytest's -k);
# host: tests/test_host_state.py, benchmarks/bus_copies.py (BUS_COPIES_LIMIT=0 skips it) and
# benchmarks/host_state.py; multi: the multi-device, multi-process, adamw8bit and checkpoint tests on
# the GPUs (2 on nvidia-h200-x2), and examples/pjit_sharded.py in
# one process and in 2 processes of one GPU each; bench: benchmarks/bench_adamw.py; cases: the
# same, one process per case of BENCH_CASES (default 0 1 2 3) while time is left of RUN_LIMIT
# seconds (default 570); chunked: benchmarks/chunked_step.py (a step in several calls
# against one, 3000 leaves); count: Nsight Compute's instructions per param of the fused update
# kernel on NCU_CASES (benchmarks/ncu_count.sh); pressure:
# benchmarks/paging_pressure.py (memory spikes); capacity: benchmarks/capacity.py for
# CAPACITY_DTYPES (default float32: one dtype per call fits its 10 minutes); same_size: one
# capacity trial of every method and dtype at CAPACITY_WIDTH (default 2048; SAME_SIZE_METHODS and
# SAME_SIZE_DTYPES choose), for step times and
# XLA's temporary memory at one model size; trace: where
# a GPT-2 step's time goes (benchmarks/trace_step.py; TRACE_CASE, TRACE_ARGS such as
# --back-to-back); stalls: Nsight Compute's full set on the
# fused update kernel of NCU_CASES (default 0 1), with the per-SASS-instruction stall samples
# (benchmarks/ncu_sass.py reads them); collector: tests/test_collector.py on the GPU, the
# collector's stress runs (4 donated threads with 1024 x 1024 params, COLLECTOR_REPEAT times; a
# jitted sweep of a 268M-param model) and benchmarks/collector_cost.py; cpu: the whole suite on the
# machine's JAX with JAX_PLATFORMS=cpu.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
steps=${*:-gpu bench}
started=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__)"
  # The toolchain: this machine's build of a kernel can differ from another's
  # (benchmarks/RESULTS.md).
  for tool in nvcc ptxas; do echo "$tool: $(command -v $tool) $($tool --version | tail -2 | tr '\n' ' ')"; done
  for tool in g++ cmake; do echo "$tool: $(command -v $tool) $($tool --version | head -1)"; done
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
# The kernels compiled by NVRTC for this GPU (the first use's compile, timed;
# later runs find them in the cache).
t0=$(date +%s)
bash benchmarks/kernel_resources.sh \
  "$(python3 -c "import jax; print(jax.devices()[0].compute_capability.replace('.', ''))")"
echo "kernels: $(( $(date +%s) - t0 )) s"
status=0
for step in $steps; do
  t0=$(date +%s)
  case $step in
    gpu) # -v: one line per test as it ends, so that a run cut short shows where it got to.
         # test_chunked_step.py runs on the default device, the GPU.
         (cd tests && python3 -m pytest -v -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} \
           test_gpu.py test_chunked_step.py) \
           > "$OUT/gpu_tests.log" 2>&1 || status=1
         grep -c " PASSED" "$OUT/gpu_tests.log" | sed 's/$/ passed so far/'
         tail -15 "$OUT/gpu_tests.log" | cut -c1-160 ;;
    multi) (cd tests && OPTAX_PAGED8BIT_TEST_PLATFORM=gpu python3 -m pytest -q -p no:cacheprovider \
             test_functional.py test_layout.py test_checkpoint.py test_migration.py test_multiprocess.py) \
             > "$OUT/multi_tests.log" 2>&1 || status=1
           python3 examples/pjit_sharded.py --steps 100 --model-axis 2 --plot /tmp/pjit_gpu.png \
             >> "$OUT/multi_tests.log" 2>&1 || status=1
           python3 examples/launch.py -n 2 --one-gpu-each examples/pjit_sharded.py --steps 100 \
             --model-axis 2 --plot /tmp/pjit_gpu_2proc.png >> "$OUT/multi_tests.log" 2>&1 || status=1
           tail -24 "$OUT/multi_tests.log" ;;
    bench) python3 benchmarks/bench_adamw.py --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1 \
             || status=1
           tail -20 "$OUT/bench.log" ;;
    cases) # One process per case (a process's host speed moves the host-bound cases), each
           # started only while BENCH_NEED seconds remain of RUN_LIMIT.
           for c in ${BENCH_CASES:-0 1 2 3}; do
             left=$(( ${RUN_LIMIT:-570} - ($(date +%s) - started) ))
             if [ "$left" -lt "${BENCH_NEED:-80}" ]; then echo "case $c not run: $left s left"; continue; fi
             timeout "$left" python3 benchmarks/bench_adamw.py --cases "$c" --iters 15 \
               --json "$OUT/bench_case$c.json" > "$OUT/bench_case$c.log" 2>&1 || status=1
             grep -v "^[WEI][0-9]" "$OUT/bench_case$c.log" | tail -9
           done ;;
    chunked) # A step split into several calls against one call (3000 leaves).
             for size in 4096 65536; do
               python3 benchmarks/chunked_step.py --leaves 3000 --size $size \
                 --json "$OUT/chunked_step_$size.json" 2>&1 | grep -v "^[WEI][0-9]" || status=1
             done ;;
    count) for c in ${NCU_CASES:-0 1}; do
             bash benchmarks/ncu_count.sh "$c" "${NCU_LABEL:-build}" \
               "$OUT/ncu_count_case$c.log" || status=1
           done ;;
    trace) (cd benchmarks && python3 trace_step.py ${TRACE_CASE:-2} ${TRACE_ARGS:-} --out /tmp/trace) \
             > "$OUT/trace.log" 2>&1 || status=1
           cat "$OUT/trace.log" ;;
    host) # State in host RAM: the streaming tests, the copy engines' speeds by kind of host
          # memory, and the host-state benchmark (HOST_ARGS: e.g. --trees NAME --windows).
          (cd tests && timeout ${HOST_TESTS_LIMIT:-240} python3 -m pytest -v -p no:cacheprovider \
            test_host_state.py) > "$OUT/host_tests.log" 2>&1 || status=1
          grep -c " PASSED" "$OUT/host_tests.log" | sed 's/$/ passed/'
          grep -E "FAILED|Error|error" "$OUT/host_tests.log" | head -20 | cut -c1-300
          tail -3 "$OUT/host_tests.log"
          if [ "${BUS_COPIES_LIMIT:-120}" -gt 0 ]; then
            timeout ${BUS_COPIES_LIMIT:-120} python3 benchmarks/bus_copies.py \
              --json "$OUT/bus_copies.json" > "$OUT/bus_copies.log" 2>&1 || status=1
            tail -50 "$OUT/bus_copies.log"
          fi
          timeout ${HOST_BENCH_LIMIT:-300} python3 -u benchmarks/host_state.py ${HOST_ARGS:-} \
            --json "$OUT/host_state.json" \
            > "$OUT/host_state.log" 2>&1 || status=1
          grep -v "^[WEI][0-9]" "$OUT/host_state.log" | tail -100 ;;
    pressure) XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
                timeout ${PRESSURE_LIMIT:-300} python3 benchmarks/paging_pressure.py --json "$OUT/pressure.json" \
                > "$OUT/pressure.log" 2>&1 || status=1
              grep -v "^[WEI][0-9]\|^=== \|^external/\|^$" "$OUT/pressure.log" | tail -30 ;;
    capacity) XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
                python3 benchmarks/capacity.py --dtypes "${CAPACITY_DTYPES:-float32}" \
                --json "$OUT/capacity.json" --plot "$OUT/capacity.png" > "$OUT/capacity.log" 2>&1 \
                || status=1
              grep -v "^[WEI][0-9]\|^=== \|^external/\|^$" "$OUT/capacity.log" | tail -14 ;;
    same_size) for dtype in ${SAME_SIZE_DTYPES:-float32 bfloat16}; do
                 for method in ${SAME_SIZE_METHODS:-adamw adamw8bit adamw8bit_fused paged_device paged_host}; do
                   XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
                     python3 benchmarks/capacity.py --trial $method $dtype ${CAPACITY_WIDTH:-2048} \
                     --steps 5 2>&1 | grep --line-buffered '^{'
                 done
               done > "$OUT/same_size.jsonl" || status=1
               cat "$OUT/same_size.jsonl" ;;
    diag) python3 benchmarks/diag_errors.py > "$OUT/diag.log" 2>&1; cat "$OUT/diag.log" ;;
    ncu) (cd benchmarks && ncu -k regex:op8_update -s 2 -c 1 --section SpeedOfLight \
           --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats \
           --section LaunchStats --section Occupancy python3 profile_step.py ${NCU_CASE:-0}) \
           > "$OUT/ncu.log" 2>&1 || status=1
         grep -E "Duration|Throughput|Memory \[%\]|Registers|Achieved Occupancy|Executed Ipc|Executed Instructions " \
           "$OUT/ncu.log" | head -20 ;;
    stalls) for c in ${NCU_CASES:-0 1}; do
              (cd benchmarks && ncu -k regex:op8_update -s 2 -c 1 --set full --clock-control none \
                 --import-source no -f -o "$OUT/ncu_case$c" python3 profile_step.py "$c") \
                 > "$OUT/stalls_case$c.log" 2>&1 || status=1
              ncu -i "$OUT/ncu_case$c.ncu-rep" --page details --print-details all \
                >> "$OUT/stalls_case$c.log" 2>&1
              ncu -i "$OUT/ncu_case$c.ncu-rep" --page source --csv --print-source sass 2>&1 \
                | gzip > "$OUT/sass_case$c.csv.gz"
              grep -E "Duration|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Stall|Bank|Executed Ipc A" \
                "$OUT/stalls_case$c.log" | head -40
              python3 benchmarks/ncu_sass.py "$OUT/sass_case$c.csv.gz" --top 8 --opcodes 0
            done ;;
    collector) # Fresh processes each take their own GPU memory: none preallocates.
         export XLA_PYTHON_CLIENT_PREALLOCATE=false
         (cd tests && python3 -m pytest -v -p no:cacheprovider test_collector.py) \
           > "$OUT/collector_tests.log" 2>&1 || status=1
         tail -6 "$OUT/collector_tests.log" | cut -c1-200
         python3 tests/collector_stress.py donated-threads --size 1024 --steps 200 \
           --repeat "${COLLECTOR_REPEAT:-3}" --look-at-everything > "$OUT/collector_threads.json" \
           2> "$OUT/collector_threads.log" || status=1
         cut -c1-400 "$OUT/collector_threads.json"
         python3 tests/collector_stress.py sweep linen --size 16384 --runs 10 \
           > "$OUT/collector_sweep.json" 2> "$OUT/collector_sweep.log" || status=1
         cat "$OUT/collector_sweep.json"
         python3 benchmarks/collector_cost.py --json "$OUT/collector_cost.json" \
           > "$OUT/collector_cost.log" 2>&1 || status=1
         tail -30 "$OUT/collector_cost.log"
         unset XLA_PYTHON_CLIENT_PREALLOCATE ;;
    cpu) (cd tests && JAX_PLATFORMS=cpu python3 -m pytest -q -p no:cacheprovider -n 8 .) \
           > "$OUT/cpu_tests.log" 2>&1 || status=1
         tail -8 "$OUT/cpu_tests.log" ;;
  esac
  echo "$step: $(( $(date +%s) - t0 )) s"
done
exit $status
