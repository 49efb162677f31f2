"""Reads the per-SASS-instruction page that `device_run.sh stalls` exports
(`ncu -i REPORT --page source --csv --print-source sass`, gzipped): the
instructions with the most warp-stall samples and why they stalled, and the
executed instructions per param by opcode.

  python benchmarks/ncu_sass.py sass_case0.csv.gz --params 1073741824
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def number(text: str) -> float:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return 0.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("csv", help="the gzipped source page of one kernel")
  parser.add_argument("--params", type=int, default=1 << 30, help="params the kernel updated")
  parser.add_argument("--top", type=int, default=12, help="stall sites to list")
  parser.add_argument("--opcodes", type=int, default=24, help="opcodes to list (0: none)")
  args = parser.parse_args()
  with gzip.open(args.csv, "rt") as f:
    rows = list(csv.reader(f))
  header, body = rows[1], rows[2:]  # rows[0] names the kernel
  col = {name: i for i, name in enumerate(header)}
  samples = col["Warp Stall Sampling (All Samples)"]
  executed = col["Instructions Executed"]
  first = int(body[0][0], 16)
  total_samples = sum(number(r[samples]) for r in body) or 1.0
  total_executed = sum(number(r[executed]) for r in body)
  print(rows[0][1])
  print(
    f"{total_executed * 32 / args.params:.1f} executed instructions per param, "
    f"{total_samples:.0f} stall samples"
  )
  print("offset  samples  long_sb  short_sb  instruction")
  for r in sorted(body, key=lambda r: -number(r[samples]))[: args.top]:
    share = lambda name, r=r: 100 * number(r[col[name]]) / total_samples
    print(
      f"{int(r[0], 16) - first:6x} {share('Warp Stall Sampling (All Samples)'):7.1f}% "
      f"{share('stall_long_sb'):7.1f}% {share('stall_short_sb'):8.1f}%  {r[1].strip()}"
    )
  by_opcode = collections.Counter()
  for r in body:
    words = r[1].split()
    if not words:
      continue
    opcode = words[1] if words[0].startswith("@") else words[0]
    by_opcode[opcode.split(".")[0]] += number(r[executed])
  if args.opcodes > 0:
    print("executed instructions per param by opcode:")
  for opcode, count in by_opcode.most_common(args.opcodes):
    print(f"  {opcode:8} {count * 32 / args.params:6.2f}")


if __name__ == "__main__":
  main()
