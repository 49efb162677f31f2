#!/usr/bin/env bash
# A/B of variants of the CUDA sources in one run on a GPU machine. Each
# NAME=FILE[:FILE...] builds this tree with each FILE replacing the file of
# its name in csrc/ (cuda_kernels.cu, adam8bit.h, ...) into its own directory
# (the variants build in parallel); then benchmarks/bench_adamw.py runs once
# per variant per round, the variants alternating within each round, so that a
# drift of the machine shows as a spread between rounds rather than as a
# difference between variants.
# Usage (repo root, on the device):
#   bash benchmarks/kernel_ab.sh NAME=FILE[:FILE...] [NAME=FILE[:FILE...] ...]
# AB_CASES (default 0,1), AB_METHODS (bench_adamw.py --methods; default
# "optax.adamw,paged optax path,paged fused"), AB_ROUNDS (2), AB_ITERS (15),
# AB_NCU (benchmark cases, e.g. "1": Nsight Compute counts each variant's
# fused update kernel's executed instructions there, printed per param).
# Logs and JSON rows go to $OUT/ab_results.tgz; the last lines printed are a
# table of every variant's times by round.
set -u
OUT=${OUT:-$PWD/out}
res=/tmp/ab_results
rm -rf "$res" && mkdir -p "$OUT" "$res"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
cases=${AB_CASES:-0,1}
methods=${AB_METHODS:-optax.adamw,paged optax path,paged fused}
names=()
t0=$(date +%s)
for spec in "$@"; do
  name=${spec%%=*}
  files=${spec#*=}
  names+=("$name")
  src=/tmp/ab_src_$name
  rm -rf "$src" "/tmp/ab_$name" && mkdir -p "$src"
  tar -cf - --exclude=./.git --exclude=./out --exclude=./benchmarks/results . | tar -xf - -C "$src"
  for file in ${files//:/ }; do cp "$file" "$src/csrc/$(basename "$file")"; done
  (cd "$src" && python3 -m pip install --no-build-isolation --no-deps -q \
     --target "/tmp/ab_$name" .) \
    > "$res/build_$name.log" 2>&1 &
done
for name in "${names[@]}"; do
  wait -n || { tail -30 "$res"/build_*.log; exit 1; }
done
echo "built ${names[*]} in $(( $(date +%s) - t0 )) s"
# What this machine's compiler made of each variant.
for name in "${names[@]}"; do
  echo "$name: $(bash benchmarks/kernel_resources.sh /tmp/ab_$name/optax_paged8bit/_ops*.so)"
done
for c in ${AB_NCU//,/ }; do
  for name in "${names[@]}"; do
    PYTHONPATH=/tmp/ab_$name bash benchmarks/ncu_count.sh "$c" "$name" "$res/ncu_${name}_case$c.log" \
      || exit 1
  done
done
for round in $(seq "${AB_ROUNDS:-2}"); do
  for name in "${names[@]}"; do
    (cd /tmp && PYTHONPATH=/tmp/ab_$name python3 -c \
      "import optax_paged8bit as op; assert op.__file__.startswith('/tmp/ab_$name/'), op.__file__") \
      || exit 1
    PYTHONPATH=/tmp/ab_$name python3 benchmarks/bench_adamw.py --cases "$cases" \
      --methods "$methods" --iters "${AB_ITERS:-15}" --json "$res/${name}_$round.json" \
      > "$res/${name}_$round.log" 2>&1 || { tail -20 "$res/${name}_$round.log"; exit 1; }
  done
done
tar -czf "$OUT/ab_results.tgz" -C /tmp ab_results
python3 - "$res" "${names[@]}" <<'EOF'
import glob, json, sys
res, names = sys.argv[1], sys.argv[2:]
table = {}
for name in names:
  for path in sorted(glob.glob(f"{res}/{name}_[0-9]*.json")):
    for r in json.load(open(path))["rows"]:
      cell = table.setdefault((r["case"], r["method"]), {}).setdefault(name, [])
      cell.append(f"{r['ms']:.2f}/{r['pipelined_ms']:.2f}")
print("ms per step, awaited/back to back, one entry per round")
print(f"{'case':32} {'method':22} " + " ".join(f"{n:>26}" for n in names))
for (case, method), by_name in table.items():
  cells = [", ".join(by_name.get(n, [])) for n in names]
  print(f"{case:32} {method:22} " + " ".join(f"{c:>26}" for c in cells))
EOF
