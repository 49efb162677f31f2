"""The performance guide's plot: each method's speed against optax.adamw in
the same run (its ms per step over the method's), per case, from
benchmarks/bench_adamw.py's --json output. The steps after page_out are
left out (they read the state over the bus: RESULTS.md has them).

Usage: python benchmarks/plot_performance.py RESULT.json [RESULT.json ...] [OUT.png]
(one file per case, or one of all; the docs use docs/_static/performance.png)
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
  sources = [pathlib.Path(a) for a in sys.argv[1:] if a.endswith(".json")]
  outs = [a for a in sys.argv[1:] if a.endswith(".png")]
  out = pathlib.Path(outs[0] if outs else "docs/_static/performance.png")
  results = [json.loads(source.read_text()) for source in sources]
  result = results[0]
  rows = [row for r in results for row in r["rows"]]
  cases = list(dict.fromkeys(r["case"] for r in rows))
  methods = [m for m in dict.fromkeys(r["method"] for r in rows) if "paged out" not in m]
  ms = {(r["case"], r["method"]): r["ms"] for r in rows}
  fig, ax = plt.subplots(figsize=(8, 0.9 + 0.9 * len(cases)))
  height = 0.8 / len(methods)
  for k, method in enumerate(methods):
    ys = [i + k * height for i in range(len(cases))]
    values = [ms[(case, "optax.adamw")] / ms.get((case, method), float("nan")) for case in cases]
    bars = ax.barh(ys, values, height, label=method)
    for bar, value in zip(bars, values, strict=True):
      ax.text(bar.get_width(), bar.get_y() + height / 2, f" {value:.2f}x", va="center", fontsize=8)
  ax.set_yticks([i + height * (len(methods) - 1) / 2 for i in range(len(cases))], cases)
  ax.invert_yaxis()
  ax.axvline(1.0, color="black", linewidth=0.8)
  ax.set_xlabel("speed against optax.adamw in the same run (higher is faster; steps awaited)")
  ax.set_title(f"{result['device']}, JAX {result['jax']}")
  ax.legend(loc="upper right", fontsize=8)
  ax.set_xlim(0, max(ax.get_xlim()[1], 1.0) * 1.08)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"written to {out}")


if __name__ == "__main__":
  main()
