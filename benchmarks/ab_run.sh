#!/usr/bin/env bash
# Kernel A/B on the device: builds the extension with extra CUDA flags ($1,
# e.g. -DOP8_AB_SHUFFLE_WARPMAX) into /tmp/ab, then runs bench_adamw.py's
# 1.07e9 cases with it and with the installed build, alternately.
set -u
OUT=${OUT:-$PWD/out}
OPTAX_PAGED8BIT_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q --target /tmp/ab \
  -C build-dir=/tmp/ab_build -C cmake.define.OPTAX_PAGED8BIT_CUDA_ARCHITECTURES=90-real \
  -C "cmake.define.CMAKE_CUDA_FLAGS=$1" . > "$OUT/ab_build.log" 2>&1 || { tail -20 "$OUT/ab_build.log"; exit 1; }
for round in 1 2; do
  for variant in base new; do
    if [ $variant = base ]; then pp=/tmp/ab; else pp=; fi
    (cd /tmp && PYTHONPATH=$pp XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python3 "$OLDPWD/benchmarks/bench_adamw.py" \
      --cases 0,1 --iters 15 --json "$OUT/ab_${variant}_$round.json") > "$OUT/ab_${variant}_$round.log" 2>&1
    grep -E "paged (fused|optax)|optax.adamw" "$OUT/ab_${variant}_$round.log" | grep -v "paged out" | sed "s/^/$variant $round: /"
  done
done
