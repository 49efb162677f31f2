#!/usr/bin/env bash
# Nsight Compute's count of the fused update kernel's executed instructions
# (and the kernel's time at the profiler's locked clocks) on one
# benchmarks/profile_step.py case, printed per param of the 2^30-param trees.
# Usage (repo root, on the device; PYTHONPATH may select another build):
#   bash benchmarks/ncu_count.sh CASE LABEL LOG
# LOG keeps ncu's own output.
set -u
case=$1 label=$2 log=$3
(cd "$(dirname "$0")" && ncu -k regex:op8_update -s 2 -c 1 \
   --metrics smsp__inst_executed.sum,gpu__time_duration.sum python3 profile_step.py "$case") \
  > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
python3 - "$log" "$label" "$case" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
inst = float(re.search(r"smsp__inst_executed.sum\s+\S*\s+([\d,.]+)", text).group(1).replace(",", ""))
time = re.search(r"gpu__time_duration.sum\s+(\S+)\s+([\d,.]+)", text)
print(f"ncu case {sys.argv[3]} {sys.argv[2]}: {inst:,.0f} instructions, {inst * 32 / 2**30:.2f} per "
      f"param (2^30 params), kernel {time.group(2)} {time.group(1)}")
PY
